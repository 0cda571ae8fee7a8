"""Parity with diffusers' UNet2DModel (random weights, no download) and diffusers checkpoint import/export."""
import inspect
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMScheduler, UNet2DModel  # noqa: E402

from ddpm_fast.models import UNet  # noqa: E402
from ddpm_fast.models.diffusers import (DIFFUSERS_UNET2D_DEFAULTS, convert_diffusers_state_dict,  # noqa: E402
                                      diffusers_scheduler_config, unet_config_from_diffusers)

# google/ddpm-cifar10-32's UNet2DModel config.json, as published (fields newer than it take their defaults).
CIFAR10_CONFIG = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
CIFAR10_SCHEDULER = {"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear",
                     "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None,
                     "variance_type": "fixed_large"}
# The same architecture with fewer channels, for speed.
SMALL = {**CIFAR10_CONFIG, "block_out_channels": [16, 32, 32, 32], "norm_num_groups": 8}


def diffusers_model(config):
    """A UNet2DModel from a config.json-style dict, with every parameter randomized (norms off 1/0 too)."""
    model = UNet2DModel.from_config({k: v for k, v in config.items()})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def assert_parity(ours, ref, x, t, rel=1e-4, y=None):
    with torch.no_grad():
        expected = ref(x, t, class_labels=y).sample
        out = ours(x, t, y)
    err = (out - expected).abs().max() / expected.abs().max()
    assert err <= rel, f"relative error {err:.3g} > {rel}"


@pytest.mark.parametrize("fused", [True, False])
def test_parity_small_cifar10_config(seed, fused):
    ref = diffusers_model(SMALL)
    ours = UNet.from_diffusers(ref, fused=fused)
    assert ours.config.attn_resolutions == (16,) and not ours.training
    x = torch.randn(3, 3, 32, 32)
    assert_parity(ours, ref, x, torch.tensor([0, 517, 999]))


def test_parity_full_size_cifar10(seed):
    ref = diffusers_model(CIFAR10_CONFIG)
    ours = UNet.from_diffusers(ref)
    assert ours.config == UNet.preset("ddpm_cifar10", dropout=0.0).config  # the hub config has no dropout field
    assert_parity(ours, ref, torch.randn(1, 3, 32, 32), torch.tensor([int(torch.randint(0, 1000, ()))]))


@pytest.mark.parametrize("changes", [
    dict(flip_sin_to_cos=True, freq_shift=0),
    dict(downsample_padding=1),
    dict(attention_head_dim=8),
    dict(add_attention=False),
    dict(out_channels=6, time_embedding_dim=48, norm_eps=1e-5),
    dict(block_out_channels=[16, 32], down_block_types=["AttnDownBlock2D", "DownBlock2D"],
         up_block_types=["UpBlock2D", "AttnUpBlock2D"], sample_size=8, layers_per_block=1, in_channels=1,
         out_channels=1),
])
def test_parity_config_variants(seed, changes):
    config = {**SMALL, **changes}
    ref = diffusers_model(config)
    ours = UNet.from_diffusers(ref)
    size = config["sample_size"]
    assert_parity(ours, ref, torch.randn(2, config["in_channels"], size, size), torch.tensor([3, 871]))


def test_parity_channels_last_and_eval_dropout(seed):
    ref = diffusers_model({**SMALL, "dropout": 0.1})
    ours = UNet.from_diffusers(ref).to(memory_format=torch.channels_last)
    assert ours.config.dropout == 0.1
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    assert_parity(ours, ref, x, torch.tensor([10, 20]))


def test_to_diffusers_round_trip(seed):
    ours = UNet.preset("tiny", image_size=8).eval()
    ref = ours.to_diffusers()
    assert isinstance(ref, UNet2DModel) and not ref.training
    assert_parity(ours, ref, torch.randn(2, 1, 8, 8), torch.tensor([5, 600]))
    back = UNet.from_diffusers(ref)
    assert back.config == ours.config


@pytest.mark.parametrize("fused", [True, False])
def test_class_conditional_parity(seed, fused):
    """num_class_embeds = K + 1: K classes and the null label K, for random labels (every row used)."""
    ref = diffusers_model({**SMALL, "num_class_embeds": 11})
    ours = UNet.from_diffusers(ref, fused=fused)
    assert ours.config.num_classes == 10 and ours.null_label == 10
    assert torch.equal(ours.class_embedding.weight, ref.class_embedding.weight)
    x, t = torch.randn(6, 3, 32, 32), torch.randint(0, 1000, (6,))
    y = torch.randint(0, 11, (6,))
    y[int(torch.randint(0, 6, ()))] = 10
    assert_parity(ours, ref, x, t, y=y)
    with torch.no_grad():  # y = None is the null label
        torch.testing.assert_close(ours(x, t), ours(x, t, torch.full((6,), 10)), rtol=0, atol=0)
        assert_parity(ours, ref, x[:2], t[:2], y=torch.full((2,), 10))


def test_class_conditional_round_trip(seed, tmp_path):
    ours = UNet.preset("tiny", image_size=8, num_classes=3).eval()
    with torch.no_grad():
        ours.class_embedding.weight.add_(torch.randn_like(ours.class_embedding.weight))
    ref = ours.to_diffusers()
    assert (ref.config.num_class_embeds, ref.config.class_embed_type) == (4, None)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([5, 600, 999, 0]), torch.tensor([0, 1, 2, 3])
    assert_parity(ours, ref, x, t, y=y)
    assert UNet.from_diffusers(ref).config == ours.config
    ref.save_pretrained(tmp_path)
    back = UNet.from_diffusers_checkpoint(tmp_path)
    assert back.config == ours.config
    assert_parity(back, ref, x, t, y=y)


@pytest.mark.parametrize("safe", [True, False])
@pytest.mark.parametrize("layout", ["unet_dir", "pipeline"])
def test_checkpoint_round_trip(seed, tmp_path, safe, layout):
    ref = diffusers_model(SMALL)
    scheduler = DDPMScheduler.from_config(CIFAR10_SCHEDULER)
    unet_dir = tmp_path / "unet" if layout == "pipeline" else tmp_path
    ref.save_pretrained(unet_dir, safe_serialization=safe)
    scheduler.save_pretrained(tmp_path / "scheduler" if layout == "pipeline" else tmp_path)
    ours = UNet.from_diffusers_checkpoint(tmp_path)
    assert not ours.training
    d = ours.diffusion
    assert (d.schedule, d.T, d.beta_start, d.beta_end, d.prediction, d.variance, d.clip, d.image_shape) == \
        ("linear", 1000, 1e-4, 0.02, "eps", "fixed_large", True, (3, 32, 32))
    assert_parity(ours, ref, torch.randn(2, 3, 32, 32), torch.tensor([1, 998]))


def test_checkpoint_without_scheduler_has_no_diffusion(tmp_path):
    diffusers_model(SMALL).save_pretrained(tmp_path)
    assert UNet.from_diffusers_checkpoint(tmp_path).diffusion is None


def test_pre_2023_attention_key_names(seed, tmp_path):
    """Checkpoints written by early diffusers (such as the hub's google/ddpm-* .bin files) say query/key/value/
    proj_attn for to_q/to_k/to_v/to_out.0."""
    ref = diffusers_model(SMALL)
    old = {}
    for k, v in ref.state_dict().items():
        for new, legacy in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".{new}.", f".{legacy}.")
        old[k] = v
    assert any(".proj_attn." in k for k in old)
    assert convert_diffusers_state_dict(old).keys() == ref.state_dict().keys()
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    torch.save(old, tmp_path / "diffusion_pytorch_model.bin")
    assert_parity(UNet.from_diffusers_checkpoint(tmp_path), ref, torch.randn(1, 3, 32, 32), torch.tensor([7]))


def test_defaults_table_matches_installed_diffusers():
    signature = inspect.signature(UNet2DModel.__init__).parameters
    installed = {k: p.default for k, p in signature.items() if k != "self"}
    assert installed == DIFFUSERS_UNET2D_DEFAULTS


@pytest.mark.parametrize("field, value", [
    ("center_input_sample", True),
    ("time_embedding_type", "fourier"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("mid_block_scale_factor", 2),
    ("downsample_type", "resnet"),
    ("upsample_type", "resnet"),
    ("act_fn", "gelu"),
    ("class_embed_type", "timestep"),
    ("num_class_embeds", 1),
    ("num_class_embeds", 2.5),
    ("mid_block_type", None),
    ("norm_num_groups", None),
    ("attn_norm_num_groups", 4),
    ("downsample_padding", 2),
    ("sample_size", [32, 16]),
    ("block_out_channels", [16, 24, 32, 32]),
    ("attention_head_dim", 12),
    ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]),
    ("up_block_types", ["UpBlock2D", "SkipUpBlock2D", "AttnUpBlock2D", "UpBlock2D"]),
    ("up_block_types", ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"]),
    ("cross_attention_dim", 768),
])
def test_unsupported_config_fields(field, value):
    with pytest.raises(ValueError, match=field) as info:
        unet_config_from_diffusers({**SMALL, field: value})
    assert repr(value)[:10] in str(info.value) or str(value)[:10] in str(info.value)


@pytest.mark.parametrize("changes, expected", [
    ({}, dict(schedule="linear", prediction="eps", variance="fixed_large")),
    ({"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"},
     dict(schedule="cosine", prediction="v")),
    ({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "sample"},
     dict(schedule="scaled_linear", prediction="x0")),
    ({"beta_schedule": "sigmoid", "variance_type": "fixed_small_log", "num_train_timesteps": 500},
     dict(schedule="sigmoid", variance="fixed_small", T=500)),
    ({"trained_betas": [0.001 * (i + 1) for i in range(20)], "num_train_timesteps": 20}, dict(schedule="custom")),
])
def test_scheduler_config_mapping(tmp_path, changes, expected):
    """The mapped DiffusionConfig must describe the very betas diffusers' DDPMScheduler uses."""
    scheduler = DDPMScheduler.from_config({**CIFAR10_SCHEDULER, **changes})
    diffusers_model(SMALL).save_pretrained(tmp_path)
    scheduler.save_pretrained(tmp_path)
    diffusion = UNet.from_diffusers_checkpoint(tmp_path).diffusion
    for k, v in expected.items():
        assert getattr(diffusion, k) == v
    ours = torch.as_tensor(diffusion.make_schedule().betas, dtype=torch.float64)
    torch.testing.assert_close(ours, scheduler.betas.double(), rtol=1e-5, atol=1e-7)
    back = DDPMScheduler.from_config(diffusers_scheduler_config(diffusion))
    torch.testing.assert_close(back.betas, scheduler.betas)


def test_learned_range_needs_twice_the_channels():
    ref = diffusers_model({**SMALL, "block_out_channels": [8, 8, 8, 8]})
    with pytest.raises(ValueError, match=r"'learned_range' needs out_channels=6"):
        UNet.from_diffusers(ref, {**CIFAR10_SCHEDULER, "variance_type": "learned_range"})
    ok = UNet.from_diffusers(diffusers_model({**SMALL, "out_channels": 6}),
                             DDPMScheduler.from_config({**CIFAR10_SCHEDULER, "variance_type": "learned_range"}))
    assert ok.diffusion.variance == "learned_range"


@pytest.mark.parametrize("changes, field", [
    ({"thresholding": True}, "thresholding"),
    ({"variance_type": "learned"}, "variance_type"),
    ({"beta_schedule": "exponential"}, "beta_schedule"),
    ({"prediction_type": "flow"}, "prediction_type"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
])
def test_unsupported_scheduler_fields(changes, field):
    with pytest.raises(ValueError, match=f"{field}="):
        UNet.from_diffusers(diffusers_model({**SMALL, "block_out_channels": [8, 8, 8, 8]}),
                            {**CIFAR10_SCHEDULER, **changes})


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="directory not found: .*nowhere"):
        UNet.from_diffusers_checkpoint(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no UNet2DModel config.json in .* \(nor in .*unet\)"):
        UNet.from_diffusers_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors or .*"
                                                "diffusion_pytorch_model.bin"):
        UNet.from_diffusers_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        UNet.from_diffusers_checkpoint(tmp_path)


def test_weights_that_do_not_fit_the_config(tmp_path):
    diffusers_model(SMALL).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**SMALL, "layers_per_block": 1}))
    with pytest.raises(ValueError, match="do not fit the U-Net its config describes: unexpected keys"):
        UNet.from_diffusers_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**SMALL, "block_out_channels": [8, 32, 32, 32]}))
    with pytest.raises(ValueError, match=r"do not fit the U-Net its config describes: shape mismatch \['conv_in.weight \(16, 3, 3, 3\) "
                                                r"\(expected \(8, 3, 3, 3\)\)"):
        UNet.from_diffusers_checkpoint(tmp_path)


@pytest.mark.gpu
def test_cuda_parity_small_cifar10_config(seed):
    ref = diffusers_model(SMALL).cuda()
    ours = UNet.from_diffusers(ref)
    assert next(ours.parameters()).is_cuda
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # an fp32 comparison
    try:
        assert_parity(ours, ref, torch.randn(4, 3, 32, 32, device="cuda"), torch.tensor([0, 5, 500, 999], device="cuda"))
    finally:
        torch.backends.cudnn.allow_tf32 = True
