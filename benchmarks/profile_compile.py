"""Where the time of a compiled sampling step goes: the U-Net forward against everything outside it, for
ddpm_fast.sample(compile=True) and for the strongest torch.compile baseline of the plain loop (the whole step
compiled, channels_last: bench variant compile-step-cl), and which ops the compiled U-Nets spend their time in.

Per sampling step, median of interleaved rounds (each round times every piece once, over all steps):
  full     the whole sampling call / steps (ddpm_fast: sample(compile=True); baseline: CompiledStepSampler)
  unet     the compiled U-Net forward alone, called as the loop calls it (ddpm_fast: its input copy and
           precomputed time projections; baseline: torch.compile of the plain channels_last U-Net)
  step     ddpm_fast's fused step alone (p_step on the U-Net's output)
and the same sample(compile=True) with the compiled graph calling ddpm_fast's GroupNorm+SiLU op at every site
(ops.group_norm_silu.COMPILED_CPU_INFERENCE = "op") instead of the plain ops that inductor fuses itself (the
default, chosen by this measurement: docs/compile.md),
  outside  full - unet: the step, noise, input copies, Python and dispatch of the loop
and, from torch.profiler over the same U-Net calls, the ops by self CPU time (ddpm_fast's GroupNorm+SiLU, the
convolutions, matmuls, and inductor's generated code, which the profiler sees as the compiled region's own time).

    OMP_NUM_THREADS=2 python benchmarks/profile_compile.py --threads 2 --json benchmarks/results/profile-compile-cpu.json
    python benchmarks/profile_compile.py --quick --allow-dirty                # a dry run (2 steps, 1 round)
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch


def _per_step(fn, steps, calls=1):
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / (calls * steps) * 1e3


def _profile(fn, calls):
    """Top ops by self CPU time over ``calls`` calls: [(name, ms per call, % of the profiled time)]."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    return [(e.key, e.self_cpu_time_total / 1e3 / calls, 100 * e.self_cpu_time_total / total) for e in events[:12]]


def pieces(preset, n, steps, seed=0):
    """The timed callables, all on the same weights (bench.sampling.Models) and the same batch."""
    import ddpm_fast
    from ddpm_fast.bench.baseline import CompiledStepSampler
    from ddpm_fast.bench.sampling import Models
    from ddpm_fast.sampling.args import resolve
    from ddpm_fast.sampling.compiled import compiled_for
    from ddpm_fast.sampling.loop import Statics, check_model_output, fused_step, init_x, model_to_run, \
        refresh_time_proj

    models = Models(preset, "fp32", "cpu", seed=seed)
    job = resolve(models.fused, n, steps, seed=seed, compile=True, progress=False, threads=None)
    info = {"compiles": []}
    model = compiled_for(job, model_to_run(job), info)
    st = Statics(job.plan, job.schedule)
    st.set_seed(seed)
    st.set_offset(0)
    init_x(st)
    refresh_time_proj(model, st, job.plan)
    noise = {"seed": st.seed}
    x0 = st.x.clone()
    last = st.t.shape[0] - 1

    def unet_fast():
        inp = st.x if st.x_in is None else st.x_in.copy_(st.x)
        return model(inp, st.t[last], time_proj=st.time_proj[last:last + 1])

    out = check_model_output(unet_fast(), job.plan).clone()

    def step_fast():
        st.x.copy_(x0)
        fused_step(st, job.plan, out, last, noise)

    plain = models.plain_cl()
    unet_plain = torch.compile(plain, dynamic=False)
    x_cl = torch.randn((n, *job.plan.shape)).contiguous(memory_format=torch.channels_last)
    t = torch.full((n,), int(st.t[last, 0]), dtype=torch.long)
    whole = CompiledStepSampler(plain, steps, channels_last=True)
    run = dict(seed=seed, progress=False, threads=None)  # threads: the count set for every piece, not "auto"
    fast_full = lambda: ddpm_fast.sample(models.fused, n, steps, compile=True, **run)  # noqa
    eager_full = lambda: ddpm_fast.sample(models.fused, n, steps, **run)  # noqa
    from ddpm_fast.ops import group_norm_silu as gns

    def gn_op():  # the same call with ddpm_fast's GroupNorm+SiLU op as one node per site of the compiled graph
        before, gns.COMPILED_CPU_INFERENCE = gns.COMPILED_CPU_INFERENCE, "op"
        try:
            return fast_full()
        finally:
            gns.COMPILED_CPU_INFERENCE = before
    return {
        "ddpm_fast+compile full": (fast_full, steps),
        "ddpm_fast+compile unet": (unet_fast, 1),
        "ddpm_fast step": (step_fast, 1),
        "ddpm_fast (no compile) full": (eager_full, steps),
        "ddpm_fast+compile, GroupNorm+SiLU as ddpm_fast's op, full": (gn_op, steps),
        "compile-step-cl full": (lambda: whole.sample(n), steps),
        "compile-step-cl unet": (lambda: unet_plain(x_cl, t), 1),
    }, info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="dry run: 2 steps, 1 round")
    ap.add_argument("--allow-dirty", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.rounds = 2, 1
    from ddpm_fast.bench import common as bc
    source = bc.provenance(args.allow_dirty or args.quick, "profile_compile")
    torch.set_num_threads(args.threads)
    fns, info = pieces(args.preset, args.batch, args.steps)  # normal tensors: sample() enters inference mode
    with torch.inference_mode():
        for fn, _ in fns.values():  # warm-ups: every compile happens here
            fn()
            fn()
        times = {k: [] for k in fns}
        load = [os.getloadavg()]
        for _ in range(args.rounds):
            for name, (fn, steps) in fns.items():
                calls = 1 if steps > 1 else args.steps
                times[name].append(_per_step(fn, steps if steps > 1 else 1, calls))
        load.append(os.getloadavg())
        profiles = {"ddpm_fast+compile unet": _profile(fns["ddpm_fast+compile unet"][0], args.steps),
                    "compile-step-cl unet": _profile(fns["compile-step-cl unet"][0], args.steps)}
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: (min(v), max(v)) for k, v in times.items()}
    share = {"ddpm_fast+compile": 1 - med["ddpm_fast+compile unet"] / med["ddpm_fast+compile full"],
             "compile-step-cl": 1 - med["compile-step-cl unet"] / med["compile-step-cl full"]}
    lines = [f"# Compiled step: {args.preset}, batch {args.batch}, {args.steps} steps, {torch.get_num_threads()} "
             f"threads, {args.rounds} interleaved rounds, load {load[0][0]:.2f} -> {load[1][0]:.2f}, "
             f"commit {source.get('git_commit')}", "",
             "| piece | ms per step (median) | min-max |", "|---|---|---|"]
    lines += [f"| {k} | {med[k]:.3f} | {spread[k][0]:.3f}-{spread[k][1]:.3f} |" for k in fns]
    lines += ["", "Outside the U-Net (1 - unet / full): " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in share.items())]
    for name, rows in profiles.items():
        lines += ["", f"Top ops by self CPU time, {name} (ms per call, % of profiled time):", "",
                  "| op | ms | % |", "|---|---|---|"]
        lines += [f"| `{op}` | {ms:.3f} | {pct:.1f} |" for op, ms, pct in rows]
    text = "\n".join(lines)
    print(text)
    if args.json:
        doc = {"meta": {**bc.environment("cpu", source), "preset": args.preset, "batch": args.batch,
                        "steps": args.steps, "rounds": args.rounds, "threads": torch.get_num_threads(),
                        "load_before_after": load, "command": " ".join(sys.argv)},
               "ms_per_step": times, "median": med, "outside_unet_share": share,
               "profiles": {k: [dict(op=o, ms=m, pct=p) for o, m, p in v] for k, v in profiles.items()},
               "compiles": info["compiles"]}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        with open(os.path.splitext(args.json)[0] + ".md", "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
