"""Fused GroupNorm+SiLU vs PyTorch's F.silu(F.group_norm(...)), forward and backward, on the GroupNorm+SiLU
sites of the DDPM CIFAR-10 U-Net (45 sites, 11 distinct shapes, G = 32).

Variants run interleaved in one process (round-robin within every repeat, each repeat timing a burst of calls):
torch, fused, a plain copy of the same bytes (the bandwidth ceiling) and, on CUDA, Triton and torch.compile of
the two PyTorch ops (forward, and backward through the compiled graph). Every variant is timed at every CPU
thread count of --thread-counts (default 1 and torch's count), interleaved too: PyTorch's backward can be slower
on 2 threads than on 1 on a loaded 2-core machine, so each variant is ALSO reported at its own best thread count
(per shape, and for the whole U-Net at the single count that is best for it) and the speedups best-vs-best. Rows:
median per call, p25-p75 spread, speedup, effective bandwidth of every variant (forward: x read + y written;
backward: x, dy read + dx written) and its % of the copy's. Markdown to stdout; with --json PATH the rows too
(written atomically, with the commit measured: a dirty tree is refused without --allow-dirty).

    python benchmarks/bench_group_norm_silu.py                        # CPU, batch 8, fp32, 1 and all threads
    python benchmarks/bench_group_norm_silu.py --device cuda --dtype bfloat16 --batch 64
    python benchmarks/bench_group_norm_silu.py --quick                # dry run with tiny settings
"""
import argparse
import math
import os
import statistics

import torch
import torch.nn.functional as F

from ddpm_fast.bench import common as bc
from ddpm_fast.ops.group_norm_silu import group_norm_silu

# (C, H*W) -> number of sites in one forward of the DDPM CIFAR-10 U-Net (counted with forward hooks on
# ddpm_fast.models' ddpm_cifar10 preset; every site has G = 32).
UNET_SITES = {(128, 1024): 8, (128, 256): 1, (256, 1024): 2, (256, 256): 6, (256, 64): 7, (256, 16): 11,
              (384, 1024): 1, (384, 256): 1, (512, 256): 2, (512, 64): 3, (512, 16): 3}
GROUPS = 32
MAIN = ("torch", "fused")  # the variants every row compares


def make_case(C, HW, batch, dtype, device, channels_last):
    """Inputs for one shape: x (N, C, H, W), weight, bias, dy; all requiring grad where autograd needs it."""
    side = int(math.isqrt(HW))
    x = torch.randn(batch, C, side, side, device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(C, device=device) * 0.5 + 1).requires_grad_()
    b = (torch.randn(C, device=device) * 0.5).requires_grad_()
    return x.requires_grad_(), w, b, torch.randn_like(x)


def forward_variants(x, w, b, device):
    """name -> zero-argument callable computing y."""
    xd = x.detach()
    out = torch.empty_like(xd)
    v = {"torch": lambda: F.silu(F.group_norm(xd, GROUPS, w.to(x.dtype), b.to(x.dtype))),
         "fused": lambda: group_norm_silu(xd, GROUPS, w, b), "copy": lambda: out.copy_(xd)}
    if device == "cuda":
        from ddpm_fast.ops.triton.group_norm_silu import _group_norm_silu_fwd
        compiled = torch.compile(lambda t, ww, bb: F.silu(F.group_norm(t, GROUPS, ww, bb)), dynamic=False)
        wd, bd = w.detach().to(x.dtype), b.detach().to(x.dtype)
        v["triton"] = lambda: _group_norm_silu_fwd(xd, w, b, GROUPS, 1e-5)
        v["torch.compile"] = lambda: compiled(xd, wd, bd)
    return v


def backward_variants(x, w, b, dy, device):
    """name -> zero-argument callable computing (dx, dweight, dbias) from a retained graph."""
    y_torch = F.silu(F.group_norm(x, GROUPS, w.to(x.dtype), b.to(x.dtype)))
    y_fused = group_norm_silu(x, GROUPS, w, b)
    xd = x.detach()
    dx_out, dy2 = torch.empty_like(xd), torch.empty_like(xd)
    v = {"torch": lambda: torch.autograd.grad(y_torch, (x, w, b), dy, retain_graph=True),
         "fused": lambda: torch.autograd.grad(y_fused, (x, w, b), dy, retain_graph=True),
         "copy": lambda: (dx_out.copy_(xd), dy2.copy_(dy))}  # 2 reads + 2 writes >= the 3 tensors moved
    if device == "cuda":
        from ddpm_fast.ops.triton.group_norm_silu import _group_norm_silu_bwd, _group_norm_silu_fwd
        _, mean, rstd = _group_norm_silu_fwd(xd, w, b, GROUPS, 1e-5)
        compiled = torch.compile(lambda t, ww, bb: F.silu(F.group_norm(t, GROUPS, ww.to(t.dtype), bb.to(t.dtype))),
                                 dynamic=False)
        y_compiled = compiled(x, w, b)  # its backward is the compiled backward graph
        v["triton"] = lambda: _group_norm_silu_bwd(dy, xd, w, b, mean, rstd, GROUPS)
        v["torch.compile"] = lambda: torch.autograd.grad(y_compiled, (x, w, b), dy, retain_graph=True)
    return v


def time_over_threads(variants, counts, repeats, burst, device):
    """{threads: {name: [seconds per call]}}: every repeat times a burst of each variant at each thread count in
    turn (thread counts and variants interleaved), after warm-up calls at each count."""
    times = {t: {name: [] for name in variants} for t in counts}
    before = torch.get_num_threads()
    try:
        for t in counts:
            torch.set_num_threads(t)
            bc.time_bursts(variants, 1, 1, device)  # warm-up (compilation, allocator, thread pool)
        for _ in range(repeats):
            for t in counts:
                torch.set_num_threads(t)
                for name, ts in bc.time_bursts(variants, 1, burst, device, warmup=0).items():
                    times[t][name] += ts
    finally:
        torch.set_num_threads(before)
    return times


def _stats(ts):
    q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
    return statistics.median(ts) * 1e3, [q[0] * 1e3, q[2] * 1e3]


def row_for(shape_key, pass_name, times, moved_bytes):
    """One (shape, pass) row: per variant and thread count the median and spread (ms), GB/s and % of the copy's;
    each variant's best thread count; speedups at the main (largest) count and best vs best."""
    C, HW = shape_key
    main = max(times)
    row = {"C": C, "HW": HW, "sites": UNET_SITES.get(shape_key, 1), "pass": pass_name, "main_threads": main,
           "by_threads": {}, "best": {}}
    for t, per_variant in times.items():
        row["by_threads"][t] = {}
        for name, ts in per_variant.items():
            med, spread = _stats(ts)
            row["by_threads"][t][name] = {"ms": med, "spread_ms": spread, "GBps": moved_bytes / med / 1e6}
        copy = row["by_threads"][t]["copy"]["GBps"]
        for entry in row["by_threads"][t].values():
            entry["pct_of_copy"] = 100 * entry["GBps"] / copy
    for name in times[main]:
        t = min(times, key=lambda c: row["by_threads"][c][name]["ms"])
        row["best"][name] = {"threads": t, **row["by_threads"][t][name]}
    at_main = row["by_threads"][main]
    row["speedup"] = at_main["torch"]["ms"] / at_main["fused"]["ms"]
    row["speedup_best_vs_best"] = row["best"]["torch"]["ms"] / row["best"]["fused"]["ms"]
    return row


def summarize(rows):
    """Per pass: geomean speedups over the shapes (at the main count, best vs best) and the whole U-Net's 45 sites
    per variant at the main count and at the single thread count best for that variant."""
    out = {}
    for p in ("forward", "backward"):
        rs = [r for r in rows if r["pass"] == p]
        if not rs:
            continue
        geo = {k: math.exp(sum(math.log(r[k]) for r in rs) / len(rs)) for k in ("speedup", "speedup_best_vs_best")}
        counts = list(rs[0]["by_threads"])
        unet = {}
        for name in MAIN:
            total = {t: sum(r["by_threads"][t][name]["ms"] * r["sites"] for r in rs) for t in counts}
            best = min(total, key=total.get)
            unet[name] = {"main_ms": total[max(counts)], "best_ms": total[best], "best_threads": best}
        out[p] = {"geomean_speedup": geo["speedup"], "geomean_speedup_best_vs_best": geo["speedup_best_vs_best"],
                  "unet": unet,
                  "unet_speedup_best_vs_best": unet["torch"]["best_ms"] / unet["fused"]["best_ms"]}
    return out


def markdown(rows, summary, meta):
    main = rows[0]["main_threads"]
    extra = [k for k in rows[0]["by_threads"][main] if k not in MAIN]  # copy, and on CUDA triton, torch.compile
    head = ["C x HW", "pass", f"torch ms @{main}", f"fused ms @{main}", "speedup", "torch best ms (threads)",
            "fused best ms (threads)", "speedup best vs best", "fused GB/s (% of copy)"] + [f"{e} ms" for e in extra]
    lines = [f"{meta['device']} | threads {meta['thread_counts']} | {meta['dtype']} | {meta['layout']} | "
             f"batch {meta['batch']} | torch {meta['torch']} | {meta['date']} | commit {meta['git_commit']} | "
             f"load avg {meta['load_average_start']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        at = r["by_threads"][main]

        def ms(e):
            lo, hi = e["spread_ms"]
            return f"{e['ms']:.3f} ({lo:.3f}-{hi:.3f})"
        cells = [f"{r['C']} x {r['HW']}", r["pass"], ms(at["torch"]), ms(at["fused"]), f"{r['speedup']:.2f}x",
                 f"{r['best']['torch']['ms']:.3f} ({r['best']['torch']['threads']})",
                 f"{r['best']['fused']['ms']:.3f} ({r['best']['fused']['threads']})",
                 f"{r['speedup_best_vs_best']:.2f}x",
                 f"{at['fused']['GBps']:.1f} ({at['fused']['pct_of_copy']:.0f}%)"] + [ms(at[e]) for e in extra]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for p, s in summary.items():
        u = s["unet"]
        lines.append(f"{p}: geomean speedup {s['geomean_speedup']:.2f}x at {main} threads, "
                     f"{s['geomean_speedup_best_vs_best']:.2f}x best vs best; all 45 U-Net sites: torch "
                     f"{u['torch']['main_ms']:.2f} ms ({u['torch']['best_ms']:.2f} at its best, "
                     f"{u['torch']['best_threads']} threads), fused {u['fused']['main_ms']:.2f} ms "
                     f"({u['fused']['best_ms']:.2f} at {u['fused']['best_threads']} threads): "
                     f"{s['unet_speedup_best_vs_best']:.2f}x best vs best")
    return "\n".join(lines)


def _shapes(text):
    try:
        shapes = [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item]
    except ValueError:
        shapes = None
    if not shapes or any(len(s) != 2 or math.isqrt(s[1]) ** 2 != s[1] for s in shapes):
        raise argparse.ArgumentTypeError(f"expected C:HW pairs with square HW, e.g. 256:16,128:1024; got {text!r}")
    return shapes


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 64 on CUDA")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads: the main count (default: torch's)")
    ap.add_argument("--thread-counts", default=None,
                    help="CPU thread counts every variant is timed at (default: 1 and the main count)")
    ap.add_argument("--shapes", type=_shapes, default=None, help="C:HW pairs (default: all 11 U-Net shapes)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--burst", type=int, default=None, help="calls per timed repeat (default: by size)")
    ap.add_argument("--quick", action="store_true", help="dry run: 2 shapes, batch 2, 3 repeats")
    ap.add_argument("--json", default=None, help="also write the results here (atomically)")
    ap.add_argument("--allow-dirty", action="store_true",
                    help="measure a working tree with uncommitted changes (the JSON records dirty: true)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    source = bc.provenance(args.allow_dirty, "bench_group_norm_silu")  # before any work
    device = bc.bench_device(args.device, args.threads, "bench_group_norm_silu")
    main_threads = torch.get_num_threads()
    counts = sorted({main_threads} if args.device == "cuda" else
                    {int(c) for c in (args.thread_counts or f"1,{main_threads}").split(",")})
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    batch = args.batch or (8 if args.device == "cpu" else 64)
    shapes = args.shapes or list(UNET_SITES)
    if args.quick:
        shapes, batch, args.repeats = args.shapes or [(128, 256), (256, 16)], 2, 3
    meta = {**bc.environment(device, source), "dtype": str(dtype).replace("torch.", ""), "batch": batch,
            "layout": "channels_last" if args.channels_last else "NCHW", "thread_counts": counts}
    rows = []
    for key in shapes:
        x, w, b, dy = make_case(*key, batch, dtype, args.device, args.channels_last)
        numel, item = x.numel(), x.element_size()
        burst = args.burst or max(1, min(50, int(2e6 // numel)))
        rows.append(row_for(key, "forward", time_over_threads(forward_variants(x, w, b, args.device), counts,
                                                              args.repeats, burst, device), 2 * numel * item))
        rows.append(row_for(key, "backward", time_over_threads(backward_variants(x, w, b, dy, args.device), counts,
                                                               args.repeats, burst, device), 3 * numel * item))
    summary = summarize(rows)
    meta["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(markdown(rows, summary, meta))
    if args.json:
        bc.write_json_atomic(args.json, {"meta": meta, "args": {k: v for k, v in vars(args).items()},
                                         "rows": rows, "summary": summary})
    return rows


if __name__ == "__main__":
    main()
