"""Per-step cost of the reverse step: ddpm_fast's fused p_step vs the same math as separate torch ops vs
diffusers' DDPMScheduler.step, at n x 3 x 32 x 32 (DDPM, eps prediction, fixed_small, clip, linear T=1000, a
mid-chain step so noise is drawn).

Variants run interleaved in one process (round-robin per repeat), each repeat timing a burst of calls; we report
the median per-step time, the p25-p75 spread, and the speedup over diffusers. On CUDA also the fused step's
bandwidth against a measured copy of the same bytes. Results go to stdout (a Markdown table) and, atomically,
to benchmarks/results/diffusion_ops_<device>.json, with the commit measured (a dirty tree is refused without
--allow-dirty).

    python benchmarks/bench_diffusion_ops.py                      # CPU, n in {1, 16, 256}
    python benchmarks/bench_diffusion_ops.py --device cuda
    python benchmarks/bench_diffusion_ops.py --quick              # dry run with tiny settings
"""
import argparse
import os
import statistics

import torch

from ddpm_fast import NoiseSchedule
from ddpm_fast.ops.p_step import p_step, p_step_ref
from ddpm_fast.bench import common as bc
from ddpm_fast.bench.common import time_bursts

STEP = 500  # a mid-chain step: noise is drawn


def make_variants(n, device):
    """name -> zero-argument callable doing one reverse step on fresh-looking (fixed) inputs. diffusers is
    optional (the GPU machine has none): without it the speedups are relative to the separate torch ops."""
    try:
        import diffusers
    except ImportError:
        diffusers = None
    sched = NoiseSchedule.linear(1000)
    sched.tables(device)
    x = torch.randn(n, 3, 32, 32, device=device)
    mo = torch.randn_like(x)
    out = torch.empty_like(x)
    seed = torch.tensor([1234], device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    variants = {
        "fused p_step": lambda: p_step(sched, mo, x, STEP, seed=seed, out=out),
        "separate torch ops": lambda: p_step_ref(sched, mo, x, STEP,
                                                 noise=torch.randn(x.shape, generator=gen, device=device)),
    }
    if diffusers is not None:
        theirs = diffusers.DDPMScheduler(num_train_timesteps=1000)
        variants["diffusers DDPMScheduler.step"] = lambda: theirs.step(mo, STEP, x, generator=gen)
    if device == "cpu":
        variants["fused p_step (torch ops backend)"] = lambda: p_step(sched, mo, x, STEP, seed=seed, out=out,
                                                                       backend="torch")
    else:
        variants["copy of x_t (bandwidth ceiling)"] = lambda: out.copy_(x)
    return variants


def summarize(times, n, device):
    rows = []
    theirs = "diffusers DDPMScheduler.step" in times
    base = statistics.median(times["diffusers DDPMScheduler.step" if theirs else "separate torch ops"])
    speedup = "speedup_vs_diffusers" if theirs else "speedup_vs_torch_ops"
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        row = {"n": n, "variant": name, "median_us": statistics.median(ts) * 1e6, "p25_us": q[0] * 1e6,
               "p75_us": q[2] * 1e6, speedup: base / statistics.median(ts)}
        if device == "cuda":  # x_t and the model output read, x_{t-1} written (noise is drawn in the kernel)
            moved = (3 if name != "copy of x_t (bandwidth ceiling)" else 2) * n * 3 * 32 * 32 * 4
            row["GB_per_s"] = moved / statistics.median(ts) / 1e9
        rows.append(row)
    return rows


def markdown(rows):
    cols = ["n", "variant", "median_us", "p25_us", "p75_us"] + [c for c in rows[0] if c.startswith("speedup")]
    cols += ["GB_per_s"] if "GB_per_s" in rows[0] else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sizes", default="1,16,256", help="batch sizes n (comma separated)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--burst-elements", type=int, default=2_000_000,
                    help="each timed burst runs ~this many elements worth of calls (at least 1 call)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--quick", action="store_true", help="dry run: n=1,4, 3 repeats")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/diffusion_ops_<device>.json)")
    ap.add_argument("--allow-dirty", action="store_true",
                    help="measure a working tree with uncommitted changes (the JSON records dirty: true)")
    args = ap.parse_args(argv)
    source = bc.provenance(args.allow_dirty, "bench_diffusion_ops")  # before any work
    bc.bench_device(args.device, args.threads, "bench_diffusion_ops")
    sizes = [1, 4] if args.quick else [int(s) for s in args.sizes.split(",")]
    repeats = 3 if args.quick else args.repeats
    rows = []
    for n in sizes:
        burst = max(1, args.burst_elements // (n * 3 * 32 * 32)) if not args.quick else 2
        rows += summarize(time_bursts(make_variants(n, args.device), repeats, burst, args.device), n,
                          args.device)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    meta = {**bc.environment(args.device, source), "repeats": repeats, "load_average_at_end": load,
            "quick": args.quick, "step": STEP}
    print(f"# reverse step per call, {meta['device']}, {args.threads} thread(s), torch {torch.__version__}, "
          f"load average {load}")
    print(markdown(rows))
    path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"diffusion_ops_{args.device}{'_quick' if args.quick else ''}.json")
    bc.write_json_atomic(path, {"meta": meta, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
