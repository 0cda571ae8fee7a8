"""The fused q_sample: every backend vs the reference, its in-kernel noise, chunking, bad inputs."""
import numpy as np
import pytest
import torch

from ddpm_fast import NoiseSchedule
from ddpm_fast.ops import _ext
from ddpm_fast.ops.noise import NOISE_ERROR_BOUND, STREAM_Q_SAMPLE, philox_randn_ref
from ddpm_fast.ops.q_sample import q_sample, q_sample_ref

needs_triton = pytest.mark.triton_cpu  # the Triton interpreter on CPU tensors (conftest.py)
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]
SCHED = NoiseSchedule.cosine(100)
ATOL = {torch.float32: 1e-6, torch.float16: 1e-6, torch.bfloat16: 1e-6}


def _truncate_bf16(t):
    # The Triton interpreter converts fp32 -> bf16 by truncation (GPUs round to nearest): its naive twin.
    return (t.float().view(torch.int32) & -65536).view(torch.float32)


def assert_rule(out, x0, t, z, backend):
    """|out - ref64| <= 2 |ref(dtype) - ref64| + atol."""
    ref64 = q_sample_ref(SCHED, x0.double(), t, z.double())
    naive = q_sample_ref(SCHED, x0, t, z)
    if backend == "triton" and x0.dtype == torch.bfloat16 and _ext.triton_interpret():
        naive = _truncate_bf16(q_sample_ref(SCHED, x0.float(), t, z.float()))
    err = (out.double() - ref64).abs().max().item()
    assert err <= 2 * (naive.double() - ref64).abs().max().item() + ATOL[x0.dtype], f"{backend} {x0.dtype}"
    assert out.dtype == x0.dtype and out.shape == x0.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 3, 5, 7), (2, 1, 11), (4, 2, 3, 3)])
def test_injected_noise_matches_reference(seed, backend, dtype, shape):
    x0 = (torch.rand(shape) * 2 - 1).to(dtype)
    z = torch.randn(shape).to(dtype)
    t = torch.randint(0, SCHED.num_steps, (shape[0],))
    t[0] = SCHED.num_steps - 1
    x_t, eps = q_sample(SCHED, x0, t, noise=z, backend=backend)
    assert eps is z
    assert_rule(x_t, x0, t, z, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_drawn_noise_is_returned_and_consistent(seed, backend):
    """x_t is built from exactly the eps returned; channels_last and strided inputs keep working."""
    x0 = torch.rand(3, 4, 6, 5) * 2 - 1
    t = torch.tensor([0, 50, 99])
    for x in (x0, x0.contiguous(memory_format=torch.channels_last), torch.rand(3, 4, 6, 10)[..., ::2]):
        x_t, eps = q_sample(SCHED, x, t, seed=seed, backend=backend)
        assert eps.shape == x.shape and eps.dtype == x.dtype
        torch.testing.assert_close(x_t, q_sample_ref(SCHED, x, t, eps), rtol=1e-6, atol=1e-6)
    again = q_sample(SCHED, x0, t, seed=seed, backend=backend)
    torch.testing.assert_close(again[1], q_sample(SCHED, x0, t, seed=seed, backend=backend)[1], rtol=0, atol=0)
    other = q_sample(SCHED, x0, t, seed=seed + 1, backend=backend)[1]
    assert abs(torch.corrcoef(torch.stack([again[1].flatten(), other.flatten()]))[0, 1]) < 0.2


def test_generator_path_is_torch_randn(seed):
    x0 = torch.rand(2, 3, 4, 4)
    t = torch.tensor([3, 97])
    x_t, eps = q_sample(SCHED, x0, t, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(eps, torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed)))
    torch.testing.assert_close(x_t, q_sample_ref(SCHED, x0, t, eps))


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_stream_and_chunks(seed, backend):
    """eps is the specified Philox stream (Q_SAMPLE) on every backend; chunks with element_offset draw the full
    batch's eps."""
    s = seed % 2 ** 63
    x0 = torch.rand(5, 3, 5, 5)          # 75 elements per sample: chunk offsets are not 4-aligned
    t = torch.randint(0, 100, (5,))
    x_t, eps = q_sample(SCHED, x0, t, seed=s, backend=backend)
    np.testing.assert_allclose(eps.flatten().numpy(), philox_randn_ref(s, 0, STREAM_Q_SAMPLE, np.arange(375)),
                               rtol=0, atol=NOISE_ERROR_BOUND)
    for lo, hi in ((0, 2), (2, 3), (3, 5)):
        part_xt, part_eps = q_sample(SCHED, x0[lo:hi], t[lo:hi], seed=s, element_offset=lo * 75, backend=backend)
        torch.testing.assert_close(part_eps, eps[lo:hi], rtol=0, atol=0)
        torch.testing.assert_close(part_xt, x_t[lo:hi], rtol=0, atol=0)


@needs_triton
def test_triton_at_the_gpu_block_size(seed, monkeypatch):
    """1024-element blocks as on a GPU (the interpreter otherwise runs one block): several programs, offsets that
    are not 4-aligned; bitwise the one-block result, eps the specified stream."""
    from ddpm_fast.ops.triton import philox
    s = seed % 2 ** 63
    x0, t = torch.rand(5, 3, 17, 19), torch.randint(0, 100, (5,))
    runs = {}
    for gpu_blocks in (False, True):
        monkeypatch.setattr(philox, "triton_interpret", lambda: not gpu_blocks)
        runs[gpu_blocks] = q_sample(SCHED, x0, t, seed=s, element_offset=75, backend="triton")
    for one_block, gpu_block in zip(runs[False], runs[True]):
        torch.testing.assert_close(gpu_block, one_block, rtol=0, atol=0)
    np.testing.assert_allclose(runs[True][1].flatten().numpy(),
                               philox_randn_ref(s, 0, STREAM_Q_SAMPLE, np.arange(x0.numel()) + 75),
                               rtol=0, atol=NOISE_ERROR_BOUND)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_statistics(seed, backend):
    n = 1 << 14
    _, eps = q_sample(SCHED, torch.zeros(4, 1, n // 4), torch.zeros(4, dtype=torch.int64), seed=seed,
                      backend=backend)
    z = eps.double().flatten()
    assert abs(z.mean().item()) < 6 / n ** 0.5 and abs(z.var().item() - 1) < 6 * (2 / n) ** 0.5
    for lag in (1, 2, 3, 4, 5):
        assert abs(torch.corrcoef(torch.stack([z[:-lag], z[lag:]]))[0, 1].item()) < 6 / n ** 0.5


def test_opcheck():
    x0 = torch.rand(2, 3, 4, 4)
    t = torch.tensor([1, 7])
    table = SCHED.tables().packed
    torch.library.opcheck(torch.ops.ddpm_fast.q_sample_.default,
                          (x0, t, table, torch.randn_like(x0), None, 0, torch.empty_like(x0), None))
    torch.library.opcheck(torch.ops.ddpm_fast.q_sample_.default,
                          (x0, t, table, None, torch.tensor([5]), 8, torch.empty_like(x0), torch.empty_like(x0)))


def test_bad_inputs():
    x0 = torch.rand(2, 3, 4, 4)
    t = torch.tensor([1, 7])
    cases = [
        (dict(t=torch.tensor([1, 7], dtype=torch.int32)), "t must be an int64 tensor of shape"),
        (dict(t=torch.tensor([1])), r"shape \(2,\)"),
        (dict(t=[1, 7]), "t must be an int64 tensor"),
        (dict(t=torch.tensor([0, 100])), r"t must lie in \[0, 100\)"),
        (dict(t=torch.tensor([-1, 3])), "t must lie in"),
        (dict(x_start=x0.double()), "x_start must be float32, float16 or bfloat16"),
        (dict(x_start=x0.to(torch.uint8)), "x_start must be float32"),
        (dict(noise=torch.randn(2, 3, 4)), "noise must have shape"),
        (dict(noise=torch.randn(2, 3, 4, 4), seed=1), "one noise source"),
        (dict(), "pass noise=, generator= or seed="),
        (dict(seed=1, element_offset=-1), "element_offset"),
        (dict(seed=1, schedule=object()), "schedule must be a NoiseSchedule"),
        (dict(seed=1, backend="c++"), "backend"),
    ]
    for override, match in cases:
        kw = dict(schedule=SCHED, x_start=x0, t=t)
        kw.update(override)
        args = [kw.pop(k) for k in ("schedule", "x_start", "t")]
        with pytest.raises(ValueError, match=match):
            q_sample(*args, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_reference(seed, dtype):
    x0 = (torch.rand(5, 3, 17, 19, device="cuda") * 2 - 1).to(dtype)
    z = torch.randn_like(x0)
    t = torch.randint(0, 100, (5,), device="cuda")
    x_t, _ = q_sample(SCHED, x0, t, noise=z)
    assert_rule(x_t.cpu(), x0.cpu(), t.cpu(), z.cpu(), "cuda")
    seed_t = torch.tensor([seed], device="cuda")
    x_t, eps = q_sample(SCHED, x0, t, seed=seed_t)
    torch.testing.assert_close(x_t.float(), q_sample_ref(SCHED, x0, t, eps).float(), rtol=1e-2, atol=1e-2)
    # float32 noise within NOISE_ERROR_BOUND, then rounded to dtype: half an ulp (2^-8 relative for bf16)
    rtol = {torch.float32: 0, torch.float16: 2 ** -11, torch.bfloat16: 2 ** -8}[dtype]
    np.testing.assert_allclose(eps.float().flatten().cpu().numpy(),
                               philox_randn_ref(seed, 0, STREAM_Q_SAMPLE, np.arange(x0.numel())),
                               rtol=rtol, atol=NOISE_ERROR_BOUND)
