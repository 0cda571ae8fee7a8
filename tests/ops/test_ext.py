"""The extension loader: ddpm_fast._C present, or missing with exactly one warning and working fallbacks."""
import os
import subprocess
import sys

import pytest

from ddpm_fast.ops import _ext

_FALLBACK_SCRIPT = """
import sys, warnings
if {block}:
    sys.modules["ddpm_fast._C"] = None  # `import ddpm_fast._C` now raises ImportError, as a failed build would
import torch
from ddpm_fast.ops import _ext
from ddpm_fast.ops.group_norm_silu import group_norm_silu, group_norm_silu_ref
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert _ext.load() is None and _ext.load() is None
    assert not _ext.has_cpu_kernels() and not _ext.has_cuda_kernels()
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    y = group_norm_silu(x, 2)
    y.sum().backward()
    group_norm_silu(x.detach(), 2)
msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
print(len(msgs))
print(msgs[0] if msgs else "")
torch.testing.assert_close(y, group_norm_silu_ref(x, 2), atol=1e-5, rtol=1e-5)
assert x.grad is not None and torch.isfinite(x.grad).all()
"""


def _run(script, **env):
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.splitlines()


def test_missing_extension_warns_once_and_falls_back():
    count, message = _run(_FALLBACK_SCRIPT.format(block=True))[-2:]
    assert count == "1"
    assert "ddpm_fast._C" in message and "pip install" in message


def test_disabled_extension_falls_back():
    lines = _run(_FALLBACK_SCRIPT.format(block=False), DDPM_FAST_DISABLE_EXT="1")
    assert lines[-2] == "0"  # disabled on purpose: no warning


@pytest.mark.skipif(not _ext.has_cpu_kernels(), reason="ddpm_fast._C not built")
def test_extension_exports_group_norm_silu():
    ext = _ext.load()
    assert callable(ext.group_norm_silu_fwd_cpu) and callable(ext.group_norm_silu_bwd_cpu)
    assert hasattr(ext, "with_openmp")
    if ext.with_cuda:
        assert callable(ext.group_norm_silu_fwd_cuda) and callable(ext.group_norm_silu_bwd_cuda)
        assert ext.group_norm_silu_cuda_workspace(2, 8, 16, 4) == 2 * 2 * 8 + 2 * 2 * 4
        assert callable(ext.cuda_probe) and ext.cuda_runtime_version() > 0 and ext.cuda_driver_version() >= 0


_IMPORT_SCRIPT = """
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from ddpm_fast.ops import _ext
    assert _ext.load() is None
print(caught[0].message)
"""


def _checkout_copy(tmp_path, with_c=False):
    """A source checkout's layout (setup.py, CMakeLists.txt, csrc/, ddpm_fast/) without a built _C."""
    import shutil
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    repo = tmp_path / "repo"
    shutil.copytree(root / "ddpm_fast", repo / "ddpm_fast", ignore=shutil.ignore_patterns("_C.*", "assets",
                                                                                           "__pycache__"))
    for name in ("setup.py", "CMakeLists.txt"):
        shutil.copy(root / name, repo / name)
    (repo / "csrc").mkdir()
    if with_c:
        (repo / "ddpm_fast" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"not a shared object")
    return repo


def test_source_checkout_without_extension_says_so(tmp_path):
    """`python -c "import ddpm_fast"` from a checkout: the warning names the checkout and `pip install -e`,
    not a reinstall (which would not change what this directory imports)."""
    repo = _checkout_copy(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", _IMPORT_SCRIPT], cwd=repo, capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    message = out.stdout
    assert f"imported from its source checkout {repo}" in message, message
    assert f"pip install -e {repo}" in message and "build_ext --inplace" in message
    assert "force-reinstall" not in message


def test_broken_extension_in_checkout_and_installed_package_messages(tmp_path):
    repo = _checkout_copy(tmp_path, with_c=True)
    message = _ext.missing_extension_message(ImportError("invalid ELF header"), repo / "ddpm_fast")
    assert "cannot be imported (invalid ELF header)" in message and f"pip install -e {repo}" in message
    site = tmp_path / "site-packages" / "ddpm_fast"
    site.mkdir(parents=True)
    message = _ext.missing_extension_message(ImportError("No module named 'ddpm_fast._C'"), site)
    assert "source checkout" not in message and "pip install -v --force-reinstall" in message


def test_build_info_names_the_kernels():
    info = _ext.build_info()
    if _ext.has_cpu_kernels():
        assert info.startswith("ddpm_fast._C: CPU kernels") and "CUDA" in info
    else:
        assert info.startswith("no ddpm_fast._C")
