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
