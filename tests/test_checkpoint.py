"""ddpm_fast.save / load: round trips, atomic writes, and clear errors for bad files."""
import json
import os

import pytest
import torch

import ddpm_fast
from ddpm_fast import checkpoint
from ddpm_fast.models import UNet


def _tiny(**overrides):
    model = UNet.preset("tiny", ch=8, num_groups=4, **overrides)
    with torch.no_grad():  # random weights everywhere (the zero-init biases would hide a bad copy)
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("fused", [True, False])
def test_round_trip_same_outputs(tmp_path, seed, fused):
    model = _tiny().eval()
    path = ddpm_fast.save(model, tmp_path / "m.safetensors", info={"note": "test"})
    loaded = ddpm_fast.load(path, fused=fused)
    assert not loaded.training and loaded.config.fused is fused
    assert loaded.config == UNet.preset("tiny", ch=8, num_groups=4, fused=fused).config
    assert loaded.diffusion == model.diffusion
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x, t = torch.randn(3, 1, 8, 8), torch.randint(0, 1000, (3,))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), model(x, t), rtol=1e-5, atol=1e-5)


def test_save_unwraps_and_loads_run_directory(tmp_path):
    model = _tiny()
    wrapped = torch.nn.Module()
    wrapped.module = model  # what DDP looks like to save()
    ddpm_fast.save(wrapped, tmp_path / checkpoint.RUN_MODEL)
    loaded = ddpm_fast.load(tmp_path)  # a run directory -> its model.safetensors
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_save_rejects_non_unet(tmp_path):
    with pytest.raises(TypeError, match="UNet"):
        ddpm_fast.save(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())  # nothing written


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        ddpm_fast.load(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="neither"):
        ddpm_fast.load(tmp_path)


def test_missing_default_model_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoint, "DEFAULT_MODEL", str(tmp_path / "default_digits.safetensors"))
    with pytest.raises(FileNotFoundError, match="bundled default model"):
        ddpm_fast.load()


@pytest.mark.parametrize("keep", [0, 7, 100, -50])
def test_truncated_or_garbage_file(tmp_path, keep):
    path = ddpm_fast.save(_tiny(), tmp_path / "m.safetensors")
    data = open(path, "rb").read()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:keep] if keep else os.urandom(5000))
    with pytest.raises(ValueError, match="bad.safetensors.*(truncated or corrupt|format)"):
        ddpm_fast.load(bad)


def test_foreign_safetensors_file(tmp_path):
    from safetensors.torch import save_file
    path = str(tmp_path / "foreign.safetensors")
    save_file({"w": torch.randn(2)}, path)
    with pytest.raises(ValueError, match="foreign.safetensors has format None"):
        ddpm_fast.load(path)


def test_weights_that_do_not_fit_the_config(tmp_path):
    small, big = _tiny(), UNet.preset("tiny", ch=16, num_groups=4)
    meta = checkpoint.model_metadata(big)  # says ch=16, but the tensors are ch=8
    path = str(tmp_path / "mismatch.safetensors")
    checkpoint.write_safetensors(path, small.state_dict(), meta)
    with pytest.raises(ValueError, match="mismatch.safetensors.*shape mismatches"):
        ddpm_fast.load(path)
    state = small.state_dict()
    state.pop("conv_in.weight")
    checkpoint.write_safetensors(path, state, checkpoint.model_metadata(small))
    with pytest.raises(ValueError, match=r"missing \['conv_in.weight'\]"):
        ddpm_fast.load(path)


def test_bad_metadata(tmp_path):
    model = _tiny()
    path = str(tmp_path / "meta.safetensors")
    meta = checkpoint.model_metadata(model)
    checkpoint.write_safetensors(path, model.state_dict(), {**meta, "unet_config": "{not json"})
    with pytest.raises(ValueError, match="unet_config.*not valid JSON"):
        ddpm_fast.load(path)
    cfg = json.loads(meta["unet_config"])
    cfg["ch_mult"] = []
    checkpoint.write_safetensors(path, model.state_dict(), {**meta, "unet_config": json.dumps(cfg)})
    with pytest.raises(ValueError, match="configs are invalid.*ch_mult"):
        ddpm_fast.load(path)


def test_atomic_write_keeps_old_file_when_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    old = _tiny()
    ddpm_fast.save(old, path)
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("simulated crash between write and rename")

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        ddpm_fast.save(_tiny(), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # the temp file was removed
    loaded = ddpm_fast.load(path)
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), loaded.state_dict().values()))


@pytest.mark.usefixtures("one_thread")
def test_bundled_default_model_loads_and_samples():
    """The committed default (trained with `ddpm-fast train`, see README) loads with no path and samples."""
    model = ddpm_fast.load()
    assert not model.training and model.config.image_size == 8 and model.config.in_channels == 1
    assert model.diffusion.T == 1000 and model.diffusion.image_shape == (1, 8, 8)
    assert os.path.getsize(checkpoint.DEFAULT_MODEL) < 20 * 2 ** 20
    x = ddpm_fast.sample(model, 128, steps=50, seed=0, progress=False)
    assert x.shape == (128, 1, 8, 8) and x.dtype == torch.float32
    assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
    # against the data it was trained on: its samples' mean image is the digits' mean image within 3 standard
    # errors (averaged over pixels; a perfect sampler gives ~0.8). Measured ~0.9; an untrained U-Net: ~13.
    from ddpm_fast.data import load_dataset
    data = load_dataset("digits", "train")
    real = data.batch(torch.arange(len(data)))
    gap = (x.mean(0) - real.mean(0)).abs().mean().item()
    standard_error = (real.std(0) / len(x) ** 0.5).mean().item()
    assert gap < 3 * standard_error, (gap, standard_error)


def test_resumed_optimizer_state_takes_the_parameters_layout(tmp_path, seed):
    """On CUDA the model is channels_last and AdamW fused, which requires moments laid out like the params; a
    checkpoint stores them contiguous. After restoring, every moment has its parameter's strides (and values)."""
    def setup():
        model = _tiny().to(memory_format=torch.channels_last)
        names = [n for n, _ in model.named_parameters()]
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3), names

    model, opt, names = setup()
    model(torch.randn(2, 1, 8, 8), torch.tensor([3, 500])).square().mean().backward()
    opt.step()
    assert any(p.dim() == 4 and not p.is_contiguous() for p in model.parameters())  # channels_last weights
    path = str(tmp_path / "ckpt.safetensors")
    checkpoint.write_training_checkpoint(path, model, {}, opt, names, {"step": 1, "train_config": {}})
    tensors, meta = checkpoint.read_training_checkpoint(path)
    model2, opt2, _ = setup()
    checkpoint.restore_optimizer(opt2, checkpoint.split_prefixed(tensors, "optim"), meta["state"]["optimizer"],
                                 names, path)
    for p, p_saved in zip(model2.parameters(), model.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            got, want = opt2.state[p][key], opt.state[p_saved][key]
            assert got.stride() == p.stride(), key
            assert torch.equal(got, want)


def test_bundled_models_by_name(tmp_path, monkeypatch, capsys):
    """load("digits-cond") is the bundled class-conditional model, load() and load("digits") the unconditional
    default; a file or directory of that name, when one exists, wins over the name."""
    cond = ddpm_fast.load("digits-cond")
    assert cond.config.num_classes == 10 and cond.null_label == 10 and not cond.training
    assert cond.config.image_size == 8 and cond.diffusion.image_shape == (1, 8, 8)
    default = ddpm_fast.load()
    assert default.config.num_classes is None
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(),
                                                  ddpm_fast.load("digits").state_dict().values()))
    x = ddpm_fast.sample(cond, 3, steps=5, seed=0, progress=False)  # unconditional: the null label
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
    monkeypatch.chdir(tmp_path)
    local = _tiny()
    ddpm_fast.save(local, "digits-cond")
    assert ddpm_fast.load("digits-cond").config == local.config
    os.remove("digits-cond")
    from ddpm_fast.cli import main
    assert main(["sample", "--checkpoint", "digits-cond", "--n", "2", "--steps", "3", "--seed", "0",
                 "--device", "cpu", "--out", "s.png", "--no-progress"]) == 0
    assert "wrote 2 samples" in capsys.readouterr().out and os.path.isfile("s.png")
    monkeypatch.setattr(checkpoint, "ASSETS", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"bundled model 'digits-cond' \(.*digits_cond.safetensors\) is "
                                                r"missing"):
        ddpm_fast.load("digits-cond")
    with pytest.raises(FileNotFoundError, match="digits-cnd: no such file"):
        ddpm_fast.load("digits-cnd")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_load_on_cuda_without_cuda_is_the_same_clean_error_as_sample():
    with pytest.raises(ValueError, match="device='cuda' but CUDA is not available") as from_load:
        ddpm_fast.load(device="cuda")
    with pytest.raises(ValueError) as from_sample:
        ddpm_fast.sample(ddpm_fast.load(), 1, 2, device="cuda", progress=False)
    assert str(from_load.value) == str(from_sample.value)
    with pytest.raises(TypeError, match="device must be a torch.device or a string"):
        ddpm_fast.load(device=1.5)

