"""Training-step benchmark: ddpm_fast's Trainer step (fused U-Net, fused q_sample, optionally one CUDA graph per
step) against the plain PyTorch step a user writes (the same U-Net with fused=False, q_sample as torch ops with
torch.randn, eps-MSE, AdamW with torch's defaults, grad clip and an EMA loop as improved-diffusion's), same
preset, batch, dtype and recipe (AdamW, grad clip 1.0, EMA), timed interleaved in one process.

    python benchmarks/bench_train.py --device cpu           # tiny preset on 8x8x1 (digits' size), batch 64, fp32
    python benchmarks/bench_train.py --device cuda          # CIFAR preset, batch 128, bf16 autocast
    python benchmarks/bench_train.py --quick                # dry run

Each timed call runs ``--burst`` optimizer steps. The Trainer is fed random data from an .npz file in a temporary
directory (its real data path); inputs are device tensors, so data loading is not measured. JSON:
<out-dir>/train-<device>-<date>.json.
"""
import argparse
import os
import sys
import tempfile

import numpy as np
import torch

from ddpm_fast.bench import common as bc
from ddpm_fast.bench.baseline import PlainDiffusion, plain_train_step

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
DEFAULTS = {"cpu": dict(preset="tiny", batch=64, dtype="fp32"), "cuda": dict(preset="ddpm_cifar10", batch=128,
                                                                             dtype="bf16")}
IMAGES = {"tiny": (8, 1), "ddpm_cifar10": (32, 3)}  # default (image size, channels): digits' and CIFAR-10's


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class PlainStep:
    """The baseline: one eager step per call with autocast when dtype is bf16; EMA as a Python loop."""

    def __init__(self, preset, image_size, channels, device, dtype, seed):
        from ddpm_fast import UNet
        torch.manual_seed(seed)
        self.model = UNet.preset(preset, image_size=image_size, in_channels=channels, fused=False).to(device)
        self.model.train()
        self.diffusion = PlainDiffusion.for_model(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=2e-4, weight_decay=0.0)
        self.ema = [p.detach().clone() for p in self.model.parameters()]
        self.dtype = DTYPES[dtype]

    def __call__(self, x0):
        return plain_train_step(self.model, self.optimizer, x0, self.diffusion, dtype=self.dtype, grad_clip=1.0,
                                ema=self.ema)


class FastStep:
    """ddpm_fast's Trainer.train_step on the same batch (random timesteps drawn per call, as the trainer's data
    path draws them); the first call of the graph variant captures."""

    def __init__(self, preset, batch, npz, run_dir, device, dtype, cuda_graph, seed):
        from ddpm_fast.training import Trainer, TrainConfig
        cfg = TrainConfig(dataset=f"npz:{npz}", preset=preset, steps=10 ** 9, batch_size=batch, lr=2e-4,
                          warmup=0, amp="none" if dtype == "fp32" else dtype, out=run_dir, seed=seed,
                          cuda_graph=cuda_graph, device=str(device))
        self.trainer = Trainer(cfg, log=lambda msg: None)
        self.T = self.trainer.tables.num_steps

    def __call__(self, x0):
        t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device)
        self.trainer.train_step(x0, t)


def random_npz(directory, n, image_size, channels, seed):
    """n random uint8 images (N, H, W, C) in an .npz the Trainer reads as its dataset ``npz:FILE``."""
    rng = np.random.default_rng(seed)
    path = os.path.join(directory, "random.npz")
    np.savez(path, images=rng.integers(0, 256, (n, image_size, image_size, channels), dtype=np.uint8))
    return path


def make_variants(args, device, tmp):
    preset = args.preset
    size, channels = IMAGES[preset]
    size = args.image_size or size
    npz = random_npz(tmp, 2 * args.batch + 16, size, channels, args.seed)
    variants = {"plain eager": PlainStep(preset, size, channels, device, args.dtype, args.seed)}
    variants["ddpm_fast eager"] = FastStep(preset, args.batch, npz, os.path.join(tmp, "eager"), device,
                                           args.dtype, False, args.seed)
    if device.type == "cuda":
        variants["ddpm_fast cuda-graph"] = FastStep(preset, args.batch, npz, os.path.join(tmp, "graph"), device,
                                                    args.dtype, True, args.seed)
    x0 = torch.rand(args.batch, channels, size, size, device=device) * 2 - 1
    burst = args.burst
    fns = {name: (lambda step=step: [step(x0) for _ in range(burst)]) for name, step in variants.items()}
    return fns, variants["plain eager"].model.config


def rows_of(timed, args, gflops, matmul):
    base = timed["plain eager"].stats()["median"] if not timed["plain eager"].error else None
    rows = []
    for name, t in timed.items():
        row = {"variant": name, "batch": args.batch, "dtype": args.dtype, "error": t.error,
               "first_call_s": t.first_call_s}
        if t.error is None and t.times_s:
            s = {k: v / args.burst for k, v in t.stats().items()}
            # forward + backward ~ 3 forwards of FLOPs
            tflops = 3 * gflops * 1e9 * args.batch / s["median"] / 1e12
            row.update(ms_per_step=s["median"] * 1e3, min_ms=s["min"] * 1e3, max_ms=s["max"] * 1e3,
                       steps_per_s=1 / s["median"], images_per_s=args.batch / s["median"],
                       speedup_vs_plain=base / args.burst / s["median"] if base else None, tflops=tflops,
                       pct_of_matmul=100 * tflops / matmul["tflops"])
        if t.peak_bytes is not None:
            row["peak_mib"] = t.peak_bytes / 2 ** 20
        rows.append(row)
    return rows


COLUMNS = [("variant", "variant", ""), ("batch", "batch", "d"), ("dtype", "dtype", ""),
           ("ms/step", "ms_per_step", ".2f"), ("min-max ms", "min_ms", lambda v, r: f"{v:.2f}-{r['max_ms']:.2f}"),
           ("steps/s", "steps_per_s", ".2f"), ("img/s", "images_per_s", ".0f"),
           ("vs plain", "speedup_vs_plain", lambda v, r: f"{v:.2f}x"), ("TFLOP/s", "tflops", ".3g"),
           ("% matmul", "pct_of_matmul", ".1f"), ("peak MiB", "peak_mib", ".0f"),
           ("first call s", "first_call_s", ".2f")]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--preset", choices=("tiny", "ddpm_cifar10"), help="default: CPU tiny, GPU ddpm_cifar10")
    ap.add_argument("--image-size", type=int, help="default: tiny 8 (digits), ddpm_cifar10 32")
    ap.add_argument("--batch", type=int, help="default: CPU 64, GPU 128")
    ap.add_argument("--dtype", choices=tuple(DTYPES), help="autocast dtype (default: CPU fp32, GPU bf16)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--burst", type=int, default=5, help="optimizer steps per timed call")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="dry run: tiny preset, batch 8, burst 2, 2 repeats")
    args = ap.parse_args(argv)
    d = DEFAULTS[args.device]
    if args.quick:
        args.preset, args.batch, args.burst, args.repeats, args.warmup = args.preset or "tiny", args.batch or 8, \
            2, 2, 1
    args.preset, args.batch, args.dtype = args.preset or d["preset"], args.batch or d["batch"], args.dtype or d["dtype"]
    return args


def main(argv=None):
    args = parse_args(argv)
    device = bc.bench_device(args.device, args.threads, "bench_train")
    path = bc.result_path(args.out_dir, "train-", device, args.quick)
    meta = bc.environment(device)
    matmul = bc.matmul_tflops(device, size=512 if args.quick else None)
    with tempfile.TemporaryDirectory(prefix="ddpm_fast_bench_train_") as tmp:
        fns, unet_config = make_variants(args, device, tmp)
        gflops = bc.unet_gflops(unet_config)
        log(f"bench_train: {meta['device']}, {unet_config.image_size}x{unet_config.image_size}x"
            f"{unet_config.in_channels}, batch {args.batch}, {args.dtype}, {args.burst} steps per call")
        timed = bc.time_interleaved(fns, device, args.repeats, args.warmup, log=log)
    rows = rows_of(timed, args, gflops, matmul)
    meta["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    failures = [{"variant": r["variant"], "error": r["error"]} for r in rows if r["error"]]
    bc.write_json_atomic(path, {"meta": meta, "args": vars(args), "matmul": matmul, "gflops_per_image": gflops,
                                "rows": rows, "failures": failures})
    print(f"\n## Training step: {meta['device']}, {meta['date']}, torch {meta['torch']}, {meta['threads']} threads, "
          f"commit {meta['git_commit']}, load average {meta['load_average_start']} -> {meta['load_average_end']}")
    print(f"preset {unet_config.image_size}x{unet_config.image_size}x{unet_config.in_channels} "
          f"({gflops:.3f} GFLOP per image-forward), matmul {matmul['tflops']:.3f} TFLOP/s ({matmul['dtype']})")
    print(bc.markdown_table([r for r in rows if "ms_per_step" in r], COLUMNS))
    for f in failures:
        print(f"- {f['variant']} FAILED: {f['error']}")
    print(f"\nJSON: {path}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
