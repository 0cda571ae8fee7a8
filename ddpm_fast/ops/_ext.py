"""Loads the compiled extension ddpm_fast._C and says which backends are available.

If _C is missing (installed without a compiler) or broken, ops fall back to Triton or the PyTorch
reference, and ONE warning names the reinstall command -- never silently.
"""
import functools
import importlib
import importlib.util
import os
import warnings

_REINSTALL = "pip install --force-reinstall --no-deps ."


@functools.lru_cache(maxsize=None)
def load():
    """Returns the ddpm_fast._C module, or None (with one warning) when it cannot be imported."""
    if os.environ.get("DDPM_FAST_DISABLE_EXT", "0") == "1":
        return None
    try:
        return importlib.import_module("ddpm_fast._C")
    except ImportError as err:
        warnings.warn(
            f"ddpm_fast: the compiled extension ddpm_fast._C is unavailable ({err}); fused ops fall back "
            f"to Triton or plain PyTorch and will be slower. Rebuild it with a C++ compiler and CMake: "
            f"`{_REINSTALL}`", RuntimeWarning, stacklevel=3)
        return None


def has_cpu_kernels():
    """True when the compiled C++ CPU kernels are importable."""
    return load() is not None


def has_cuda_kernels():
    """True when _C was compiled with nvcc (the CUDA kernels exist; a GPU may still be absent)."""
    ext = load()
    return ext is not None and bool(getattr(ext, "with_cuda", False))


@functools.lru_cache(maxsize=None)
def has_triton():
    """True when triton is importable (on the CPU only useful under TRITON_INTERPRET=1)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpret():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
