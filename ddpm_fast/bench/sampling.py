"""The measuring half of `ddpm-fast bench` (configuration and command line: bench/config.py).

For each case (preset, dtype, batch, steps) every variant samples ``batch`` images with ``steps`` steps from
the SAME weights; variants are timed interleaved (bench/common.time_interleaved). Rows report the median call
and its spread, ms per step, images/s, speedups against the eager baseline, the best torch.compile variant and
the best plain variant of all (what a user could run instead: eager or compiled, NCHW or channels_last), the
U-Net's achieved TFLOP/s against the measured matmul rate, peak memory (GPU), compile or capture time.
The JSON is rewritten after every case, so a run cut short by a timeout still leaves what it measured.
"""
import gc
import os
import sys
import time

import torch

from . import common as bc
from .baseline import CompiledStepSampler, PlainDiffusion, plain_sample
from .config import COMPILE_VARIANTS, PLAIN_VARIANTS, REDUCE_OVERHEAD, VARIANTS, BenchConfig

DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class Models:
    """The same random weights as a plain (fused=False) and a fused ddpm_fast UNet, plus the channels_last,
    compiled and diffusers versions of the plain one, built on first use. All in eval mode, in ``dtype`` on
    ``device``."""

    def __init__(self, preset, dtype_name, device, seed):
        from ..models import UNet
        self.preset, self.dtype_name = preset, dtype_name
        dtype = DTYPE[dtype_name]
        torch.manual_seed(seed)
        self.plain = UNet.preset(preset, fused=False).eval().to(device=device, dtype=dtype)
        self.fused = UNet.preset(preset, fused=True).eval()
        self.fused.load_state_dict(self.plain.state_dict())
        self.fused.to(device=device, dtype=dtype)
        self.device, self.dtype = torch.device(device), dtype
        self._compiled, self._pipeline, self._scheduler, self._plain_cl = {}, None, None, None

    def plain_cl(self):
        """The plain U-Net with channels_last weights (a copy: the NCHW one stays as it is)."""
        if self._plain_cl is None:
            import copy
            self._plain_cl = copy.deepcopy(self.plain).to(memory_format=torch.channels_last)
        return self._plain_cl

    def compiled(self, mode, channels_last=False):
        """torch.compile of the plain U-Net; static shapes (each batch size compiles its own graph, the fastest
        code torch.compile makes for it; the compile time shows in that case's first call)."""
        key = ("unet", mode, channels_last)
        if key not in self._compiled:
            model = self.plain_cl() if channels_last else self.plain
            self._compiled[key] = torch.compile(model, mode=mode, dynamic=False)
        return self._compiled[key]

    def compiled_step(self, mode, steps, channels_last=False):
        """The whole step compiled (baseline.CompiledStepSampler), one per (mode, steps, layout): the tables
        differ."""
        key = ("step", mode, steps, channels_last)
        if key not in self._compiled:
            model = self.plain_cl() if channels_last else self.plain
            self._compiled[key] = CompiledStepSampler(model, steps, mode=mode, channels_last=channels_last)
        return self._compiled[key]

    def scheduler(self, sampler="ddpm"):
        """diffusers' scheduler of ``sampler`` (DDPMScheduler for ddpm), configured like the model."""
        if self._scheduler is None or self._scheduler[0] != sampler:
            self._scheduler = (sampler, diffusers_scheduler(sampler, self.plain.diffusion))
        return self._scheduler[1]

    def pipeline(self, sampler="ddpm"):
        """DDPMPipeline with the same weights and a fresh scheduler of ``sampler``."""
        from diffusers import DDPMPipeline
        if self._pipeline is None or self._pipeline[0] != sampler:
            pipe = DDPMPipeline(unet=self.plain.to_diffusers().eval(),
                                scheduler=diffusers_scheduler(sampler, self.plain.diffusion))
            pipe.set_progress_bar_config(disable=True)
            self._pipeline = (sampler, pipe)
        return self._pipeline[1]


def diffusers_scheduler(sampler, diffusion):
    """The diffusers scheduler a user would pair with ``sampler`` (their defaults otherwise), from the model's
    training config (DDPM's config keys; the others ignore those they lack, e.g. clip_sample)."""
    import diffusers

    from ..models.diffusers import diffusers_scheduler_config
    config = diffusers_scheduler_config(diffusion)
    if sampler == "ddpm":
        return diffusers.DDPMScheduler.from_config(config)
    config.pop("variance_type")  # the solvers' variance_type means "the output has a variance half"
    if sampler == "ddim":
        return diffusers.DDIMScheduler.from_config(config)
    if sampler == "unipc":
        return diffusers.UniPCMultistepScheduler.from_config(config)
    extra = {"dpmpp_2m": {}, "dpmpp_3m": {"solver_order": 3},
             "dpmpp_2m_sde": {"algorithm_type": "sde-dpmsolver++"}}[sampler]
    return diffusers.DPMSolverMultistepScheduler.from_config({**config, **extra})


class FastSample:
    """ddpm_fast.sample as a variant; keeps the capture records of the call that captured and the graph modes."""

    def __init__(self, model, n, steps, seed, **kw):
        self.model, self.n, self.steps, self.seed, self.kw = model, n, steps, seed, kw
        self.captures, self.modes, self.compile_s = [], None, None

    def __call__(self):
        from ..sampling import last_run_info, sample
        # threads=None: the thread count the benchmark set for every variant (not sample's "auto" rule)
        out = sample(self.model, self.n, self.steps, seed=self.seed, batch_size=self.n, progress=False, threads=None,
                     **self.kw)
        info = last_run_info()
        self.captures = info["captures"] or self.captures
        self.modes, self.threads = sorted(set(info["modes"])), info["threads"]
        if info["compiles"]:  # the call that compiled (the benchmark's first call)
            self.compile_s = info["compile_s"]
        return out


def make_variant(name, models: Models, n, steps, seed, sampler="ddpm", spacing=None):
    """A zero-argument callable doing one full sampling call, or a string saying why it cannot run here.
    With a sampler other than ddpm, the baselines step with diffusers' scheduler of that sampler."""
    if name in REDUCE_OVERHEAD and models.device.type != "cuda":
        return "mode='reduce-overhead' only adds CUDA graphs: GPU only"
    if name.startswith("ddpm_fast"):
        kw = {"ddpm_fast": {}, "ddpm_fast-whole": {"cuda_graph": True, "graph": "whole"},
              "ddpm_fast-step": {"cuda_graph": True, "graph": "step"}, "ddpm_fast-eager": {"cuda_graph": False},
              "ddpm_fast-compile": {"compile": True},
              "ddpm_fast-whole-compile": {"cuda_graph": True, "graph": "whole", "compile": True}}[name]
        return FastSample(models.fused, n, steps, seed, sampler=sampler, spacing=spacing, **kw)
    if name in ("compile-step", "compile-step-ro", "compile-step-cl"):
        if sampler != "ddpm":
            return f"the compiled whole step is the DDPM step (for {sampler}: the compile variants)"
        compiled = models.compiled_step("reduce-overhead" if name == "compile-step-ro" else None, steps,
                                        channels_last=name == "compile-step-cl")
        return lambda: compiled.sample(n)
    cl = name.endswith("-cl")
    model = models.plain
    if name in ("eager", "eager-cl", "compile", "compile-ro", "compile-cl"):
        model = (models.plain_cl() if cl else models.plain) if name.startswith("eager") else models.compiled(
            "reduce-overhead" if name == "compile-ro" else None, channels_last=cl)
        if sampler == "ddpm":
            tables = PlainDiffusion.for_model(models.plain, steps, models.device)  # computed once, as a user would
            shape = models.plain.diffusion.image_shape
            return lambda: plain_sample(model, n, steps, diffusion=tables, shape=shape, channels_last=cl)
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return "diffusers is not installed" + ("" if sampler == "ddpm" else f" (the {sampler} baselines use it)")
    if name == "diffusers":
        if sampler == "unipc":
            return "DDPMPipeline passes generator= to step(), which UniPCMultistepScheduler does not take"
        pipe = models.pipeline(sampler)
        return lambda: pipe(batch_size=n, num_inference_steps=steps, output_type="pt").images
    if name == "eager+diffusers-step" and sampler != "ddpm":
        return f"the same as eager for sampler {sampler} (both step with diffusers' scheduler)"
    scheduler = models.scheduler(sampler)
    return lambda: plain_sample(model, n, steps, scheduler=scheduler, channels_last=cl)


def _flops_per_call(gflops_per_image, n, steps):
    return gflops_per_image * 1e9 * n * steps


def case_rows(case, timed, fns, skipped, gflops, matmul):
    """One row per variant of a case (see the module doc for the columns)."""
    preset, dtype, n, steps = case
    ok = {k: t.stats() for k, t in timed.items() if t.error is None and t.times_s}
    eager = ok.get("eager", {}).get("median")
    compiled = [ok[k]["median"] for k in COMPILE_VARIANTS if k in ok]
    best_compile = min(compiled) if compiled else None
    plain = {k: ok[k]["median"] for k in PLAIN_VARIANTS if k in ok}
    best_plain = min(plain, key=plain.get) if plain else None
    rows = []
    for name, t in timed.items():
        row = {"preset": preset, "dtype": dtype, "batch": n, "steps": steps, "variant": name,
               "first_call_s": t.first_call_s, "error": t.error}
        if name in ok:
            s = ok[name]
            med = s["median"]
            row.update({f"{k}_ms": v * 1e3 for k, v in s.items()})
            row.update(ms_per_step=med * 1e3 / steps, ms_per_step_min=s["min"] * 1e3 / steps,
                       ms_per_step_max=s["max"] * 1e3 / steps, images_per_s=n / med, repeats=len(t.times_s),
                       speedup_vs_eager=eager / med if eager else None,
                       speedup_vs_best_compile=best_compile / med if best_compile else None,
                       speedup_vs_best_plain=plain[best_plain] / med if best_plain else None, best_plain=best_plain,
                       tflops=_flops_per_call(gflops, n, steps) / med / 1e12)
            row["pct_of_matmul"] = 100 * row["tflops"] / matmul["tflops"] if matmul else None
            if name in COMPILE_VARIANTS and t.first_call_s is not None:
                row["compile_s"] = max(t.first_call_s - med, 0.0)
        if t.peak_bytes is not None:
            row.update(peak_mib=t.peak_bytes / 2 ** 20, resident_mib=t.resident_bytes / 2 ** 20)
        fn = fns.get(name)
        if isinstance(fn, FastSample):
            row["graph_modes"], row["threads"] = fn.modes, fn.threads
            if fn.compile_s is not None:
                row["compile_s"] = fn.compile_s
            if fn.captures:
                row["capture_s"] = sum(c["capture_s"] for c in fn.captures)
                row["graph_mib"] = sum(c["graph_bytes"] for c in fn.captures) / 2 ** 20
        rows.append(row)
    rows += [{"preset": preset, "dtype": dtype, "batch": n, "steps": steps, "variant": k, "skipped": why}
             for k, why in skipped.items()]
    return rows


def profile_variant(fn, device, row_limit=14) -> str:
    """torch.profiler's table of one call, sorted by the time spent in each op itself."""
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=row_limit, max_name_column_width=48)


def run_case(config: BenchConfig, models: Models, case, gflops, matmul, results):
    preset, dtype, n, steps = case
    log(f"case {preset} {dtype} batch {n} steps {steps}")
    fns, skipped = {}, {}
    for name in config.variants_for(preset, n, dtype):
        try:
            made = make_variant(name, models, n, steps, config.seed, config.sampler, config.spacing)
        except Exception as err:  # noqa: BLE001 -- e.g. a conversion that fails: record, go on
            made = None
            results["failures"].append({"case": list(case), "variant": name, "error": f"{type(err).__name__}: {err}"})
        if isinstance(made, str):
            skipped[name] = made
        elif made is not None:
            fns[name] = made
    with torch.inference_mode():
        timed = bc.time_interleaved(fns, models.device, config.repeats, config.warmup, log=log)
    for name, t in timed.items():
        if t.error:
            results["failures"].append({"case": list(case), "variant": name, "error": t.error})
    for name in config.profile:
        if name in fns and timed[name].error is None:
            with torch.inference_mode():
                table = profile_variant(fns[name], models.device)
            results["profiles"].append({"case": list(case), "variant": name, "table": table})
            print(f"\n### profile: {name}, {preset} {dtype} batch {n} steps {steps}\n```\n{table}\n```", flush=True)
    return case_rows(case, timed, fns, skipped, gflops, matmul)


def _fmt_x(value, row):
    return f"{value:.2f}x"


COLUMNS = [("preset", "preset", ""), ("dtype", "dtype", ""), ("batch", "batch", "d"), ("steps", "steps", "d"),
           ("variant", "variant", ""), ("ms/step", "ms_per_step", ".2f"),
           ("min-max ms/step", "ms_per_step_min", lambda v, r: f"{v:.2f}-{r['ms_per_step_max']:.2f}"),
           ("img/s", "images_per_s", ".3g"), ("vs eager", "speedup_vs_eager", _fmt_x),
           ("vs best compile", "speedup_vs_best_compile", _fmt_x),
           ("vs best plain", "speedup_vs_best_plain", lambda v, r: f"{v:.2f}x ({r['best_plain']})"),
           ("TFLOP/s", "tflops", ".3g"),
           ("% matmul", "pct_of_matmul", ".3g"), ("peak MiB", "peak_mib", ".0f"),
           ("first call s", "first_call_s", ".2f"), ("compile s", "compile_s", ".1f"),
           ("capture s", "capture_s", ".2f"), ("graph MiB", "graph_mib", ".0f")]


def markdown(rows):
    timed = [r for r in rows if "ms_per_step" in r]
    table = bc.markdown_table(timed, COLUMNS)
    notes = [f"- {r['variant']} ({r['preset']} {r['dtype']} b{r['batch']} s{r['steps']}): "
             f"{'skipped: ' + r['skipped'] if r.get('skipped') else 'FAILED: ' + str(r.get('error'))}"
             for r in rows if "ms_per_step" not in r]
    return table + ("\n" + "\n".join(notes) if notes else "")


# ---- targets -----------------------------------------------------------------------------------------------

def _fast_row(rows, device):
    """The ddpm_fast row a plain ``ddpm_fast.sample`` call would have run (graph="auto")."""
    if device == "cpu":
        return next((r for r in rows if r["variant"] == "ddpm_fast" and "ms_per_step" in r), None)
    from ..sampling.graphs import WHOLE_GRAPH_MAX
    r0 = rows[0]
    want = "ddpm_fast-whole" if r0["steps"] * r0["batch"] <= WHOLE_GRAPH_MAX else "ddpm_fast-step"
    return next((r for r in rows if r["variant"] == want and "ms_per_step" in r), None)


def targets(rows, device):
    """The performance targets (docs/benchmarks.md) the measured cases cover: what each asks, what was
    measured, met or missed."""
    by_case = {}
    for r in rows:
        by_case.setdefault((r["preset"], r["dtype"], r["batch"], r["steps"]), []).append(r)
    out = []

    def check(goal, case, value, ok, unit="x"):
        out.append({"target": goal, "case": "{} {} batch {} steps {}".format(*case),
                    "measured": None if value is None else round(value, 3), "unit": unit,
                    "status": "unmeasured" if value is None else "met" if ok(value) else "MISSED"})

    for case, case_rows_ in by_case.items():
        preset, dtype, n, steps = case
        _compile_targets(check, case, case_rows_, device)
        fast = _fast_row(case_rows_, device)
        if fast is None:
            continue
        vs_eager, vs_compile = fast.get("speedup_vs_eager"), fast.get("speedup_vs_best_compile")
        if device == "cpu" and preset == "tiny" and n in (1, 16):
            check(">= 1.3x vs eager (CPU, tiny)", case, vs_eager, lambda v: v >= 1.3)
        if fast.get("best_plain") not in (None, "eager"):  # the honest gain: over the best a user could run
            check(f"ahead of the best plain variant ({fast['best_plain']})", case,
                  fast.get("speedup_vs_best_plain"), lambda v: v > 1.0)
        if device == "cuda" and preset == "ddpm_cifar10" and steps == 100:
            if n in (1, 128):
                goal = 5.0 if n == 1 else 1.3
                check(f">= {goal}x vs eager (GPU, CIFAR, 100 steps)", case, vs_eager, lambda v, g=goal: v >= g)
            check("ahead of the best torch.compile variant", case, vs_compile, lambda v: v > 1.0)
            if n == 512 and dtype == "bf16":
                check(">= 50% of the measured bf16 matmul rate", case, fast.get("pct_of_matmul"),
                      lambda v: v >= 50, unit="%")
    return out


def _compile_targets(check, case, rows, device):
    """ddpm_fast + torch.compile against torch.compile of the plain loop (docs/benchmarks.md, "Targets")."""
    preset, dtype, n, steps = case
    name = "ddpm_fast-compile" if device == "cpu" else "ddpm_fast-whole-compile"
    row = next((r for r in rows if r["variant"] == name and "ms_per_step" in r), None)
    if row is None:
        return
    vs_compile = row.get("speedup_vs_best_compile")
    if device == "cpu" and preset == "tiny" and n == 16:
        check(">= 1.05x the best torch.compile variant (CPU, tiny, ddpm_fast + compile)", case, vs_compile,
              lambda v: v >= 1.05)
        check(">= 1.5x eager (CPU, tiny, ddpm_fast + compile)", case, row.get("speedup_vs_eager"), lambda v: v >= 1.5)
    elif device == "cpu" and preset == "ddpm_cifar10" and n == 1:
        check("no slower than the best torch.compile variant (CPU, CIFAR, ddpm_fast + compile)", case, vs_compile,
              lambda v: v >= 1.0)
    elif device == "cuda" and n in (1, 16, 128):
        check("ahead of every torch.compile variant (GPU, ddpm_fast + compile in the whole-loop graph)", case,
              vs_compile, lambda v: v > 1.0)


def targets_markdown(items):
    if not items:
        return "(no target is covered by these cases)"
    return bc.markdown_table(items, [("target", "target", ""), ("case", "case", ""),
                                     ("measured", "measured", lambda v, r: f"{v}{r['unit']}"),
                                     ("status", "status", "")])


# ---- the run ----------------------------------------------------------------------------------------------

def run(config: BenchConfig) -> int:
    """Measures every case, prints the tables, writes the JSON; returns 1 when any variant failed, else 0."""
    config = config.resolved()
    source = bc.provenance(config.allow_dirty, "ddpm-fast bench")  # before any work
    device = bc.bench_device(config.device, config.threads, "bench")
    path = bc.result_path(config.out_dir, "" if config.sampler == "ddpm" else f"{config.sampler}-", device,
                          config.quick)
    results = {"meta": bc.environment(device, source), "config": {k: v for k, v in vars(config).items()},
               "variants": VARIANTS, "gflops_per_image": {}, "rows": [], "failures": [], "profiles": [],
               "targets": [], "complete": False}
    results["matmul"] = bc.matmul_tflops(device, size=512 if config.quick else None)
    log(f"bench: {results['meta']['device']}, {torch.get_num_threads()} threads, matmul "
        f"{results['matmul']['tflops']:.3f} TFLOP/s ({results['matmul']['dtype']}); writing {path}")
    models, start = None, time.perf_counter()
    for case in config.all_cases():
        preset, dtype = case[:2]
        if config.time_budget is not None and time.perf_counter() - start > config.time_budget:
            log(f"case {case}: skipped, the time budget of {config.time_budget:.0f} s is spent")
            results["rows"].append(dict(zip(("preset", "dtype", "batch", "steps"), case), variant="*",
                                        skipped=f"time budget ({config.time_budget:.0f} s) spent"))
            continue
        if models is None or (models.preset, models.dtype_name) != (preset, dtype):
            models = _models(models, preset, dtype, device, config.seed)
            results["gflops_per_image"][preset] = bc.unet_gflops(models.plain.config)
        t0 = time.perf_counter()
        results["rows"] += run_case(config, models, case, results["gflops_per_image"][preset],
                                    results["matmul"], results)
        log(f"  case done in {time.perf_counter() - t0:.0f} s")
        results["targets"] = targets(results["rows"], device.type)
        bc.write_json_atomic(path, results)
    results["complete"] = True
    results["meta"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    bc.write_json_atomic(path, results)
    _print_report(results, path)
    return 1 if results["failures"] else 0


def _models(previous, preset, dtype, device, seed):
    """Models of the next (preset, dtype), after freeing the previous ones (graphs, compiled code, memory)."""
    del previous
    from ..sampling import clear_graph_cache
    clear_graph_cache()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Models(preset, dtype, device, seed)


def _print_report(results, path):
    meta, mm = results["meta"], results["matmul"]
    print(f"\n## Sampling: {meta['device']} ({meta['device_type']}), {meta['date']}, torch {meta['torch']}, "
          f"triton {meta['triton']}, CUDA {meta['cuda']}, {meta['threads']} threads, commit {meta['git_commit']}, "
          f"load average {meta['load_average_start']} -> {meta.get('load_average_end')}")
    print(f"matmul {mm['size']}^3 {mm['dtype']}: {mm['tflops']:.3f} TFLOP/s; U-Net GFLOP per image-forward: "
          + ", ".join(f"{k} {v:.3f}" for k, v in results["gflops_per_image"].items()))
    print(markdown(results["rows"]))
    print("\nTargets:\n" + targets_markdown(results["targets"]))
    print(f"\nJSON: {path}", flush=True)
