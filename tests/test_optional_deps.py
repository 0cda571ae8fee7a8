"""Optional dependencies stay optional in the tests too: without diffusers (absent on the GPU machine) only the
parity tests skip, and without matplotlib only the loss-curve check is left out, nothing fails."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_without(modules, *args, cwd):
    """pytest on ``args`` (paths relative to the repository) in a subprocess started in ``cwd`` (outside the
    checkout: there ./ddpm_fast would shadow an installed package) where importing ``modules`` raises ImportError."""
    argv = ["-q", "-rs", "-p", "no:cacheprovider", "-c", os.path.join(ROOT, "pyproject.toml"), "--rootdir", ROOT,
            *[os.path.join(ROOT, a) for a in args]]
    code = (f"import sys; sys.modules.update(dict.fromkeys({list(modules)!r})); import pytest; "
            f"sys.exit(pytest.main({argv!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_without_diffusers_and_matplotlib_only_parity_tests_skip(tmp_path):
    out = run_without(("diffusers", "matplotlib"), "tests/diffusion/test_schedule.py",
                      "tests/training/test_trainer.py::test_loss_decreases", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    skipped = re.findall(r"SKIPPED \[\d+\] (\S+)", out.stdout)
    assert skipped and all("test_schedule.py" in s for s in skipped), out.stdout[-3000:]
    assert re.search(r"\d+ passed", out.stdout) and int(re.search(r"(\d+) passed", out.stdout).group(1)) >= 10
    assert "diffusers not installed (parity tests)" in out.stdout
