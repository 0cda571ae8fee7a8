"""What a class-conditional U-Net's conditioning costs per sampling step, against the U-Net forward it feeds.

With labels the ResBlocks' projections SiLU(emb_t + emb_y) @ W depend on (t, y) jointly, so an unconditional
U-Net's one-row-per-step table no longer covers them. Per reverse step (B samples, each with its own label), the
ways to get the (B, P) projections:

    unconditional row    today's unconditional path: index one (1, P) row of the (steps, P) table (reference)
    naive                time_projections(t, y) in every step: sinusoid, timestep MLP, class rows, projections
    split                projections(emb_t[step] + emb_y): the timestep MLP of every step and the chain's class
                         rows computed once per chain; per step one add, SiLU and the projection matmuls
    split, one matmul    the same with projection_weights() (the ResBlocks' projections stacked, taken once per
                         chain): one (B, E) x (E, P) matmul
    table                a (steps * (K + 1), P) table of every (step, label), built once per chain; per step
                         one gather of B rows
and the per-chain set-up of split (timestep MLP of all steps, class rows, stacked weights) and table (every
(step, label) row). Timed in one
process, interleaved: every repeat times each variant's burst in turn; medians, min-max and the load are kept.

    OMP_NUM_THREADS=1 python benchmarks/bench_class_conditioning.py            # tiny (K=10) and CIFAR-10 U-Nets
    python benchmarks/bench_class_conditioning.py --quick                      # dry run
JSON: <out-dir>/class-conditioning-<device>-<date>.json.
"""
import argparse
import os
import statistics
import sys
import time

import torch

from ddpm_fast.bench import common as bc
from ddpm_fast.models import UNet

CASES = [("tiny", 8, 1, 64), ("tiny", 8, 1, 256), ("ddpm_cifar10", 32, 3, 16)]  # preset, size, channels, batch


def variants(model, batch, steps, device):
    """name -> (callable, burst multiplier) for one U-Net and batch, all inputs prepared beforehand."""
    k = model.null_label
    t_all = torch.arange(steps, device=device) * (1000 // steps)
    y = torch.randint(0, k + 1, (batch,), device=device)
    x = torch.randn(batch, model.config.in_channels, model.config.image_size, model.config.image_size,
                    device=device)
    uncond = model.time_projections(t_all)
    emb_t, emb_y = model.time_embeddings(t_all), model.class_embeddings(y)
    weights = model.projection_weights()
    table = table_of(model, t_all)
    step = torch.tensor([steps // 2], device=device)
    index = step * (k + 1) + y
    t_step = t_all[step].expand(batch)
    row = torch.empty_like(uncond[:1])
    return {
        "U-Net forward": (lambda: model(x, None, time_proj=uncond[steps // 2:steps // 2 + 1]), 1),
        "unconditional row": (lambda: torch.index_select(uncond, 0, step, out=row), 50),
        "naive": (lambda: model.time_projections(t_step, y), 50),
        "split": (lambda: model.projections(emb_t[step] + emb_y), 50),
        "split, one matmul": (lambda: model.projections(emb_t[step] + emb_y, weights), 50),
        "table": (lambda: torch.index_select(table, 0, index), 50),
        "set-up: split (per chain)": (lambda: (model.time_embeddings(t_all), model.class_embeddings(y),
                                               model.projection_weights()), 1),
        "set-up: table (per chain)": (lambda: table_of(model, t_all), 1),
    }, table.numel() * table.element_size()


def table_of(model, t_all):
    """The projections of every (step, label) pair: row step * (K + 1) + label."""
    labels = torch.arange(model.null_label + 1, device=t_all.device)
    return model.time_projections(t_all.repeat_interleave(len(labels)), labels.repeat(len(t_all)))


def time_case(fns, repeats, burst, device):
    """name -> seconds per call of each repeat; every repeat runs each variant's burst in turn."""
    times = {name: [] for name in fns}
    for fn, _ in fns.values():
        fn()
    for _ in range(repeats):
        for name, (fn, mult) in fns.items():
            n = burst * mult
            bc._sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            bc._sync(device)
            times[name].append((time.perf_counter() - t0) / n)
    return times


def run_case(preset, size, channels, batch, args, device):
    torch.manual_seed(args.seed)
    model = UNet.preset(preset, image_size=size, in_channels=channels, num_classes=10).to(device).eval()
    with torch.inference_mode():
        fns, table_bytes = variants(model, batch, args.steps, device)
        times = time_case(fns, args.repeats, args.burst, device)
    fwd = statistics.median(times["U-Net forward"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"case": f"{preset} {size}x{size}x{channels}", "batch": batch, "variant": name,
                     "us": med * 1e6, "min_us": min(ts) * 1e6, "max_us": max(ts) * 1e6,
                     "pct_of_forward": 100 * med / fwd, "table_mib": table_bytes / 2 ** 20})
    return rows


COLUMNS = [("case", "case", ""), ("B", "batch", "d"), ("variant", "variant", ""), ("median us", "us", ".1f"),
           ("min-max us", "min_us", lambda v, r: f"{v:.1f}-{r['max_us']:.1f}"),
           ("% of forward", "pct_of_forward", ".2f")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--steps", type=int, default=1000, help="sampling steps of the chain (default 1000)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--burst", type=int, default=2, help="forwards per timed burst (conditioning ops: 50x)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="dry run: tiny batch 8 only, 10 steps, 2 repeats")
    args = ap.parse_args(argv)
    cases = CASES
    if args.quick:
        cases, args.steps, args.repeats, args.burst = [("tiny", 8, 1, 8)], 10, 2, 1
    device = bc.bench_device(args.device, args.threads, "bench_class_conditioning")
    meta = bc.environment(device)
    rows = [r for case in cases for r in run_case(*case, args, device)]
    meta["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    path = bc.result_path(args.out_dir, "class-conditioning-", device, args.quick)
    bc.write_json_atomic(path, {"meta": meta, "args": vars(args), "rows": rows})
    print(f"\n## Class conditioning per step: {meta['device']}, {meta['date']}, torch {meta['torch']}, "
          f"{meta['threads']} threads, commit {meta['git_commit']}, {args.steps} steps, load average "
          f"{meta['load_average_start']} -> {meta['load_average_end']}")
    print(bc.markdown_table(rows, COLUMNS))
    for case in sorted({(r["case"], r["table_mib"]) for r in rows}):
        print(f"- {case[0]}: the (step, label) table holds {case[1]:.1f} MiB")
    print(f"\nJSON: {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
