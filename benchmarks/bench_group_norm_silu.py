"""Fused GroupNorm+SiLU vs PyTorch's F.silu(F.group_norm(...)), forward and backward, on the GroupNorm+SiLU
sites of the DDPM CIFAR-10 U-Net (45 sites, 11 distinct shapes, G = 32).

Variants run interleaved in one process (round-robin within every repeat, each repeat timing a burst of calls);
we report the median time per call, the p25-p75 spread, the speedup over PyTorch and the fused op's effective
bandwidth (forward: x read + y written; backward: x, dy read + dx written). On CUDA also Triton, torch.compile of
the two PyTorch ops, and a plain copy of the same bytes (the bandwidth ceiling). Markdown to stdout; with
--json PATH the rows too (written atomically).

    python benchmarks/bench_group_norm_silu.py                        # CPU, batch 8, fp32, all threads
    python benchmarks/bench_group_norm_silu.py --device cuda --dtype bfloat16 --batch 64
    python benchmarks/bench_group_norm_silu.py --quick                # dry run with tiny settings
"""
import argparse
import datetime
import json
import math
import os
import platform
import statistics
import tempfile

import torch
import torch.nn.functional as F

from ddpm_fast.ops import _ext
from ddpm_fast.ops.group_norm_silu import group_norm_silu
from ddpm_fast.bench.common import time_bursts

# (C, H*W) -> number of sites in one forward of the DDPM CIFAR-10 U-Net (counted with forward hooks on
# ddpm_fast.models' ddpm_cifar10 preset; every site has G = 32).
UNET_SITES = {(128, 1024): 8, (128, 256): 1, (256, 1024): 2, (256, 256): 6, (256, 64): 7, (256, 16): 11,
              (384, 1024): 1, (384, 256): 1, (512, 256): 2, (512, 64): 3, (512, 16): 3}
GROUPS = 32


def _machine(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


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
    v = {"torch": lambda: F.silu(F.group_norm(xd, GROUPS, w.to(x.dtype), b.to(x.dtype))),
         "fused": lambda: group_norm_silu(xd, GROUPS, w, b)}
    if device == "cuda":
        from ddpm_fast.ops.triton.group_norm_silu import _group_norm_silu_fwd
        compiled = torch.compile(lambda t, ww, bb: F.silu(F.group_norm(t, GROUPS, ww, bb)))
        wd, bd = w.detach().to(x.dtype), b.detach().to(x.dtype)
        out = torch.empty_like(xd)
        v["triton"] = lambda: _group_norm_silu_fwd(xd, w, b, GROUPS, 1e-5)
        v["torch.compile"] = lambda: compiled(xd, wd, bd)
        v["copy"] = lambda: out.copy_(xd)
    return v


def backward_variants(x, w, b, dy, device):
    """name -> zero-argument callable computing (dx, dweight, dbias) from a retained graph."""
    y_torch = F.silu(F.group_norm(x, GROUPS, w.to(x.dtype), b.to(x.dtype)))
    y_fused = group_norm_silu(x, GROUPS, w, b)
    v = {"torch": lambda: torch.autograd.grad(y_torch, (x, w, b), dy, retain_graph=True),
         "fused": lambda: torch.autograd.grad(y_fused, (x, w, b), dy, retain_graph=True)}
    if device == "cuda":
        from ddpm_fast.ops.triton.group_norm_silu import _group_norm_silu_bwd, _group_norm_silu_fwd
        _, mean, rstd = _group_norm_silu_fwd(x.detach(), w, b, GROUPS, 1e-5)
        xd = x.detach()
        dx_out, dy2 = torch.empty_like(xd), torch.empty_like(xd)
        v["triton"] = lambda: _group_norm_silu_bwd(dy, xd, w, b, mean, rstd, GROUPS)
        v["copy"] = lambda: (dx_out.copy_(xd), dy2.copy_(dy))  # 2 reads + 2 writes >= the 3 tensors moved
    return v


def rows_for(shape_key, pass_name, times, moved_bytes):
    C, HW = shape_key
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"C": C, "HW": HW, "sites": UNET_SITES.get(shape_key, 1), "pass": pass_name,
           "speedup": med["torch"] / med["fused"], "fused_GBps": moved_bytes / med["fused"] / 1e9}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        row[f"{name}_ms"] = med[name] * 1e3
        row[f"{name}_spread_ms"] = [q[0] * 1e3, q[2] * 1e3]
    return row


def summarize(rows):
    out = {}
    for p in ("forward", "backward"):
        rs = [r for r in rows if r["pass"] == p]
        if not rs:
            continue
        geo = math.exp(sum(math.log(r["speedup"]) for r in rs) / len(rs))
        unet = {k: sum(r[f"{k}_ms"] * r["sites"] for r in rs) for k in ("torch", "fused")}
        out[p] = {"geomean_speedup": geo, "unet_torch_ms": unet["torch"], "unet_fused_ms": unet["fused"]}
    return out


def markdown(rows, summary, meta):
    extra = []  # the other variants (CUDA: triton, torch.compile, copy), in first-seen order
    for r in rows:
        extra += [k[:-3] for k in r if k.endswith("_ms") and not k.endswith("_spread_ms")
                  and k[:-3] not in ("torch", "fused", *extra)]
    head = ["C x HW", "pass", "torch ms", "fused ms", "speedup", "fused GB/s"] + [f"{e} ms" for e in extra]
    lines = [f"{meta['machine']} | {meta['device']} | threads {meta['threads']} | {meta['dtype']} | "
             f"{meta['layout']} | batch {meta['batch']} | torch {meta['torch']} | {meta['date']}"
             + (f" | load avg {meta['loadavg']}" if meta.get("loadavg") else ""), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        def ms(k):
            if f"{k}_ms" not in r:
                return "-"
            lo, hi = r[f"{k}_spread_ms"]
            return f"{r[k + '_ms']:.3f} ({lo:.3f}-{hi:.3f})"
        cells = [f"{r['C']} x {r['HW']}", r["pass"], ms("torch"), ms("fused"), f"{r['speedup']:.2f}x",
                 f"{r['fused_GBps']:.1f}"] + [ms(e) for e in extra]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for p, s in summary.items():
        lines.append(f"{p}: geometric-mean speedup {s['geomean_speedup']:.2f}x over the shapes; all 45 U-Net sites "
                     f"torch {s['unet_torch_ms']:.2f} ms vs fused {s['unet_fused_ms']:.2f} ms")
    return "\n".join(lines)


def write_atomic(path, payload):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 64 on CUDA")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--burst", type=int, default=None, help="calls per timed repeat (default: by size)")
    ap.add_argument("--quick", action="store_true", help="dry run: 2 shapes, batch 2, 3 repeats")
    ap.add_argument("--json", default=None, help="also write the results here (atomically)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    batch = args.batch or (8 if args.device == "cpu" else 64)
    shapes = list(UNET_SITES)
    if args.quick:
        shapes, batch, args.repeats = [(128, 256), (256, 16)], 2, 3
    meta = {"device": args.device, "machine": _machine(args.device), "threads": torch.get_num_threads(),
            "dtype": str(dtype).replace("torch.", ""), "layout": "channels_last" if args.channels_last else "NCHW",
            "batch": batch, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "extension": {"cpu": _ext.has_cpu_kernels(), "cuda": _ext.has_cuda_kernels()},
            "loadavg": " ".join(f"{v:.1f}" for v in os.getloadavg()) if args.device == "cpu" else None}
    rows = []
    for key in shapes:
        C, HW = key
        x, w, b, dy = make_case(C, HW, batch, dtype, args.device, args.channels_last)
        numel, item = x.numel(), x.element_size()
        burst = args.burst or max(1, min(50, int(2e6 // numel)))
        rows.append(rows_for(key, "forward", time_bursts(forward_variants(x, w, b, args.device), args.repeats,
                                                              burst, args.device), 2 * numel * item))
        rows.append(rows_for(key, "backward", time_bursts(backward_variants(x, w, b, dy, args.device),
                                                               args.repeats, burst, args.device), 3 * numel * item))
    summary = summarize(rows)
    print(markdown(rows, summary, meta))
    if args.json:
        write_atomic(args.json, {"meta": meta, "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
