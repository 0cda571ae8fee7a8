"""The sampler, steps and spacing flags of `ddpm-fast sample`, `eval` and `bench`."""
import json

import numpy as np
import pytest
import torch

import ddpm_fast
from ddpm_fast.bench.config import BENCH_SAMPLERS, BENCH_SPACINGS, BenchConfig
from ddpm_fast.cli import main
from ddpm_fast.cli.common import SAMPLER_CHOICES, SPACING_CHOICES
from ddpm_fast.diffusion import SAMPLERS
from ddpm_fast.diffusion.config import DEFAULT_STEPS
from ddpm_fast.diffusion.schedule import SPACINGS
from ddpm_fast.sampling import last_run_info

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_flag_choices_are_the_library_names():
    """The CLI spells the names out (its --help imports no torch): they must stay the library's."""
    assert SAMPLER_CHOICES == SAMPLERS == BENCH_SAMPLERS
    assert SPACING_CHOICES == SPACINGS == BENCH_SPACINGS


@pytest.mark.parametrize("sampler,extra", [("dpmpp_2m", ["--steps", "6"]), ("unipc", ["--steps", "5", "--spacing",
                                                                                       "trailing"]),
                                           ("dpmpp_2m_sde", [])])
def test_sample_with_a_solver_writes_what_the_library_samples(tmp_path, model_file, capsys, sampler, extra):
    npz = tmp_path / "s.npz"
    argv = ["sample", "--checkpoint", model_file, "--n", "3", "--sampler", sampler, "--seed", "5", "--device",
            "cpu", "--out", str(tmp_path / "g.png"), "--npz", str(npz), "--no-progress", *extra]
    assert main(argv) == 0
    steps = int(extra[1]) if extra else DEFAULT_STEPS[sampler]
    assert f"({last_run_info()['steps']} {sampler} steps" in capsys.readouterr().out
    spacing = extra[3] if len(extra) > 2 else None
    want = ddpm_fast.sample(ddpm_fast.load(model_file), 3, steps if extra else None, sampler=sampler,
                            spacing=spacing, seed=5, progress=False)
    np.testing.assert_allclose(np.load(npz)["images"], want.numpy(), rtol=0, atol=1e-6)


def test_bad_sampler_flags_fail_clearly(tmp_path, model_file, capsys):
    base = ["sample", "--checkpoint", model_file, "--n", "2", "--device", "cpu", "--out", str(tmp_path / "g.png")]
    assert main(base + ["--sampler", "dpmpp_3m", "--steps", "2"]) == 2
    assert "order 3: it needs at least 3 steps, got 2" in capsys.readouterr().err
    assert main(base + ["--sampler", "unipc", "--eta", "0.5"]) == 2
    assert "eta applies to sampler='ddim' only" in capsys.readouterr().err
    for bad in (["--sampler", "euler"], ["--spacing", "uniform"]):
        with pytest.raises(SystemExit) as exc:
            main(base + bad)
        assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def test_eval_records_sampler_steps_and_spacing(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "scores.json"
    assert main(["eval", "--dataset", "digits", "--n", "20", "--sampler", "unipc", "--steps", "50", "--spacing",
                 "logsnr", "--device", "cpu", "--json", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert scores["sampler"] == "unipc" and scores["spacing"] == "logsnr" and scores["steps"] == 49  # merged
    assert "(unipc, 49 steps" in capsys.readouterr().out
    assert main(["eval", "--dataset", "digits", "--n", "20", "--sampler", "dpmpp_3m", "--steps", "2"]) == 2
    assert "needs at least 3 steps" in capsys.readouterr().err


def test_bench_runs_every_sampler_on_every_variant_it_can():
    from ddpm_fast.bench.sampling import Models, make_variant
    pytest.importorskip("diffusers")
    with pytest.raises(ValueError):
        BenchConfig(sampler="euler").resolved()  # argparse refuses it first; the dataclass has choices metadata
    models = Models("tiny", "fp32", "cpu", seed=0)
    for sampler in SAMPLERS:
        for name in ("eager", "eager+diffusers-step", "diffusers", "ddpm_fast"):
            fn = make_variant(name, models, 2, 3, seed=0, sampler=sampler)
            if isinstance(fn, str):
                assert sampler != "ddpm" and name != "ddpm_fast", fn
                continue
            with torch.inference_mode():
                out = fn()
            assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all(), (sampler, name)
