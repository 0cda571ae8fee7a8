"""pytest-benchmark smoke suite for the sampling and training benchmarks (CI: `pytest benchmarks
--benchmark-disable`, each case once, so the harness cannot rot). Tiny settings; the real tables come from
`ddpm-fast bench` (ddpm_fast/bench/) and benchmarks/bench_train.py.

    pytest benchmarks/test_bench_sampling.py --benchmark-only      # timed, on this machine
"""
import importlib.util
import json
import os

import pytest
import torch

from ddpm_fast.cli import main as cli_main
from ddpm_fast.bench.config import BenchConfig

HERE = os.path.dirname(os.path.abspath(__file__))
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
CPU_VARIANTS = ["eager", "eager+diffusers-step", "diffusers", "ddpm_fast"]
GPU_VARIANTS = ["eager", "ddpm_fast-whole", "ddpm_fast-step", "ddpm_fast-eager"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny work runs best on one thread; with two on a loaded 2-core machine every op's parallel region waits
    for a descheduled thread (10-50x slower measured here), which would only make these smoke tests slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _script(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_models():
    from ddpm_fast.bench.sampling import Models
    return {dev: Models("tiny", "fp32", dev, seed=0) for dev in ("cpu", "cuda") if
            dev == "cpu" or torch.cuda.is_available()}


@pytest.mark.parametrize("device, variant", [("cpu", v) for v in CPU_VARIANTS] +
                         [pytest.param("cuda", v, marks=pytest.mark.gpu) for v in GPU_VARIANTS])
def test_sampling_variant(benchmark, tiny_models, device, variant):
    """One sampling call of each variant: 2 images, 3 steps, the same weights."""
    from ddpm_fast.bench.sampling import make_variant
    fn = make_variant(variant, tiny_models[device], 2, 3, seed=0)
    if isinstance(fn, str):
        pytest.skip(fn)
    with torch.inference_mode():
        out = benchmark(fn)
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_models_share_weights(tiny_models):
    m = tiny_models["cpu"]
    plain, fused = m.plain.state_dict(), m.fused.state_dict()
    assert plain.keys() == fused.keys() and all(torch.equal(plain[k], fused[k]) for k in plain)


def test_bench_end_to_end(tmp_path, capsys):
    """The harness: JSON with environment, rows with median/spread/speedups, targets; a table on stdout; a plot."""
    status = cli_main(["bench", "--quick", "--variants", "eager,ddpm_fast", "--batches", "1", "--steps", "2",
                         "--repeats", "2", "--out-dir", str(tmp_path), "--profile", "ddpm_fast", "--threads", "1"])
    assert status == 0
    (path,) = tmp_path.glob("*-quick.json")
    results = json.loads(path.read_text())
    assert results["complete"] and not results["failures"]
    assert {"device", "torch", "triton", "git_commit", "threads", "date"} <= set(results["meta"])
    assert results["matmul"]["tflops"] > 0 and results["gflops_per_image"]["tiny"] > 0
    rows = {r["variant"]: r for r in results["rows"]}
    assert set(rows) == {"eager", "ddpm_fast"} and rows["eager"]["speedup_vs_eager"] == 1.0
    for r in rows.values():
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["repeats"] == 2 and r["images_per_s"] > 0
    assert results["targets"] and results["targets"][0]["status"] in ("met", "MISSED")
    assert results["profiles"] and "Self CPU" in results["profiles"][0]["table"]
    out = capsys.readouterr().out
    assert "| tiny | fp32 | 1 | 2 | ddpm_fast |" in out and "Targets:" in out
    pytest.importorskip("matplotlib")
    png = _script("plot").plot(results, str(tmp_path / "plot.png"))
    assert os.path.getsize(png) > 1000


def test_bench_train_smoke(tmp_path):
    status = _script("bench_train").main(["--quick", "--batch", "2", "--burst", "1", "--repeats", "1",
                                          "--warmup", "0", "--threads", "1", "--out-dir", str(tmp_path)])
    assert status == 0
    (path,) = tmp_path.glob("train-*-quick.json")
    rows = {r["variant"]: r for r in json.loads(path.read_text())["rows"]}
    assert rows["plain eager"]["speedup_vs_plain"] == 1.0 and rows["ddpm_fast eager"]["ms_per_step"] > 0


def test_config_defaults_and_policy():
    cpu = BenchConfig(device="cpu").resolved()
    assert cpu.all_cases()[:2] == [("tiny", "fp32", 1, 20), ("tiny", "fp32", 16, 20)]
    cases = cpu.all_cases()
    assert ("ddpm_cifar10", "fp32", 1, 20) in cases and ("ddpm_cifar10", "fp32", 16, 20) not in cases
    assert "compile" in cpu.variants_for("tiny", 1) and "compile-ro" not in cpu.variants_for("tiny", 1)
    assert not set(cpu.variants_for("ddpm_cifar10", 1)) & {"compile", "compile-ro"}
    gpu = BenchConfig(device="cuda", compile_batches=(1,)).resolved()
    assert {"compile", "compile-ro"} <= set(gpu.variants_for("ddpm_cifar10", 1))
    assert "compile" not in gpu.variants_for("ddpm_cifar10", 128) and len(gpu.all_cases()) == 32
    assert "compile" not in BenchConfig(compile="none").resolved().variants_for("tiny", 1)


@pytest.mark.parametrize("kw, words", [
    (dict(variants=("eagre",)), "unknown ['eagre']"),
    (dict(variants=("ddpm_fast-whole",)), "GPU variants"),
    (dict(device="cuda", variants=("ddpm_fast",)), "on a GPU"),
    (dict(batches=(0,)), "positive"),
    (dict(presets=("huge",)), "unknown ['huge']"),
    (dict(repeats=0), "repeats"),
])
def test_config_errors(kw, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        BenchConfig(**kw).resolved()


def test_cli_flags_come_from_the_config(capsys):
    with pytest.raises(SystemExit):
        cli_main(["bench", "--help"])
    text = capsys.readouterr().out
    for flag in ("--presets", "--batches", "--steps", "--dtypes", "--variants", "--compile", "--skip-compile",
                 "--repeats", "--out-dir", "--profile", "--quick"):
        assert flag in text
    with pytest.raises(SystemExit):
        cli_main(["bench", "--batches", "1,x"])
    assert "comma-separated integers" in capsys.readouterr().err


def test_cases_and_time_budget(tmp_path):
    """Explicit cases keep their order; with the budget spent every case is listed as skipped, not run."""
    assert BenchConfig(cases=("tiny:fp32:2:3", "tiny:bf16:1:4")).resolved().all_cases() == \
        [("tiny", "fp32", 2, 3), ("tiny", "bf16", 1, 4)]
    status = cli_main(["bench", "--quick", "--cases", "tiny:fp32:1:2,tiny:fp32:2:2", "--variants", "eager",
                         "--time-budget", "0", "--threads", "1", "--out-dir", str(tmp_path)])
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    assert status == 0 and [(r["batch"], r["variant"]) for r in rows] == [(1, "*"), (2, "*")]
    assert all("time budget" in r["skipped"] for r in rows)
