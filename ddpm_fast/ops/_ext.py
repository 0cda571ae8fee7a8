"""Loads the compiled extension ddpm_fast._C and says which backends are available.

If _C is missing or broken, ops fall back to Triton or the PyTorch reference, and ONE warning says why and what
to do -- never silently. Two cases are told apart: ddpm_fast imported from its source checkout (the current
directory or PYTHONPATH puts the sources, which have no _C until built in place, ahead of any install), and an
installed package whose build left the extension out.
"""
import functools
import glob
import importlib
import importlib.util
import os
import warnings
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]  # the ddpm_fast/ directory this module was imported from


@functools.lru_cache(maxsize=None)
def load():
    """Returns the ddpm_fast._C module, or None (with one warning) when it cannot be imported."""
    if os.environ.get("DDPM_FAST_DISABLE_EXT", "0") == "1":
        return None
    try:
        return importlib.import_module("ddpm_fast._C")
    except ImportError as err:
        warnings.warn(f"ddpm_fast: {missing_extension_message(err)}", RuntimeWarning, stacklevel=3)
        return None


def source_checkout(package: Path = _PACKAGE):
    """The repository root when ``package`` (the ddpm_fast/ directory) sits in a source checkout, else None."""
    root = package.parent
    markers = (root / "setup.py", root / "CMakeLists.txt", root / "csrc")
    return root if all(m.exists() for m in markers) else None


def _installed_copy(package: Path):
    """Where pip installed ddpm_fast, when that is not ``package`` itself (None when not installed)."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution
        name = __name__.split(".")[0]  # the distribution and its top-level package share the name
        where = Path(distribution(name).locate_file(name)).resolve()
    except (PackageNotFoundError, OSError, TypeError):
        return None
    return where if where.is_dir() and where != package else None


def missing_extension_message(err, package: Path = _PACKAGE) -> str:
    """Why ddpm_fast._C could not be imported, and the command that fixes it."""
    slower = "fused ops fall back to Triton or plain PyTorch and are slower"
    root = source_checkout(package)
    built = glob.glob(str(package / "_C.*"))
    if root is not None and not built:
        installed = _installed_copy(package)
        use = f"run from outside the checkout to use the installed ddpm_fast ({installed}), or " if installed \
            else ""
        return (f"ddpm_fast is imported from its source checkout {root} (the current directory or PYTHONPATH "
                f"puts it first), where the compiled extension ddpm_fast._C has not been built; {slower}. "
                f"To fix it, {use}build the extension in place: `pip install -e {root}` (or `python setup.py "
                f"build_ext --inplace` in {root}).")
    if root is not None:
        return (f"{built[0]} in the source checkout {root} cannot be imported ({err}): it was built for another "
                f"Python or is broken; {slower}. Rebuild it in place: `pip install -e {root}`.")
    return (f"the compiled extension ddpm_fast._C is unavailable ({err}): this install was built without it "
            f"(no C++ compiler or CMake at install time?); {slower}. Reinstall from the source with a compiler "
            f"and CMake: `pip install -v --force-reinstall --no-deps PATH_TO_DDPM_FAST_SOURCE` (-v shows the "
            f"build, and why it failed).")


def build_info() -> str:
    """One line on the compiled extension: its CPU and CUDA kernels (CUDA archs), or why there is none."""
    if os.environ.get("DDPM_FAST_DISABLE_EXT", "0") == "1":
        return "ddpm_fast._C disabled (DDPM_FAST_DISABLE_EXT=1)"
    try:
        ext = importlib.import_module("ddpm_fast._C")
    except ImportError as err:
        return "no ddpm_fast._C: " + missing_extension_message(err)
    cpu = "CPU kernels" + (" (OpenMP)" if getattr(ext, "with_openmp", False) else " (no OpenMP)")
    archs = [a for a in str(getattr(ext, "cuda_archs", "")).split(",") if a]
    cuda = "CUDA kernels for " + ", ".join(f"sm_{a}" for a in archs) if ext.with_cuda and archs else \
        "CUDA kernels" if ext.with_cuda else "no CUDA kernels"
    return f"ddpm_fast._C: {cpu}, {cuda}"


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
