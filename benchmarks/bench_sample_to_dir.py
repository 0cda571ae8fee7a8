"""Throughput of evaluation-scale sampling (ddpm_fast.sample_to_dir / `ddpm-fast sample --out-dir`).

--mode processes (the CPU default): the same run under torchrun with 1 process x 1 thread, 2 processes x 1 thread,
    and, as the strongest thing a user could do instead on 2 cores, 1 process x 2 threads; the bundled model (or
    --checkpoint). Each repeat is a fresh `python -m torch.distributed.run ... -m ddpm_fast sample --out-dir`
    into a new directory, the variants interleaved (order rotated each round). Reported: the drawing rate (the
    run's own summary: images / the slowest rank's drawing time) and the end-to-end rate (n / the command's wall
    time, process start-up included), median of the repeats with min-max; and whether each variant's arr_0 is
    byte for byte the 1 x 1 run's (it must be for 2 x 1: same thread count per process).
--mode batches (the CUDA default): images/s of the CIFAR-10 U-Net (ddpm_cifar10 preset, random weights: speed
    does not depend on them) in one process at each --batch-sizes value: a warm-up run of one chunk (graph
    capture, Triton compilation), then --chunks chunks timed; the best batch size is named. Also runs on the CPU
    (--quick: the tiny preset, tiny settings), which is the GPU suite's dry run.

    python benchmarks/bench_sample_to_dir.py --out-dir /tmp/bench                     # CPU: 1 vs 2 processes
    python benchmarks/bench_sample_to_dir.py --device cuda --out-dir benchmarks/results
    python benchmarks/bench_sample_to_dir.py --mode batches --device cpu --quick       # the dry run

JSON: <out-dir>/sample_to_dir-<device>-<date>[-quick].json, with the commit measured (a dirty tree is refused
without --allow-dirty).
"""
import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from ddpm_fast.bench import common as bc

VARIANTS = {"1 process x 1 thread": (1, 1), "2 processes x 1 thread": (2, 1), "1 process x 2 threads": (1, 2)}
SHORT = {f"{p}x{t}": name for name, (p, t) in VARIANTS.items()}  # --variants 1x1,2x1,1x2
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---- processes: torchrun on the CPU ---------------------------------------------------------------------------

def run_command(nproc, threads, args, out_dir):
    """One `torchrun -m ddpm_fast sample --out-dir` -> (wall s, drawing images/s, sha256 of arr_0)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("DDPM_FAST_TEST_FAULT", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m",
           "ddpm_fast", "sample", "-n", str(args.n), "--steps", str(args.steps), "--batch-size", str(args.batch),
           "--seed", "0", "--device", "cpu", "--out-dir", out_dir, "--no-progress"]
    cmd += ["--checkpoint", args.checkpoint] if args.checkpoint else []
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600, cwd=out_dir)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-2000:]}")
    rate = float(re.search(r"; ([\d.]+) images/s drawn by", done.stdout).group(1))
    with np.load(os.path.join(out_dir, "samples.npz")) as data:
        digest = hashlib.sha256(data["arr_0"].tobytes()).hexdigest()
    return wall, rate, digest


def processes_mode(args):
    names = [SHORT[v] for v in args.variants]
    results = {name: {"wall_s": [], "rate": [], "digests": set()} for name in names}
    with tempfile.TemporaryDirectory(prefix="ddpm_fast_bench_shard_") as tmp:
        for r in range(args.repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                out = os.path.join(tmp, f"{r}-{len(results[name]['rate'])}-{name.replace(' ', '_')}")
                os.makedirs(out)
                wall, rate, digest = run_command(*VARIANTS[name], args, out)
                res = results[name]
                res["wall_s"].append(wall)
                res["rate"].append(rate)
                res["digests"].add(digest)
                log(f"round {r + 1}/{args.repeats} {name}: {rate:.1f} images/s drawing, {wall:.1f} s wall")
    return rows_of_processes(results, args)


def rows_of_processes(results, args):
    base = results["1 process x 1 thread"]
    base_rate, base_wall = np.median(base["rate"]), np.median(base["wall_s"])
    rows = []
    for name, res in results.items():
        nproc, threads = VARIANTS[name]
        rate, wall = float(np.median(res["rate"])), float(np.median(res["wall_s"]))
        rows.append({"variant": name, "processes": nproc, "threads": threads, "images_per_s": rate,
                     "min_rate": min(res["rate"]), "max_rate": max(res["rate"]), "wall_s": wall,
                     "min_wall_s": min(res["wall_s"]), "max_wall_s": max(res["wall_s"]),
                     "end_to_end_images_per_s": args.n / wall, "speedup": rate / base_rate,
                     "end_to_end_speedup": base_wall / wall, "repeats": len(res["rate"]),
                     "same_arr_0_as_1x1": res["digests"] == base["digests"] and len(res["digests"]) == 1})
    return rows


PROCESS_COLUMNS = [("variant", "variant", ""), ("images/s (drawing)", "images_per_s", ".1f"),
                   ("min-max", "min_rate", lambda v, r: f"{v:.1f}-{r['max_rate']:.1f}"),
                   ("vs 1x1", "speedup", lambda v, r: f"{v:.2f}x"), ("wall s", "wall_s", ".1f"),
                   ("images/s (end to end)", "end_to_end_images_per_s", ".1f"),
                   ("vs 1x1 end to end", "end_to_end_speedup", lambda v, r: f"{v:.2f}x"),
                   ("arr_0 == 1x1", "same_arr_0_as_1x1", lambda v, r: "yes" if v else "no")]


# ---- batches: one process, a batch-size sweep -------------------------------------------------------------------

def batches_mode(args, device):
    import ddpm_fast
    from ddpm_fast import UNet
    from ddpm_fast.sampling import last_run_info
    torch.manual_seed(0)
    model = UNet.preset(args.preset).to(device).eval()
    kw = dict(steps=args.steps, seed=0, dtype=DTYPES[args.dtype], progress=False)
    results = {b: {"rate": [], "warm_s": None, "last_chunk": None} for b in args.batch_sizes}
    with tempfile.TemporaryDirectory(prefix="ddpm_fast_bench_batches_") as tmp:
        for b in args.batch_sizes:  # warm-up: one chunk (captures, compiles)
            t0 = time.perf_counter()
            ddpm_fast.sample_to_dir(model, b, os.path.join(tmp, f"warm-{b}"), batch_size=b, **kw)
            results[b]["warm_s"] = time.perf_counter() - t0
        for r in range(args.repeats):
            order = args.batch_sizes[r % len(args.batch_sizes):] + args.batch_sizes[:r % len(args.batch_sizes)]
            for b in order:
                run = ddpm_fast.sample_to_dir(model, args.chunks * b, os.path.join(tmp, f"{r}-{b}"), batch_size=b,
                                              **kw)
                results[b]["rate"].append(run.drawn / run.rank_seconds[0])
                info = last_run_info()  # the last chunk's sample() call: did it replay a cached graph?
                results[b]["last_chunk"] = {k: info[k] for k in ("modes", "cache_hits")} | {
                    "captures": len(info["captures"])}
                log(f"round {r + 1}/{args.repeats} batch {b}: {results[b]['rate'][-1]:.1f} images/s")
    return [{"batch": b, "images_per_s": float(np.median(res["rate"])), "min_rate": min(res["rate"]),
             "max_rate": max(res["rate"]), "warm_up_s": res["warm_s"], "repeats": len(res["rate"]),
             "last_chunk": res["last_chunk"]} for b, res in results.items()]


BATCH_COLUMNS = [("batch", "batch", "d"), ("images/s", "images_per_s", ".1f"),
                 ("min-max", "min_rate", lambda v, r: f"{v:.1f}-{r['max_rate']:.1f}"),
                 ("warm-up s (1 chunk)", "warm_up_s", ".2f"),
                 ("last chunk", "last_chunk", lambda v, r: f"{v['modes']}, {v['captures']} captures, "
                                                           f"{v['cache_hits']} cache hits")]


# ---- the command --------------------------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("processes", "batches"), help="default: processes on cpu, batches on cuda")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--checkpoint", help="processes mode: the model (default: the bundled one)")
    ap.add_argument("--variants", default="1x1,2x1,1x2", help="processes mode: PROCESSESxTHREADS, 1x1 first "
                    "(default 1x1,2x1,1x2; --quick: 1x1,2x1)")
    ap.add_argument("--n", type=int, default=256, help="processes mode: images per run (default 256)")
    ap.add_argument("--batch", type=int, default=16, help="processes mode: images per chunk (default 16)")
    ap.add_argument("--steps", type=int, default=100, help="sampling steps (default 100)")
    ap.add_argument("--preset", default="ddpm_cifar10", help="batches mode: the U-Net preset (default ddpm_cifar10)")
    ap.add_argument("--dtype", choices=tuple(DTYPES), help="batches mode (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--batch-sizes", default="128,256,512", help="batches mode (default 128,256,512)")
    ap.add_argument("--chunks", type=int, default=3, help="batches mode: chunks per timed run (default 3)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="batches mode: torch threads (processes mode sets its own)")
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="dry run: tiny settings, one repeat")
    ap.add_argument("--allow-dirty", action="store_true",
                    help="measure a working tree with uncommitted changes (the JSON records dirty: true)")
    args = ap.parse_args(argv)
    args.mode = args.mode or ("processes" if args.device == "cpu" else "batches")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.variants = args.variants.split(",")
    if set(args.variants) - set(SHORT) or args.variants[0] != "1x1":
        ap.error(f"--variants: a comma-separated subset of {','.join(SHORT)}, starting with 1x1")
    if args.quick:
        args.variants = [v for v in args.variants if v != "1x2"]
        args.n, args.batch, args.steps, args.repeats, args.chunks = 8, 2, 2, 1, 2
        args.preset, args.batch_sizes = ("tiny", [2, 4]) if args.device == "cpu" else (args.preset, [128])
    if min([args.n, args.batch, args.steps, args.repeats, args.chunks] + args.batch_sizes) < 1:
        ap.error("--n, --batch, --steps, --repeats, --chunks and --batch-sizes must be positive")
    return args


def report(args, meta, rows):
    print(f"\n## sample_to_dir, {args.mode}: {meta['device']}, {meta['date']}, torch {meta['torch']}, commit "
          f"{meta['git_commit']}, load average {meta['load_average_start']} -> {meta['load_average_end']}")
    if args.mode == "processes":
        print(f"{args.n} images, batch {args.batch}, {args.steps} steps, "
              f"{args.checkpoint or 'the bundled model'}; median of {args.repeats}")
        print(bc.markdown_table(rows, PROCESS_COLUMNS))
    else:
        best = max(rows, key=lambda r: r["images_per_s"])
        print(f"{args.preset}, {args.dtype}, {args.steps} steps, {args.chunks} chunks per run; median of "
              f"{args.repeats}; best batch size {best['batch']}: {best['images_per_s']:.1f} images/s")
        print(bc.markdown_table(rows, BATCH_COLUMNS))


def main(argv=None):
    args = parse_args(argv)
    source = bc.provenance(args.allow_dirty, "bench_sample_to_dir")  # before any work
    device = bc.bench_device(args.device, args.threads if args.mode == "batches" else None, "bench_sample_to_dir")
    meta = bc.environment(device, source)
    rows = processes_mode(args) if args.mode == "processes" else batches_mode(args, device)
    meta["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    os.makedirs(args.out_dir, exist_ok=True)
    path = bc.write_json_atomic(bc.result_path(args.out_dir, "sample_to_dir-", device, args.quick),
                                {"meta": meta, "args": vars(args), "rows": rows})
    report(args, meta, rows)
    print(f"\nJSON: {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
