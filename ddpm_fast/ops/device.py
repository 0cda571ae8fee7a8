"""The device a kernel runs on: the guard every launch and every CUDA-graph capture goes through, and the lazy
check that the compiled CUDA kernels can run on a device at all.

``on_device(device)``: makes a CUDA device current for the block. Triton and the compiled (_C) CUDA kernels
    launch on the CURRENT device and its current stream, so a model on ``cuda:1`` while device 0 is current
    would otherwise run its kernels with device-1 pointers on device 0. A no-op on the CPU.
``cuda_kernels_usable(device)``: whether _C's CUDA kernels run on ``device``. _C links CUDA's runtime
    statically (13.x: a 580+ driver); on an older driver, or a GPU the build has no code for, every launch
    fails. Probed once per device at the first CUDA call of an op -- never at import, which would create a
    CUDA context on GPU 0 in every torchrun rank: driver vs runtime version, then one empty launch. On failure
    the ops run as Triton kernels, after ONE warning naming both versions.
``capture_graph(body, device, pool, warmup)``: warm-up iterations on a side stream, then one capture into a
    new CUDAGraph on a stream of ``device`` (torch.cuda.graph's default capture stream is created once, on
    whatever device was current the first time), with capture_error_mode="thread_local" so that other threads
    (a DataLoader's pin-memory thread) calling CUDA during the capture do not invalidate it.
"""
import contextlib
import warnings

import torch

from . import _ext

_USABLE = {}  # CUDA device index -> bool, filled by the first probe of that device


def on_device(device):
    """A context manager making ``device`` (a torch.device or a tensor's device) current for CUDA; a no-op on
    the CPU and other devices."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _index(device):
    return device.index if device.index is not None else torch.cuda.current_device()


def cuda_kernels_usable(device) -> bool:
    """True when _C was built with CUDA kernels and they run on ``device`` (probed once per device)."""
    if device.type != "cuda" or not _ext.has_cuda_kernels():
        return False
    index = _index(device)
    usable = _USABLE.get(index)
    if usable is None:
        usable = _USABLE[index] = _probe(index)
    return usable


def _version(v):
    return f"{v // 1000}.{v % 1000 // 10}" if v else "none"


def _probe(index) -> bool:
    """Driver vs runtime CUDA version, then one empty launch on the device's current stream (skipped while that
    stream captures a graph: a probe must not add a node to someone's graph). Warns once on failure."""
    ext = _ext.load()
    driver, runtime = ext.cuda_driver_version(), ext.cuda_runtime_version()
    problem = None
    if driver // 1000 < runtime // 1000:
        problem = "the driver is older than the CUDA runtime the extension was built with"
    else:
        with torch.cuda.device(index):
            stream = torch.cuda.current_stream(index)
            error = "" if stream.is_capturing() else ext.cuda_probe(stream.cuda_stream)
        if error:
            problem = f"a test launch failed ({error})"
    if problem is None:
        return True
    warnings.warn(
        f"ddpm_fast: the compiled CUDA kernels cannot run on cuda:{index}: {problem}; driver CUDA "
        f"{_version(driver)}, extension built with CUDA runtime {_version(runtime)} (CUDA 13 needs an NVIDIA "
        f"driver >= 580). GroupNorm+SiLU runs as a Triton kernel instead (slower); update the driver or rebuild "
        f"the extension with a matching CUDA toolkit.", RuntimeWarning, stacklevel=3)
    return False


def capture_graph(body, device, pool=None, warmup=0):
    """A torch.cuda.CUDAGraph of ``body()`` captured on ``device``: ``warmup`` eager calls on a side stream first
    (JIT compilation, cuDNN/cuBLAS algorithm choice, lazy state), then the capture. Raises if capture fails."""
    with torch.cuda.device(device):
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(warmup):
                body()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=torch.cuda.Stream(device),
                              capture_error_mode="thread_local"):
            body()
        torch.cuda.synchronize(device)
    return graph
