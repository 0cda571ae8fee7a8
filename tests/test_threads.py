"""The "auto" thread rule and the scoped thread count (ddpm_fast.threads), and sample()'s use of them."""
import pytest
import torch

import ddpm_fast
from ddpm_fast.sampling import last_run_info
from ddpm_fast.threads import SMALL_WORK, auto_threads, check_threads, model_work, resolve_threads, using_threads


def test_rule_and_scope():
    assert auto_threads(SMALL_WORK - 1) == 1 and auto_threads(SMALL_WORK) is None
    assert auto_threads(1, "cuda") is None  # threads matter for CPU work only
    assert resolve_threads(None, 1) is None and resolve_threads(3, 10 ** 12) == 3
    with pytest.raises(TypeError):
        check_threads(2.0)
    with pytest.raises(ValueError):
        check_threads(0)
    before = torch.get_num_threads()
    with using_threads(1):
        assert torch.get_num_threads() == 1
    with pytest.raises(RuntimeError), using_threads(1):
        raise RuntimeError("restored on errors too")
    assert torch.get_num_threads() == before


def test_model_work_of_the_bundled_model():
    model = ddpm_fast.load()
    work = model_work(model, (8, 8), 64)  # `ddpm-fast sample`'s default: 64 images in one chunk
    assert work == sum(p.numel() for p in model.parameters()) * 64 * 64 and work < SMALL_WORK
    cifar = ddpm_fast.UNet.preset("ddpm_cifar10")
    assert model_work(cifar, (32, 32), 1) > SMALL_WORK  # the CIFAR-10 U-Net even at batch 1


def test_sample_runs_small_models_on_one_thread_and_restores_the_setting():
    model = ddpm_fast.load()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ddpm_fast.sample(model, 2, 2, seed=0, progress=False)
        assert last_run_info()["threads"] == 1 and torch.get_num_threads() == 2
        ddpm_fast.sample(model, 2, 2, seed=0, progress=False, threads=None)
        assert last_run_info()["threads"] == 2
    finally:
        torch.set_num_threads(before)
