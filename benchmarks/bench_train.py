"""Training-step benchmark: ddpm_fast's Trainer step against plain PyTorch training steps, one piece at a time,
same preset, batch, dtype and recipe (AdamW, grad clip 1.0, EMA), timed interleaved in one process. Rows, each
adding one thing to the row before it (its "gain" column is the ratio to that row):

    plain                      what improved-diffusion does: U-Net with fused=False, q_sample as torch ops with
                               torch.randn, eps-MSE, AdamW with torch's defaults, EMA as a Python loop over tensors
    plain strong               + fused AdamW and torch._foreach_lerp_ EMA (what ddpm_fast's Trainer uses): the
                               strongest plain step, the baseline of the ddpm_fast rows
    plain strong CL            + channels_last model and data (GPU: the Trainer's layout there)
    plain strong + fused GN    + ddpm_fast's fused GroupNorm+SiLU in the U-Net
    ddpm_fast eager            the Trainer's step: + fused q_sample (noise drawn in the op), its step machinery
    ddpm_fast cuda-graph       + the whole step as one CUDA graph (GPU)

    python benchmarks/bench_train.py --device cpu           # tiny preset on 8x8x1 (digits' size), batch 64, fp32
    python benchmarks/bench_train.py --device cuda          # CIFAR preset, batch 128, bf16 autocast
    python benchmarks/bench_train.py --quick                # dry run

Each timed call runs ``--burst`` optimizer steps. The Trainer is fed random data from an .npz file in a temporary
directory (its real data path); inputs are device tensors, so data loading is not measured. JSON:
<out-dir>/train-<device>-<date>.json, with the commit measured (a dirty tree is refused without --allow-dirty).
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
    """A plain eager step per call (autocast when dtype is bf16). strong: fused AdamW and a foreach EMA (else
    torch's default AdamW and a Python EMA loop); channels_last model and data; fused: the U-Net's fused
    GroupNorm+SiLU."""

    def __init__(self, preset, image_size, channels, device, dtype, seed, strong=False, channels_last=False,
                 fused=False):
        from ddpm_fast import UNet
        torch.manual_seed(seed)
        self.model = UNet.preset(preset, image_size=image_size, in_channels=channels, fused=fused).to(device)
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.fmt).train()
        self.diffusion = PlainDiffusion.for_model(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=2e-4, weight_decay=0.0,
                                           fused=True if strong else None)
        self.ema = [p.detach().clone() for p in self.model.parameters()]
        self.dtype, self.strong = DTYPES[dtype], strong

    def __call__(self, x0):
        return plain_train_step(self.model, self.optimizer, x0.contiguous(memory_format=self.fmt), self.diffusion,
                                dtype=self.dtype, grad_clip=1.0, ema=self.ema, ema_foreach=self.strong)


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
    cuda = device.type == "cuda"
    plain = dict(preset=preset, image_size=size, channels=channels, device=device, dtype=args.dtype, seed=args.seed)
    variants = {"plain": PlainStep(**plain), "plain strong": PlainStep(**plain, strong=True)}
    if cuda:
        variants["plain strong CL"] = PlainStep(**plain, strong=True, channels_last=True)
    variants["plain strong + fused GN"] = PlainStep(**plain, strong=True, channels_last=cuda, fused=True)
    variants["ddpm_fast eager"] = FastStep(preset, args.batch, npz, os.path.join(tmp, "eager"), device,
                                           args.dtype, False, args.seed)
    if cuda:
        variants["ddpm_fast cuda-graph"] = FastStep(preset, args.batch, npz, os.path.join(tmp, "graph"), device,
                                                    args.dtype, True, args.seed)
    x0 = torch.rand(args.batch, channels, size, size, device=device) * 2 - 1
    burst = args.burst
    fns = {name: (lambda step=step: [step(x0) for _ in range(burst)]) for name, step in variants.items()}
    return fns, variants["plain"].model.config


def _median_per_step(t, burst):
    return t.stats()["median"] / burst if t.error is None and t.times_s else None


def rows_of(timed, args, gflops, matmul):
    """One row per variant: time per step and its spread, speedups over the plain and the strong plain step, and
    the gain of the piece it adds (its time vs the previous row's)."""
    per_step = {name: _median_per_step(t, args.burst) for name, t in timed.items()}
    base, strong = per_step.get("plain"), per_step.get("plain strong")
    rows, previous = [], None
    for name, t in timed.items():
        row = {"variant": name, "batch": args.batch, "dtype": args.dtype, "error": t.error,
               "first_call_s": t.first_call_s}
        med = per_step[name]
        if med is not None:
            s = {k: v / args.burst for k, v in t.stats().items()}
            # forward + backward ~ 3 forwards of FLOPs
            tflops = 3 * gflops * 1e9 * args.batch / med / 1e12
            row.update(ms_per_step=med * 1e3, min_ms=s["min"] * 1e3, max_ms=s["max"] * 1e3,
                       steps_per_s=1 / med, images_per_s=args.batch / med,
                       speedup_vs_plain=base / med if base else None,
                       speedup_vs_strong_plain=strong / med if strong else None,
                       gain_of_piece=previous / med if previous else None, tflops=tflops,
                       pct_of_matmul=100 * tflops / matmul["tflops"])
        previous = med
        if t.peak_bytes is not None:
            row["peak_mib"] = t.peak_bytes / 2 ** 20
        rows.append(row)
    return rows


COLUMNS = [("variant", "variant", ""), ("batch", "batch", "d"), ("dtype", "dtype", ""),
           ("ms/step", "ms_per_step", ".2f"), ("min-max ms", "min_ms", lambda v, r: f"{v:.2f}-{r['max_ms']:.2f}"),
           ("steps/s", "steps_per_s", ".2f"), ("img/s", "images_per_s", ".0f"),
           ("vs plain", "speedup_vs_plain", lambda v, r: f"{v:.2f}x"),
           ("vs plain strong", "speedup_vs_strong_plain", lambda v, r: f"{v:.2f}x"),
           ("gain of this row's piece", "gain_of_piece", lambda v, r: f"{v:.2f}x"), ("TFLOP/s", "tflops", ".3g"),
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
    ap.add_argument("--allow-dirty", action="store_true",
                    help="measure a working tree with uncommitted changes (the JSON records dirty: true)")
    args = ap.parse_args(argv)
    d = DEFAULTS[args.device]
    if args.quick:
        args.preset, args.batch, args.burst, args.repeats, args.warmup = args.preset or "tiny", args.batch or 8, \
            2, 2, 1
    args.preset, args.batch, args.dtype = args.preset or d["preset"], args.batch or d["batch"], args.dtype or d["dtype"]
    return args


def main(argv=None):
    args = parse_args(argv)
    source = bc.provenance(args.allow_dirty, "bench_train")  # before any work
    device = bc.bench_device(args.device, args.threads, "bench_train")
    path = bc.result_path(args.out_dir, "train-", device, args.quick)
    meta = bc.environment(device, source)
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
