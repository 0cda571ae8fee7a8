"""Running `ddpm-fast` as a user does: a separate process (`python -m ddpm_fast ...`, the installed package's
entry point in CI, the checkout through PYTHONPATH here), from a directory outside the checkout, one thread; and
torchrun launches of several such processes."""
import os
import subprocess
import sys


def ddpm_fast_cli(*args, cwd, env=None, timeout=600, code=None):
    """CompletedProcess (text) of ``python -m ddpm_fast ARGS`` run in ``cwd``; ``code``: a Python prologue run in
    that process before the CLI (e.g. to point the bundled model elsewhere), for the rare test that needs it."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if code is None:
        cmd = [sys.executable, "-m", "ddpm_fast", *map(str, args)]
    else:
        cmd = [sys.executable, "-c", code + "\nfrom ddpm_fast.cli import main\nraise SystemExit(main(sys.argv[1:]))",
               *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def torchrun(nproc, args, cwd, fault=None, timeout=600):
    """`torchrun --standalone --nproc-per-node nproc ARGS` (one thread per process) in its own session (a fault's
    SIGINT stays inside), from ``cwd``; ``fault``: the test-only DDPM_FAST_TEST_FAULT hook (sampling/shard.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DDPM_FAST_TEST_FAULT", None)
    if fault:
        env["DDPM_FAST_TEST_FAULT"] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *map(str, args)]
    # cwd outside the checkout: ./ddpm_fast (no _C in a fresh clone) must not shadow the installed package
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)


def usage_error(done, command, message):
    """True when ``done`` exited 2 with "ddpm-fast COMMAND: error: ..." naming ``message`` on stderr."""
    return done.returncode == 2 and f"ddpm-fast {command}: error:" in done.stderr and message in done.stderr
