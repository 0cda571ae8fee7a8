"""Shared test set-up. TRITON_INTERPRET must be set before any Triton kernel module is imported."""
import os

import pytest

if not os.environ.get("DDPM_FAST_TEST_GPU_TRITON"):
    # Run Triton kernels on the CPU through the interpreter, unless a GPU run asks for real kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(min(torch.get_num_threads(), 2))

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def seed(request):
    """A fresh seed per test (printed on failure) so every run exercises new random inputs."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    request.node.user_properties.append(("seed", s))
    print(f"seed={s}")
    return s
