""".ci/run leaves nothing behind: its virtualenv and build folders live in one temporary folder that an EXIT trap
removes, also when a step fails."""
import os
import stat
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "run"


def _stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_ci_run_cleans_up_when_a_step_fails(tmp_path):
    bin_dir, tmp = tmp_path / "bin", tmp_path / "tmp"
    bin_dir.mkdir()
    tmp.mkdir()
    _stub(bin_dir, "apt-get", "exit 0")  # no system packages in a test
    # `python3 -m venv DIR` makes the folder (as the real one would, with a big file in it), then fails.
    _stub(bin_dir, "python3", 'mkdir -p "$3" && head -c 100000 /dev/zero > "$3/big" && echo "$3" && exit 3')
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(tmp)}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    venv = Path(done.stdout.strip().splitlines()[-1])
    assert venv.is_relative_to(tmp) and venv.name == "venv"  # it did make the venv where we look
    assert not venv.exists() and list(tmp.iterdir()) == [], list(tmp.iterdir())
