"""The U-Net: presets, fused vs plain, gradients, memory format, autocast, inputs and configs."""
import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ddpm_fast.diffusion import DiffusionConfig
from ddpm_fast.models import UNet, UNetConfig, preset_config

# A small U-Net with everything the big one has: 3 levels, attention, channel changes, multi-head attention.
SMALL = dict(image_size=8, in_channels=3, out_channels=3, ch=16, ch_mult=(1, 2, 2), num_res_blocks=2,
             attn_resolutions=(4,), attn_head_dim=8, num_groups=4, dropout=0.1)


def small_pair(**overrides):
    """(fused, plain) models with the same random weights, in eval mode."""
    fused = UNet(UNetConfig(**{**SMALL, **overrides, "fused": True}))
    with torch.no_grad():
        for p in fused.parameters():  # move norm weights off 1 and biases off 0 so every parameter matters
            p.add_(0.1 * torch.randn_like(p))
    plain = UNet(UNetConfig(**{**SMALL, **overrides, "fused": False}))
    plain.load_state_dict(fused.state_dict())
    return fused.eval(), plain.eval()


def inputs(n=3, c=3, size=8, t_max=1000):
    return torch.randn(n, c, size, size), torch.randint(0, t_max, (n,))


def assert_error_rule(out, naive, ref, atol_rel):
    """The project's error rule: ddpm_fast may err at most twice as much as the plain computation."""
    err, err_naive = (out - ref).abs().max(), (naive - ref).abs().max()
    atol = atol_rel * ref.abs().max()
    assert err <= 2 * err_naive + atol, f"error {err:.3g} vs plain {err_naive:.3g} (+ atol {atol:.3g})"


def test_cifar10_preset_is_the_paper_model():
    with torch.device("meta"):
        model = UNet.preset("ddpm_cifar10")
    # diffusers' UNet2DModel with the google/ddpm-cifar10-32 config has exactly this many parameters.
    assert sum(p.numel() for p in model.parameters()) == 35_746_307
    cfg = model.config
    assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.attn_resolutions, cfg.dropout) == \
        (128, (1, 2, 2, 2), 2, (16,), 0.1)
    d = model.diffusion
    assert (d.schedule, d.T, d.beta_start, d.beta_end, d.prediction, d.variance, d.image_shape) == \
        ("linear", 1000, 1e-4, 0.02, "eps", "fixed_large", (3, 32, 32))


@pytest.mark.parametrize("size", [8, 28])
def test_tiny_preset(seed, size):
    model = UNet.preset("tiny", image_size=size)
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 <= n_params <= 1_000_000
    assert model.config.attn_levels == (len(model.config.ch_mult) - 1,)  # attention only at the lowest level
    assert model.diffusion.image_shape == (1, size, size)
    x, t = inputs(2, 1, size)
    assert model(x, t).shape == (2, 1, size, size)


def test_preset_overrides_and_errors():
    model = UNet.preset("tiny", in_channels=3, fused=False)
    assert (model.config.in_channels, model.config.out_channels, model.config.fused) == (3, 3, False)
    assert model.diffusion.image_shape == (3, 8, 8)
    learned, diffusion = preset_config("tiny", out_channels=2)
    assert diffusion.variance == "learned_range"
    with pytest.raises(ValueError, match="unknown U-Net preset 'huge'"):
        UNet.preset("huge")
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['chanels'\]"):
        UNet.preset("tiny", chanels=3)
    custom = DiffusionConfig(schedule="cosine", image_shape=(1, 8, 8))
    assert UNet.preset("tiny", diffusion=custom).diffusion is custom


def test_fused_and_plain_share_state_dict_keys():
    fused, plain = small_pair()
    assert list(fused.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(fused.state_dict(), strict=True)


def test_fused_matches_plain_fp32(seed):
    fused, plain = small_pair()
    x, t = inputs()
    with torch.no_grad():
        ref = plain.double()(x.double(), t).float()
        plain.float()
        assert_error_rule(fused(x, t), plain(x, t), ref, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_matches_plain_under_autocast(seed, dtype):
    fused, plain = small_pair()
    x, t = inputs()
    with torch.no_grad():
        ref = plain(x, t)
        with torch.autocast("cpu", dtype=dtype):
            out, naive = fused(x, t), plain(x, t)
    assert out.dtype == naive.dtype == dtype
    assert_error_rule(out.float(), naive.float(), ref, 1e-3)


def test_bf16_weights(seed):
    fused, plain = small_pair()
    x, t = inputs()
    with torch.no_grad():
        ref = plain(x, t)
        out, naive = fused.bfloat16()(x.bfloat16(), t), plain.bfloat16()(x.bfloat16(), t)
    assert out.dtype == torch.bfloat16
    assert_error_rule(out.float(), naive.float(), ref, 1e-3)


def test_gradients_reach_every_parameter_and_match_plain(seed):
    fused, plain = small_pair(dropout=0.0)
    ref_model = UNet(plain.config).double()
    ref_model.load_state_dict(plain.state_dict())
    x, t = inputs()
    for model, xx in ((fused, x), (plain, x), (ref_model, x.double())):
        model.train()
        model(xx, t).square().mean().backward()
    for (name, p), q, r in zip(fused.named_parameters(), plain.parameters(), ref_model.parameters()):
        assert p.grad is not None, f"no gradient reaches {name}"
        if name.endswith("to_k.bias"):
            # Softmax ignores a shift shared by all logits of a query, which is all a key bias adds: its
            # gradient is zero in exact arithmetic (in diffusers' model too).
            assert p.grad.abs().max() < 1e-6 * fused.conv_in.weight.grad.abs().max()
            continue
        assert p.grad.abs().max() > 0, f"the gradient of {name} is zero"
        assert_error_rule(p.grad.double(), q.grad.double(), r.grad, 1e-5)


class _LayoutRecorder(TorchDispatchMode):
    """Records every op that produces an activation-shaped (N, C>1, H, W>1) tensor NOT in ``memory_format``
    (views, and attention's (N, heads, HW, head_dim) internals, are not activations)."""

    def __init__(self, memory_format):
        super().__init__()
        self.memory_format, self.offenders = memory_format, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if (not func.is_view and "scaled_dot_product" not in str(func) and torch.is_tensor(o) and o.dim() == 4 and o.shape[1] > 1
                    and o.shape[2] * o.shape[3] > 1 and not o.is_contiguous(memory_format=self.memory_format)):
                self.offenders.append(str(func))
        return out


@pytest.mark.parametrize("fused", [True, False])
def test_channels_last_end_to_end(seed, fused):
    model = small_pair()[0 if fused else 1]
    x, t = inputs()
    with torch.no_grad():
        expected = model(x, t)
        model = model.to(memory_format=torch.channels_last)
        with _LayoutRecorder(torch.channels_last) as rec:
            out = model(x.contiguous(memory_format=torch.channels_last), t)
    assert rec.offenders == [], f"ops that left channels_last: {rec.offenders}"
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_contiguous_stays_contiguous(seed):
    model = small_pair()[0]
    x, t = inputs()
    with torch.no_grad(), _LayoutRecorder(torch.contiguous_format) as rec:
        model(x, t)
    assert rec.offenders == [], f"ops that left NCHW: {rec.offenders}"


def test_timestep_forms(seed):
    model = small_pair()[0]
    x, _ = inputs()
    with torch.no_grad():
        full = model(x, torch.full((3,), 417))
        for t in (417, torch.tensor(417), torch.tensor([417]), torch.full((3,), 417.0)):
            torch.testing.assert_close(model(x, t), full, rtol=0, atol=0)


def test_precomputed_time_projections(seed):
    fused, _ = small_pair()
    x, t = inputs(3)
    with torch.no_grad():
        ref = fused(x, t)
        proj = fused.time_projections(t)
        assert proj.shape == (3, sum(b.time_emb_proj.out_features for b in fused._resnets()))
        torch.testing.assert_close(fused(x, None, time_proj=proj), ref, rtol=0, atol=0)
        # one row shared by the batch (the sampler's case: a reverse step's samples share t)
        t1 = torch.full((3,), int(t[0]))
        torch.testing.assert_close(fused(x, None, time_proj=fused.time_projections(t1[:1])), fused(x, t1),
                                   rtol=1e-5, atol=1e-5)  # a 1-row matmul rounds differently
        with pytest.raises(ValueError, match="time_proj must be"):
            fused(x, None, time_proj=proj[:, :-1])
        with pytest.raises(ValueError, match="time_proj must be"):
            fused(x, None, time_proj=proj[:2])


def test_dropout_only_in_train_mode(seed):
    model = small_pair(dropout=0.5)[0]
    x, t = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t), model(x, t))
        model.train()
        assert not torch.equal(model(x, t), model(x, t))


def test_learned_variance_output():
    model = UNet.preset("tiny", out_channels=2)
    assert model.diffusion.variance == "learned_range"
    assert model(*inputs(2, 1, 8)).shape == (2, 2, 8, 8)


@pytest.mark.parametrize("x_shape, t, match", [
    ((2, 2, 8, 8), None, r"x must be \(N, 3, H, W\), got \(2, 2, 8, 8\)"),
    ((2, 3, 16), None, r"x must be \(N, 3, H, W\)"),
    ((2, 3, 6, 8), None, r"H and W must be divisible by 4 \(3 levels\), got \(6, 8\)"),
    ((2, 3, 8, 8), torch.zeros(3, dtype=torch.long), r"t must be \(N,\) = \(2,\)"),
    ((2, 3, 8, 8), torch.zeros(2, 1, dtype=torch.long), r"t must be \(N,\)"),
    ((2, 3, 8, 8), torch.zeros(2, dtype=torch.bool), r"t must hold integer"),
    ((2, 3, 8, 8), "5", r"t must be a tensor or a number"),
])
def test_bad_inputs(x_shape, t, match):
    model = small_pair()[0]
    t = torch.zeros(2, dtype=torch.long) if t is None else t
    with pytest.raises((ValueError, TypeError), match=match):
        model(torch.randn(x_shape), t)


def test_integer_input_rejected():
    with pytest.raises(TypeError, match="x must be a float tensor"):
        small_pair()[0](torch.zeros(2, 3, 8, 8, dtype=torch.long), 3)


@pytest.mark.parametrize("overrides, match", [
    (dict(ch=20, num_groups=8), r"num_groups=8: 20 channels .* not divisible into 8 groups"),
    (dict(image_size=18), r"image_size=18: must be divisible by 2\*\*\(levels-1\) = 4"),
    (dict(attn_resolutions=(5,)), r"attn_resolutions=\(5,\): resolution 5 is not present; .* \[8, 4, 2\]"),
    (dict(attn_head_dim=12), r"attn_head_dim=12: .* 32 channels, not divisible into heads of 12"),
    (dict(ch_mult=()), r"ch_mult=\(\): must be a non-empty tuple"),
    (dict(ch_mult=(1, 0)), r"ch_mult=\(1, 0\)"),
    (dict(dropout=1.0), r"dropout=1.0: must be in \[0, 1\)"),
    (dict(downsample_padding=2), r"downsample_padding=2"),
    (dict(in_channels=0), r"in_channels=0: must be a positive int"),
    (dict(norm_eps=0.0), r"norm_eps=0.0: must be > 0"),
])
def test_bad_configs(overrides, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig(**{**SMALL, **overrides})


def test_diffusion_must_fit_the_network():
    config = UNetConfig(**SMALL)
    with pytest.raises(ValueError, match=r"image_shape=\(1, 8, 8\) does not fit the U-Net \(in_channels=3"):
        UNet(config, DiffusionConfig(image_shape=(1, 8, 8)))
    with pytest.raises(ValueError, match=r"out_channels=3: .*'learned_range' needs out_channels=6"):
        UNet(config, DiffusionConfig(variance="learned_range", image_shape=(3, 8, 8)))
    with pytest.raises(TypeError, match="expected a UNetConfig"):
        UNet(dict(SMALL))


def test_config_dict_round_trip():
    config = UNetConfig(**SMALL)
    d = config.to_dict()
    assert d["ch_mult"] == [1, 2, 2]
    assert UNetConfig.from_dict(d) == config
    with pytest.raises(ValueError, match=r"no field\(s\) \['bogus'\]"):
        UNetConfig.from_dict({**d, "bogus": 1})
    assert dataclasses.replace(config, fused=False).to_dict()["fused"] is False


@pytest.mark.slow
def test_torch_compile(seed):
    """torch.compile with Inductor and fullgraph (the fused op must not break the graph). Compiling takes 1-3
    minutes on this 2-core CPU: the tiny preset trimmed to two levels, inference only, keeps it at the low end."""
    torch._dynamo.reset()
    model = UNet.preset("tiny", ch_mult=(1, 2)).eval()
    compiled = torch.compile(model, fullgraph=True)
    x, t = inputs(4, 1, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t), model(x, t), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_cuda_fused_matches_plain_bf16_channels_last(seed):
    fused, plain = (m.cuda().to(memory_format=torch.channels_last) for m in small_pair())
    x, t = (v.cuda() for v in inputs(8))
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = plain(x, t)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, naive = fused(x, t), plain(x, t)
        with _LayoutRecorder(torch.channels_last) as rec, torch.autocast("cuda", dtype=torch.bfloat16):
            fused(x, t)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_error_rule(out.float(), naive.float(), ref, 1e-3)
    # PyTorch's CUDA GroupNorm returns NCHW; only the attention's (plain) GroupNorm may do that here.
    assert [op for op in rec.offenders if "native_group_norm" not in op] == []


@pytest.mark.gpu
def test_cuda_forward_is_graph_capturable(seed):
    """No host syncs in forward: it replays inside a CUDA graph (what the sampler captures)."""
    model = UNet.preset("tiny").cuda().eval()
    x, t = (v.cuda() for v in inputs(4, 1, 8))
    with torch.no_grad():
        expected = model(x, t)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(x, t)  # warm-up on the side stream
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x, t)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(out, model(x, t), rtol=1e-4, atol=1e-5)
    assert not torch.equal(out, expected)
