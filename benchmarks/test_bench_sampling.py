"""pytest-benchmark smoke suite for the sampling and training benchmarks (CI: `pytest benchmarks
--benchmark-disable`, each case once, so the harness cannot rot). Tiny settings; the real tables come from
`ddpm-fast bench` (ddpm_fast/bench/) and benchmarks/bench_train.py.

    pytest benchmarks/test_bench_sampling.py --benchmark-only      # timed, on this machine
"""
import json
import os

import pytest
import torch

from ddpm_fast.cli import main as cli_main
from ddpm_fast.bench.config import BenchConfig

HERE = os.path.dirname(os.path.abspath(__file__))
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
CPU_VARIANTS = ["eager", "eager-cl", "eager+diffusers-step", "diffusers", "ddpm_fast"]
GPU_VARIANTS = ["eager", "eager-cl", "ddpm_fast-whole", "ddpm_fast-step", "ddpm_fast-eager"]
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py



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


def test_ddpm_fast_runs_at_the_benchmarks_thread_count(tiny_models):
    """Every variant runs at the thread count the benchmark set: sample's "auto" rule (one thread for a small
    model) must not quietly give ddpm_fast other threads than the baselines."""
    from ddpm_fast.bench.sampling import make_variant
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        fn = make_variant("ddpm_fast", tiny_models["cpu"], 2, 3, seed=0)
        fn()
        assert fn.threads == 2
    finally:
        torch.set_num_threads(before)


def test_models_share_weights(tiny_models):
    m = tiny_models["cpu"]
    plain, fused = m.plain.state_dict(), m.fused.state_dict()
    assert plain.keys() == fused.keys() and all(torch.equal(plain[k], fused[k]) for k in plain)


def test_bench_end_to_end(tmp_path, capsys, bench_script):
    """The harness: JSON with environment, rows with median/spread/speedups, targets; a table on stdout; a plot."""
    status = cli_main(["bench", "--quick", "--variants", "eager,ddpm_fast", "--batches", "1", "--steps", "2",
                       "--repeats", "2", "--out-dir", str(tmp_path), "--profile", "ddpm_fast", "--threads", "1",
                       "--allow-dirty"])
    assert status == 0
    (path,) = tmp_path.glob("*-quick.json")
    results = json.loads(path.read_text())
    assert results["complete"] and not results["failures"]
    assert {"device", "torch", "triton", "git_commit", "dirty", "allow_dirty", "threads", "date"} <= set(
        results["meta"])
    assert results["matmul"]["tflops"] > 0 and results["gflops_per_image"]["tiny"] > 0
    rows = {r["variant"]: r for r in results["rows"]}
    assert set(rows) == {"eager", "ddpm_fast"} and rows["eager"]["speedup_vs_eager"] == 1.0
    assert rows["ddpm_fast"]["best_plain"] == "eager" and rows["ddpm_fast"]["speedup_vs_best_plain"] > 0
    for r in rows.values():
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["repeats"] == 2 and r["images_per_s"] > 0
    assert results["targets"] and results["targets"][0]["status"] in ("met", "MISSED")
    assert results["profiles"] and "Self CPU" in results["profiles"][0]["table"]
    out = capsys.readouterr().out
    assert "| tiny | fp32 | 1 | 2 | ddpm_fast |" in out and "Targets:" in out
    pytest.importorskip("matplotlib")
    png = bench_script("plot").plot(results, str(tmp_path / "plot.png"))
    assert os.path.getsize(png) > 1000


def test_bench_train_smoke(tmp_path, bench_script):
    """Every row adds one piece to the row before it; the strong plain step is the ddpm_fast rows' baseline."""
    status = bench_script("bench_train").main(["--quick", "--batch", "2", "--burst", "1", "--repeats", "1",
                                          "--warmup", "0", "--threads", "1", "--out-dir", str(tmp_path),
                                          "--allow-dirty"])
    assert status == 0
    (path,) = tmp_path.glob("train-*-quick.json")
    rows = json.loads(path.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["plain", "plain strong", "plain strong + fused GN", "ddpm_fast eager"]
    by = {r["variant"]: r for r in rows}
    assert by["plain"]["speedup_vs_plain"] == 1.0 and by["plain strong"]["speedup_vs_strong_plain"] == 1.0
    assert by["plain"]["gain_of_piece"] is None and by["ddpm_fast eager"]["gain_of_piece"] > 0
    assert by["plain strong"]["gain_of_piece"] == pytest.approx(by["plain strong"]["speedup_vs_plain"])


def test_whole_step_compiled_baseline_samples_the_same_chain():
    seed = int.from_bytes(os.urandom(4), "little")
    """The strongest torch.compile baseline (model + update + randn compiled as one step) runs the plain loop's
    math: with the same torch.randn draws it gives the eager baseline's images. Run uncompiled here (the math,
    not the compiler: compiling costs minutes on 2 cores); the benchmark compiles it."""
    from ddpm_fast.bench.baseline import CompiledStepSampler, plain_sample
    from ddpm_fast.models import UNet
    torch.manual_seed(0)
    model = UNet.preset("tiny", fused=False).eval()
    sampler = CompiledStepSampler(model, 4)
    sampler.step = sampler._step  # the same function, eagerly
    torch.manual_seed(seed)
    ours = sampler.sample(3)
    torch.manual_seed(seed)
    torch.testing.assert_close(ours, plain_sample(model, 3, 4), rtol=1e-5, atol=1e-5)
    cl = model.to(memory_format=torch.channels_last)
    torch.manual_seed(seed)
    torch.testing.assert_close(plain_sample(cl, 3, 4, channels_last=True), ours, rtol=1e-4, atol=1e-4)


OUT_FLAG = {"cli": "--out-dir", "bench_train": "--out-dir", "bench_group_norm_silu": "--json",
            "bench_diffusion_ops": "--out", "bench_capture": "--json", "bench_sample_to_dir": "--out-dir",
            "bench_guidance": "--json"}


@pytest.mark.parametrize("script, argv", [
    ("cli", ["bench", "--quick", "--variants", "eager", "--batches", "1", "--steps", "2", "--repeats", "1"]),
    ("bench_train", ["--quick", "--repeats", "1"]), ("bench_group_norm_silu", ["--quick"]),
    ("bench_diffusion_ops", ["--quick"]), ("bench_capture", ["--dry-run"]),
    ("bench_sample_to_dir", ["--mode", "batches", "--device", "cpu", "--quick"]), ("bench_guidance", ["--quick"])])
def test_benchmarks_refuse_a_dirty_tree_and_unknown_code(tmp_path, monkeypatch, script, argv, bench_script):
    """Every results file names the commit it measured: uncommitted changes are refused before any work unless
    --allow-dirty (then recorded), and so is code whose commit cannot be told (no git, no DDPM_FAST_GIT_COMMIT)."""
    from ddpm_fast.bench import common as bc
    main = cli_main if script == "cli" else bench_script(script).main
    out = tmp_path / "out"
    argv = argv + [OUT_FLAG[script], str(out if OUT_FLAG[script] == "--out-dir" else out / "x.json")]
    monkeypatch.setenv("DDPM_FAST_GIT_COMMIT", "0123abc+dirty")
    with pytest.raises(SystemExit, match="uncommitted changes .*0123abc.*--allow-dirty"):
        main(argv)
    assert not out.exists()  # refused before any work
    monkeypatch.delenv("DDPM_FAST_GIT_COMMIT")
    monkeypatch.setattr(bc, "_repo_root", lambda: str(tmp_path))  # neither the package's directory
    monkeypatch.chdir(tmp_path)                                      # nor the working directory is a checkout
    with pytest.raises(SystemExit, match="cannot tell which commit"):
        main(argv + ["--allow-dirty"])
    assert not out.exists()


def test_allowed_dirty_tree_is_recorded(tmp_path, monkeypatch, bench_script):
    monkeypatch.setenv("DDPM_FAST_GIT_COMMIT", "0123abc+dirty")
    assert bench_script("bench_capture").main(["--dry-run", "--allow-dirty", "--json", str(tmp_path / "c.json")]) == 0
    meta = json.loads((tmp_path / "c.json").read_text())["meta"]
    assert (meta["git_commit"], meta["dirty"], meta["allow_dirty"]) == ("0123abc+dirty", True, True)
    monkeypatch.setenv("DDPM_FAST_GIT_COMMIT", "0123abc")
    from ddpm_fast.bench import common as bc
    assert bc.provenance(False) == {"git_commit": "0123abc", "dirty": False, "allow_dirty": False,
                                    "commit_source": "DDPM_FAST_GIT_COMMIT"}


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
    # the channels_last and whole-step baselines; reduce-overhead (CUDA graphs) never on the CPU
    assert {"eager-cl", "compile-cl", "compile-step"} <= set(cpu.variants_for("tiny", 1))
    assert "compile-step-ro" not in cpu.variants + tuple(cpu.variants_for("tiny", 1))
    assert {"compile-step", "compile-step-ro"} <= set(gpu.variants_for("ddpm_cifar10", 1))
    where = BenchConfig(device="cuda", compile_where=("compile-step-ro:bf16:1", "compile-step:bf16:128")).resolved()
    assert [v for v in where.variants_for("ddpm_cifar10", 1, "bf16") if v.startswith("compile")] == \
        ["compile-step-ro"]
    assert [v for v in where.variants_for("ddpm_cifar10", 128, "bf16") if v.startswith("compile")] == \
        ["compile-step"]
    assert not [v for v in where.variants_for("ddpm_cifar10", 1, "fp32") if v.startswith("compile")]


@pytest.mark.parametrize("kw, words", [
    (dict(variants=("eagre",)), "unknown ['eagre']"),
    (dict(variants=("ddpm_fast-whole",)), "GPU variants"),
    (dict(device="cuda", variants=("ddpm_fast",)), "on a GPU"),
    (dict(batches=(0,)), "positive"),
    (dict(presets=("huge",)), "unknown ['huge']"),
    (dict(repeats=0), "repeats"),
    (dict(compile_where=("compile-step:bf16",)), "not compile-variant:dtype:batch"),
    (dict(compile_where=("eager:bf16:1",)), "not compile-variant:dtype:batch"),
    (dict(variants=("ddpm_fast-whole-compile",)), "GPU variants"),
    (dict(device="cuda", variants=("ddpm_fast-compile",)), "on a GPU"),
])
def test_config_errors(kw, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        BenchConfig(**kw).resolved()


def test_compile_targets_read_the_ddpm_fast_compile_row():
    """The ddpm_fast + compile targets (docs/benchmarks.md) judge that row against the best compile variant."""
    from ddpm_fast.bench.sampling import targets

    def rows(preset, n, device, vs_compile, vs_eager):
        fast = "ddpm_fast-compile" if device == "cpu" else "ddpm_fast-whole-compile"
        return [dict(preset=preset, dtype="fp32", batch=n, steps=20, variant=fast, ms_per_step=1.0,
                     speedup_vs_best_compile=vs_compile, speedup_vs_eager=vs_eager)]

    def status(items, words):
        return [t["status"] for t in items if words in t["target"]]

    got = targets(rows("tiny", 16, "cpu", 1.06, 1.49), "cpu")
    assert status(got, ">= 1.05x the best torch.compile") == ["met"]
    assert status(got, ">= 1.5x eager") == ["MISSED"]
    assert status(targets(rows("ddpm_cifar10", 1, "cpu", 0.99, 2.0), "cpu"), "no slower") == ["MISSED"]
    assert status(targets(rows("ddpm_cifar10", 128, "cuda", 1.01, 2.0), "cuda"), "ahead of every") == ["met"]
    assert not status(targets(rows("tiny", 1, "cpu", 2.0, 2.0), "cpu"), "ddpm_fast + compile")


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
                         "--time-budget", "0", "--threads", "1", "--out-dir", str(tmp_path), "--allow-dirty"])
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    assert status == 0 and [(r["batch"], r["variant"]) for r in rows] == [(1, "*"), (2, "*")]
    assert all("time budget" in r["skipped"] for r in rows)


def test_gpu_suite_needs_out_and_commit(tmp_path):
    """The GPU machine has no .git: the suite takes the commit as an argument (its dry run may read it from git)."""
    import subprocess
    suite = os.path.join(HERE, "gpu_suite.sh")
    for argv in ([], [str(tmp_path), "abc", "extra"]):
        out = subprocess.run(["bash", suite, *argv], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "usage:" in out.stderr
    no_git = tmp_path / "copy"
    (no_git / "benchmarks").mkdir(parents=True)
    (no_git / "benchmarks" / "gpu_suite.sh").write_text(open(suite).read())
    out = subprocess.run(["bash", str(no_git / "benchmarks" / "gpu_suite.sh"), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert out.returncode == 2 and "no COMMIT given and no git repository" in out.stderr
