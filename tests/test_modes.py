"""One plain ``pytest -q`` is right on a machine with CUDA and on one without (conftest.py decides the Triton mode
from torch.cuda.is_available()). The CUDA side is shown here by faking torch.cuda.is_available() in a child pytest:
Triton must then NOT be interpreted, and the interpreter tests must skip, with their reason, instead of running."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child_pytest(cuda, *args):
    """A child pytest (started outside the checkout, whose ./ddpm_fast would shadow an installed package) with
    torch.cuda.is_available() answering ``cuda``; test paths in ``args`` are relative to the repository."""
    import tempfile
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a fresh shell would have it
    argv = ["-q", "-rs", "-p", "no:cacheprovider", "-c", os.path.join(ROOT, "pyproject.toml"), "--rootdir", ROOT,
            *[os.path.join(ROOT, a) if a.startswith("tests/") else a for a in args]]
    code = (f"import os, sys, torch; torch.cuda.is_available = lambda: {cuda}; import pytest; "
            f"rc = pytest.main({argv!r}); "
            f"print('TRITON_INTERPRET=' + os.environ.get('TRITON_INTERPRET', 'unset')); sys.exit(rc)")
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env,
                              timeout=600)


def test_cuda_machine_compiles_triton_and_skips_interpreter_tests():
    # gpu tests would need a real GPU; opcheck asks torch for CUDA once is_available() says so
    out = _child_pytest(True, "-m", "not gpu", "-k", "not opcheck", "tests/ops/test_q_sample.py")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "TRITON_INTERPRET=unset" in out.stdout
    skipped = re.findall(r"SKIPPED \[(\d+)\] \S+: (.*)", out.stdout)
    assert skipped and all("Triton-interpreter test" in why for _, why in skipped), out.stdout[-3000:]
    assert int(re.search(r"(\d+) passed", out.stdout).group(1)) >= 10  # the torch backend's tests still run


def test_machine_without_cuda_interprets_triton():
    out = _child_pytest(False, "tests/ops/test_q_sample.py", "-k", "triton")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "TRITON_INTERPRET=1" in out.stdout and re.search(r"\d+ passed", out.stdout)
    assert "Triton-interpreter test" not in out.stdout
