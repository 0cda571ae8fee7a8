"""Shared test set-up. TRITON_INTERPRET must be set before any Triton kernel module is imported."""
import os
import sys

import pytest

if not os.environ.get("DDPM_FAST_TEST_GPU_TRITON"):
    # Run Triton kernels on the CPU through the interpreter, unless a GPU run asks for real kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(min(torch.get_num_threads(), 2))

HAS_CUDA = torch.cuda.is_available()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/oracles.py and other shared helpers


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


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


@pytest.fixture
def seed(request):
    """A fresh seed per test (printed on failure) so every run exercises new random inputs."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    request.node.user_properties.append(("seed", s))
    print(f"seed={s}")
    return s
