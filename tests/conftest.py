"""Shared test set-up, and the one switch between the two ways Triton runs in tests.

Without CUDA, Triton kernels run on CPU tensors through its interpreter (TRITON_INTERPRET=1, set here before any
kernel module is imported): tests marked ``triton_cpu`` check them there. With CUDA, Triton compiles for the GPU:
the ``gpu`` tests run the real kernels (and capture CUDA graphs, which the interpreter cannot: it copies device
memory to the host), and the ``triton_cpu`` tests are skipped (they run on every machine without CUDA: CI and
benchmarks/device_stack.sh). So one plain ``pytest -q`` is right on both machines; the mode follows
``torch.cuda.is_available()`` alone.
"""
import importlib.util
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
elif os.environ.get("TRITON_INTERPRET") == "1":
    raise pytest.UsageError("TRITON_INTERPRET=1 on a CUDA machine would run the GPU tests' Triton kernels in the "
                            "interpreter (and break CUDA-graph capture); unset it: the tests pick the mode")

torch.set_num_threads(min(torch.get_num_threads(), 2))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/oracles.py and other shared helpers


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_no_triton = pytest.mark.skip(reason="needs triton")
    skip_interpreter = pytest.mark.skip(
        reason="a Triton-interpreter test (Triton kernels on CPU tensors): it runs on machines without CUDA; "
               "here Triton compiles for the GPU and the gpu tests check the kernels")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "triton_cpu" in item.keywords:
            if not HAS_TRITON or HAS_CUDA:
                item.add_marker(skip_no_triton if not HAS_TRITON else skip_interpreter)


@pytest.fixture
def one_thread():
    """torch on one thread for the test (modules opt in with pytestmark). The tiny models and tensors of these
    tests are overhead-bound: a second OpenMP thread gains little, and on a loaded 2-core machine every op's
    parallel region waits for a descheduled thread (measured here: 4 training steps/s with one thread, 0.7 with
    two; sampling tests up to 30x slower). Also makes bitwise comparisons independent of the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A tiny unconditional U-Net (seed 0, ch_mult (1, 2)) saved with ddpm_fast.save: the CLI tests' checkpoint."""
    import ddpm_fast
    from ddpm_fast import UNet
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    ddpm_fast.save(UNet.preset("tiny", ch_mult=(1, 2)), str(path))
    return str(path)


@pytest.fixture
def seed(request):
    """A fresh seed per test (printed on failure) so every run exercises new random inputs."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    request.node.user_properties.append(("seed", s))
    print(f"seed={s}")
    return s
