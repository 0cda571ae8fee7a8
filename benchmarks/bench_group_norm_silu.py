"""Fused GroupNorm+SiLU vs PyTorch's F.silu(F.group_norm(...)), forward and backward, on the GroupNorm+SiLU
sites of the DDPM CIFAR-10 U-Net (45 sites, 11 distinct shapes, G = 32), NCHW and channels_last.

On the CPU each side runs at each thread count of --threads-list (default 1,2) and is scored at its best one,
shape by shape (PyTorch's backward, for one, is slower on 2 threads than on 1 on a 2-core machine). Every repeat
visits every thread count and, within it, every variant in a rotated order, timing a burst of calls; we report
the median time per call and its p25-p75 spread, the speedup over PyTorch, the fused op's effective bandwidth, and
geometric means of the speedup over the 45 U-Net sites (each shape weighted by its number of sites) and over the
11 shapes, per layout and pass and over both layouts. Forward: inference (torch.no_grad(), what sampling runs;
--forward-mode train records autograd as training does). Backward: torch.autograd.grad of y for (x, w, b).
On CUDA also Triton and torch.compile of the two PyTorch ops; on every device a plain copy of the same bytes (the
bandwidth ceiling), so every variant's bandwidth is also given as a % of the copy's. Markdown to stdout;
with --json PATH the rows too (written atomically), with the commit and load; a working tree with uncommitted
changes is refused unless --allow-dirty (then recorded).

    python benchmarks/bench_group_norm_silu.py --json benchmarks/results/group_norm_silu_cpu.json
    python benchmarks/bench_group_norm_silu.py --device cuda --dtype bfloat16 --batch 64
    python benchmarks/bench_group_norm_silu.py --quick                # dry run with tiny settings
"""
import argparse
import contextlib
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from ddpm_fast.bench import common as bc
from ddpm_fast.ops import _ext
from ddpm_fast.ops.group_norm_silu import group_norm_silu

# (C, H*W) -> number of sites in one forward of the DDPM CIFAR-10 U-Net (counted with forward hooks on
# ddpm_fast.models' ddpm_cifar10 preset; every site has G = 32).
UNET_SITES = {(128, 1024): 8, (128, 256): 1, (256, 1024): 2, (256, 256): 6, (256, 64): 7, (256, 16): 11,
              (384, 1024): 1, (384, 256): 1, (512, 256): 2, (512, 64): 3, (512, 16): 3}
GROUPS = 32
SIDES = ("torch", "fused")


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


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_threads(variants, threads_list, repeats, burst, device):
    """(name, threads) -> seconds per call, one value per repeat. Each repeat sets each thread count in turn
    (None: leave it) and times a burst of every variant, rotating their order, after one untimed call."""
    times = {(n, t): [] for n in variants for t in threads_list}
    names = list(variants)
    for t in threads_list:  # warm-up: first calls, allocator, thread pools
        if t:
            torch.set_num_threads(t)
        for fn in variants.values():
            for _ in range(3):
                fn()
    for r in range(repeats):
        for t in threads_list:
            if t:
                torch.set_num_threads(t)
            for name in names[r % len(names):] + names[:r % len(names)]:
                fn = variants[name]
                fn()
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(burst):
                    fn()
                _sync(device)
                times[(name, t)].append((time.perf_counter() - t0) / burst)
    return times


def row_for(shape_key, layout, pass_name, times, moved_bytes):
    """One table row: every variant at its best thread count (lowest median), with spread and the speedup."""
    C, HW = shape_key
    row = {"C": C, "HW": HW, "layout": layout, "sites": UNET_SITES.get(shape_key, 1), "pass": pass_name}
    for name in dict.fromkeys(n for n, _ in times):
        by_threads = {t: statistics.median(v) for (n, t), v in times.items() if n == name}
        best = min(by_threads, key=by_threads.get)
        ts = times[(name, best)]
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        row[f"{name}_ms"] = by_threads[best] * 1e3
        row[f"{name}_spread_ms"] = [q[0] * 1e3, q[2] * 1e3]
        row[f"{name}_threads"] = best
        row[f"{name}_ms_by_threads"] = {str(t): s * 1e3 for t, s in by_threads.items()}
    row["speedup"] = row["torch_ms"] / row["fused_ms"]
    names = list(dict.fromkeys(n for n, _ in times))
    for name in names:  # effective bandwidth, and as % of a plain copy's
        row[f"{name}_GBps"] = moved_bytes / (row[f"{name}_ms"] / 1e3) / 1e9
    for name in names:
        row[f"{name}_pct_of_copy"] = 100 * row[f"{name}_GBps"] / row["copy_GBps"] if "copy_ms" in row else None
    return row


def _geomean(rows, weighted):
    w = [r["sites"] if weighted else 1 for r in rows]
    return math.exp(sum(wi * math.log(r["speedup"]) for wi, r in zip(w, rows)) / sum(w))


def summarize(rows):
    """(layout or 'both', pass) -> geometric-mean speedups (over the 45 sites and over the shapes), U-Net totals."""
    out = {}
    for layout in sorted({r["layout"] for r in rows}) + ["both"]:
        for p in ("forward", "backward"):
            rs = [r for r in rows if r["pass"] == p and layout in ("both", r["layout"])]
            if not rs or (layout == "both" and len({r["layout"] for r in rs}) < 2):
                continue
            out[f"{layout} {p}"] = {
                "geomean_speedup_sites": _geomean(rs, True), "geomean_speedup_shapes": _geomean(rs, False),
                "min_speedup": min(r["speedup"] for r in rs),
                "unet_torch_ms": sum(r["torch_ms"] * r["sites"] for r in rs),
                "unet_fused_ms": sum(r["fused_ms"] * r["sites"] for r in rs)}
    return out


def markdown(rows, summary, meta):
    extra = []  # the other variants (copy; CUDA: triton, torch.compile), in first-seen order
    for r in rows:
        extra += [k[:-3] for k in r if k.endswith("_ms") and not k.endswith("_spread_ms")
                  and k[:-3] not in (*SIDES, *extra)]
    head = ["C x HW", "layout", "pass", "torch ms", "fused ms", "speedup", "fused GB/s (% of copy)"] + \
        [f"{e} ms" for e in extra]
    load = meta.get("load_average_start")
    lines = [f"{meta['device']} | threads {meta['threads_list']} | {meta['dtype']} | batch {meta['batch']} | "
             f"forward {meta['forward_mode']} | CPU kernels {meta['cpu_isa']} | torch {meta['torch']} | "
             f"{meta['date']} | commit {meta['git_commit']}"
             + (f" | load avg {load[0]:.1f} -> {meta['load_average_end'][0]:.1f}" if load else ""), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        def ms(k):
            if f"{k}_ms" not in r:
                return "-"
            lo, hi = r[f"{k}_spread_ms"]
            t = r[f"{k}_threads"]
            return f"{r[k + '_ms']:.3f} ({lo:.3f}-{hi:.3f})" + (f" @{t}" if t else "")
        cells = [f"{r['C']} x {r['HW']}", r["layout"], r["pass"], ms("torch"), ms("fused"), f"{r['speedup']:.2f}x",
                 f"{r['fused_GBps']:.1f} ({r['fused_pct_of_copy']:.0f}%)"] + [ms(e) for e in extra]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for key, s in summary.items():
        lines.append(f"{key}: geometric-mean speedup {s['geomean_speedup_sites']:.2f}x over the 45 U-Net sites "
                     f"({s['geomean_speedup_shapes']:.2f}x over the shapes, lowest {s['min_speedup']:.2f}x); "
                     f"all sites torch {s['unet_torch_ms']:.2f} ms vs fused {s['unet_fused_ms']:.2f} ms")
    return "\n".join(lines)


def _threads_list(args):
    if args.device == "cuda":
        return [None]
    if args.threads:
        return [args.threads]
    wanted = [int(t) for t in args.threads_list.split(",") if t.strip()]
    return [t for t in wanted if 1 <= t <= (os.cpu_count() or 1)] or [1]


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 64 on CUDA")
    ap.add_argument("--layout", choices=["nchw", "channels_last", "both"], default=None,
                    help="default: both on CPU, nchw on CUDA")
    ap.add_argument("--channels-last", action="store_true", help="same as --layout channels_last")
    ap.add_argument("--threads-list", default="1,2", help="CPU thread counts to try, each side scored at its best")
    ap.add_argument("--threads", type=int, default=None, help="CPU: only this thread count")
    ap.add_argument("--shapes", default=None, help="only these C x HW shapes, e.g. 256x16,512x64 (default: all 11)")
    ap.add_argument("--forward-mode", choices=["inference", "train"], default="inference")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--burst", type=int, default=None, help="calls per timed repeat (default: by size)")
    ap.add_argument("--quick", action="store_true", help="dry run: 2 shapes, batch 2, 3 repeats")
    ap.add_argument("--json", default=None, help="also write the results here (atomically)")
    ap.add_argument("--allow-dirty", action="store_true",
                    help="measure a working tree with uncommitted changes (the JSON records dirty: true)")
    return ap.parse_args(argv)


def main(argv=None):
    args = _parse(argv)
    source = bc.provenance(args.allow_dirty, "bench_group_norm_silu")  # refuses a dirty tree before any work
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    batch = args.batch or (8 if args.device == "cpu" else 64)
    layout = "channels_last" if args.channels_last else args.layout or ("both" if args.device == "cpu" else "nchw")
    layouts = ["nchw", "channels_last"] if layout == "both" else [layout]
    shapes, threads_list = list(UNET_SITES), _threads_list(args)
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    if args.quick:
        shapes, batch, args.repeats = [(128, 256), (256, 16)], 2, 3
    ext = _ext.load()
    meta = {**bc.environment(args.device, source), "threads_list": threads_list, "dtype": str(dtype).replace("torch.", ""),
            "batch": batch, "layouts": layouts, "forward_mode": args.forward_mode, "repeats": args.repeats,
            "cpu_isa": ext.group_norm_silu_cpu_isa() if ext is not None else None}
    rows = []
    fwd_ctx = torch.no_grad if args.forward_mode == "inference" else contextlib.nullcontext
    # A whole untimed first case: the first shape measured otherwise ran both sides cold (a quiet-machine run
    # gave its forward 8.0x and backward 0.67x, 2.0x and 2.2x when measured again later in the same process).
    x, w, b, dy = make_case(*shapes[0], batch, dtype, args.device, layouts[0] == "channels_last")
    with fwd_ctx():
        time_threads(forward_variants(x, w, b, args.device), threads_list, 3, 1, args.device)
    time_threads(backward_variants(x, w, b, dy, args.device), threads_list, 3, 1, args.device)
    for lay in layouts:
        for key in shapes:
            x, w, b, dy = make_case(*key, batch, dtype, args.device, lay == "channels_last")
            numel, item = x.numel(), x.element_size()
            burst = args.burst or max(1, min(50, int(2e6 // numel)))
            with fwd_ctx():
                t = time_threads(forward_variants(x, w, b, args.device), threads_list, args.repeats, burst, args.device)
            rows.append(row_for(key, lay, "forward", t, 2 * numel * item))
            t = time_threads(backward_variants(x, w, b, dy, args.device), threads_list, args.repeats, burst,
                             args.device)
            rows.append(row_for(key, lay, "backward", t, 3 * numel * item))
    meta["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    summary = summarize(rows)
    print(markdown(rows, summary, meta))
    if args.json:
        bc.write_json_atomic(args.json, {"meta": meta, "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
