"""Classifier-free guidance: ddpm_fast's guided sampling against guidance written in plain PyTorch, same weights.

A class-conditional U-Net (the preset with num_classes=10, random weights: speed does not depend on them) samples
``batch`` images of random classes with ``steps`` DDPM steps at guidance scale w = 3. Variants:

    plain, two calls      eager plain U-Net (nn.GroupNorm + SiLU), per step model(x, t, y) and model(x, t, null),
                          eps_u + w (eps_c - eps_u) and the posterior step as torch ops, torch.randn noise
                          (bench/baseline.plain_guided_sample): the naive loop
    plain, one 2B call    the same with the conditional and unconditional halves as ONE batch of 2B: the best a
                          user writes in plain PyTorch
    ddpm_fast guided      ddpm_fast.sample(labels=..., guidance_scale=w): one 2B call per step, the combine inside
                          the fused step kernel, precomputed class conditioning, the whole loop as one CUDA graph
                          on a GPU
    ddpm_fast, w = 1      ddpm_fast.sample with the labels and no guidance (B per call): what guidance costs
Timed interleaved (bench/common.time_interleaved): medians and spread of whole sampling calls; speedups against
the naive loop and against the best plain variant.

    OMP_NUM_THREADS=1 python benchmarks/bench_guidance.py --threads 1                 # CPU: tiny 8x8 b16, b64
    python benchmarks/bench_guidance.py --device cuda --cases ddpm_cifar10:bf16:64:100  # GPU
    python benchmarks/bench_guidance.py --quick --allow-dirty                        # dry run (the GPU suite's)
JSON: <out-dir>/guidance-<device>-<date>.json.
"""
import argparse
import os
import sys

import torch

from ddpm_fast.bench import common as bc
from ddpm_fast.bench.baseline import PlainDiffusion, plain_guided_sample

CPU_CASES = "tiny:fp32:16:50,tiny:fp32:64:50"
GPU_CASES = "ddpm_cifar10:bf16:64:100,ddpm_cifar10:fp32:8:100"
DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
W = 3.0


def build(preset, dtype_name, device, seed):
    """(plain U-Net, fused U-Net): the same random weights, eval mode; the plain one in the case's dtype, the fused
    one in float32 (ddpm_fast runs it under autocast for bf16/fp16, as ddpm-fast bench does)."""
    from ddpm_fast.models import UNet
    torch.manual_seed(seed)
    plain = UNet.preset(preset, fused=False, num_classes=10).eval()
    fused = UNet.preset(preset, fused=True, num_classes=10).eval()
    fused.load_state_dict(plain.state_dict())
    return plain.to(device=device, dtype=DTYPE[dtype_name]), fused.to(device)


def variants(plain, fused, dtype_name, batch, steps, device, seed):
    import ddpm_fast
    labels = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(seed)).to(device)
    diffusion = PlainDiffusion.for_model(plain, steps, device)
    dtype = DTYPE[dtype_name]
    kw = dict(seed=seed, progress=False, labels=labels, dtype=dtype, spacing="linspace", threads=None)

    def plain_run(batched):
        return lambda: plain_guided_sample(plain, batch, steps, labels, W, null_label=10, batched=batched,
                                           diffusion=diffusion)
    return {"plain, two calls": plain_run(False), "plain, one 2B call": plain_run(True),
            "ddpm_fast guided": lambda: ddpm_fast.sample(fused, batch, steps, guidance_scale=W, **kw),
            "ddpm_fast, w = 1": lambda: ddpm_fast.sample(fused, batch, steps, guidance_scale=1.0, **kw)}


def run_case(spec, args, device):
    preset, dtype_name, batch, steps = spec.split(":")
    batch, steps = int(batch), int(steps)
    plain, fused = build(preset, dtype_name, device, args.seed)
    fns = variants(plain, fused, dtype_name, batch, steps, device, args.seed)
    with torch.inference_mode():
        timed = bc.time_interleaved(fns, device, repeats=args.repeats, warmup=args.warmup, log=print)
    rows = []
    for name, t in timed.items():
        if t.error is not None:
            rows.append({"case": spec, "variant": name, "error": t.error})
            continue
        st = t.stats()
        rows.append({"case": spec, "variant": name, "median_s": st["median"], "min_s": st["min"],
                     "max_s": st["max"], "ms_per_step": 1e3 * st["median"] / steps,
                     "first_call_s": t.first_call_s, "peak_bytes": t.peak_bytes})
    times = {r["variant"]: r.get("median_s") for r in rows}
    naive = times.get("plain, two calls")
    best_plain = min((v for k, v in times.items() if k.startswith("plain") and v), default=None)
    for r in rows:
        if r.get("median_s"):
            r["vs_naive"] = naive / r["median_s"] if naive else None
            r["vs_best_plain"] = best_plain / r["median_s"] if best_plain else None
    return rows


COLUMNS = [("case", "case", ""), ("variant", "variant", ""), ("median s", "median_s", ".3f"),
           ("min-max s", "min_s", lambda v, r: f"{v:.3f}-{r['max_s']:.3f}"), ("ms/step", "ms_per_step", ".2f"),
           ("vs naive", "vs_naive", ".2f"), ("vs best plain", "vs_best_plain", ".2f")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--cases", default=None, help="preset:dtype:batch:steps,... (default: CPU "
                    f"{CPU_CASES}; GPU {GPU_CASES})")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--json", default=None, help="write the JSON here instead of <out-dir>/guidance-...json")
    ap.add_argument("--quick", action="store_true", help="dry run: tiny batch 2, 3 steps, 2 repeats, no warm-up")
    ap.add_argument("--allow-dirty", action="store_true", help="measure a tree with uncommitted changes")
    args = ap.parse_args(argv)
    source = bc.provenance(args.allow_dirty, "bench_guidance")
    if args.quick:
        args.cases, args.repeats, args.warmup = "tiny:fp32:2:3", 2, 0
    cases = args.cases or (GPU_CASES if args.device == "cuda" else CPU_CASES)
    device = bc.bench_device(args.device, args.threads, "bench_guidance")
    meta = bc.environment(device, source)
    rows = [r for spec in cases.split(",") for r in run_case(spec, args, device)]
    meta["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    path = args.json or bc.result_path(args.out_dir, "guidance-", device, args.quick)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    bc.write_json_atomic(path, {"meta": meta, "args": vars(args), "guidance_scale": W, "rows": rows})
    print(f"\n## Guided sampling (w = {W:g}): {meta['device']}, {meta['date']}, torch {meta['torch']}, "
          f"{meta['threads']} threads, commit {meta['git_commit']}, load average {meta['load_average_start']} -> "
          f"{meta['load_average_end']}")
    print(bc.markdown_table([r for r in rows if "error" not in r], COLUMNS))
    for r in rows:
        if "error" in r:
            print(f"- {r['case']} {r['variant']}: FAILED {r['error']}")
    print(f"\nJSON: {path}", flush=True)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
