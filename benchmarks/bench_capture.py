"""CUDA-graph capture of ddpm_fast.sample: capture time, the device memory a graph takes, and replay speed, for the
whole-loop graph and the one-step graph at 100 and 1000 steps (the data to set sampling/graphs.WHOLE_GRAPH_MAX
by), plus one multi-chunk run showing one captured graph serving every chunk.

Per case (batch, steps, kind) the graph cache is cleared, then: the first ``sample`` call (warm-up + capture +
one replay), and ``--repeats`` more calls replaying the cached graph. From ``last_run_info()["captures"]``:
capture_s, graph_bytes (device memory the capture took, as the driver sees it) and pool_bytes (growth of the
graph's memory pool). The chunks case samples 3 x batch images in chunks of batch: one capture, 2 cache hits.

    python benchmarks/bench_capture.py --device cuda --json OUT.json           # CIFAR U-Net, bf16
    python benchmarks/bench_capture.py --dry-run --json OUT.json               # CPU, a stand-in graph backend

--dry-run runs on the CPU with the tiny preset and a stand-in for CUDA graphs (capture keeps the Python body,
replay re-runs it, memory reads 0), so CI exercises this script and the graph cache without a GPU.
"""
import argparse
import os
import sys
import time
import types

import torch

import ddpm_fast
from ddpm_fast.bench import common as bc
from ddpm_fast.sampling import graphs


class CpuStandIn(graphs.CudaGraphBackend):
    """CUDA graphs' contract on the CPU (as tests/sampling/test_sample.py's): replay re-runs the captured body."""

    def available(self, device):
        return True

    def pool(self):
        return None

    def side_stream(self, device):
        import contextlib
        return contextlib.nullcontext()

    def synchronize(self, device):
        pass

    def memory(self, device):
        return 0, 0

    def capture(self, body, pool, kind, device):
        return types.SimpleNamespace(replay=body)


def _cases(text):
    try:
        cases = [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item]
    except ValueError:
        cases = None
    if not cases or any(len(c) != 2 or min(c) < 1 for c in cases):
        raise argparse.ArgumentTypeError(f"expected batch:steps pairs, e.g. 1:100,1:1000; got {text!r}")
    return cases


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    ap.add_argument("--preset", default=None, help="U-Net preset (default: ddpm_cifar10; dry run: tiny)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16", help="model compute dtype (autocast)")
    ap.add_argument("--cases", type=_cases, default=None, help="batch:steps pairs (default 1:100,1:1000,64:100)")
    ap.add_argument("--kinds", default="whole,step", help="graph kinds to capture")
    ap.add_argument("--repeats", type=int, default=3, help="timed replays per case after the capturing call")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds: cases not started by then are skipped")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (dry run default: 1)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny preset, a stand-in graph backend")
    ap.add_argument("--json", default=None, help="write the results here (atomically)")
    ap.add_argument("--allow-dirty", action="store_true",
                    help="measure a working tree with uncommitted changes (the JSON records dirty: true)")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device, args.preset, args.dtype, args.threads = "cpu", args.preset or "tiny", "fp32", args.threads or 1
        args.cases, args.repeats = args.cases or [(1, 5), (2, 5)], min(args.repeats, 1)
    args.preset, args.cases = args.preset or "ddpm_cifar10", args.cases or [(1, 100), (1, 1000), (64, 100)]
    return args


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_sample(model, n, steps, device, **kw):
    _sync(device)
    t0 = time.perf_counter()
    ddpm_fast.sample(model, n, steps, seed=0, progress=False, **kw)
    _sync(device)
    return time.perf_counter() - t0, ddpm_fast.sampling.last_run_info()


def measure(model, batch, steps, kind, args, device):
    """One (batch, steps, kind) row: the capturing call and the replays."""
    graphs.clear_graph_cache()
    kw = dict(graph=kind, batch_size=batch, dtype=torch.bfloat16 if args.dtype == "bf16" else None,
              cuda_graph=True if device.type == "cuda" else "auto")
    first_s, info = _timed_sample(model, batch, steps, device, **kw)
    replays = [_timed_sample(model, batch, steps, device, **kw)[0] for _ in range(args.repeats)]
    row = {"batch": batch, "steps": steps, "kind": kind, "first_call_s": first_s, "modes": info["modes"],
           "captures": info["captures"]}
    if replays:
        replay = sorted(replays)[len(replays) // 2]
        row.update(replay_s=replay, ms_per_step=replay * 1e3 / steps)
    if info["captures"]:
        cap = info["captures"][0]
        row.update(capture_s=cap["capture_s"], graph_mib=cap["graph_bytes"] / 2 ** 20,
                   pool_mib=cap["pool_bytes"] / 2 ** 20)
    return row


def chunks_row(model, batch, steps, args, device):
    """3 x batch images in chunks of batch: with the offset in device memory, one capture serves all chunks."""
    graphs.clear_graph_cache()
    kw = dict(batch_size=batch, dtype=torch.bfloat16 if args.dtype == "bf16" else None)
    seconds, info = _timed_sample(model, 3 * batch, steps, device, **kw)
    return {"batch": batch, "steps": steps, "kind": "auto, 3 chunks", "first_call_s": seconds,
            "modes": info["modes"], "n_captures": len(info["captures"]), "cache_hits": info["cache_hits"]}


def run(args, device):
    model = ddpm_fast.models.UNet.preset(args.preset).eval().to(device)
    rows, skipped, start = [], [], time.perf_counter()
    for batch, steps in args.cases:
        for kind in args.kinds.split(","):
            if args.time_budget is not None and time.perf_counter() - start > args.time_budget:
                skipped.append({"batch": batch, "steps": steps, "kind": kind, "skipped": "time budget spent"})
                continue
            rows.append(measure(model, batch, steps, kind, args, device))
            print(f"{args.preset} {args.dtype} batch {batch} steps {steps} {kind}: "
                  f"{ {k: v for k, v in rows[-1].items() if k != 'captures'} }", flush=True)
    batch, steps = args.cases[0]
    rows.append(chunks_row(model, batch, steps, args, device))
    print(f"chunks: {rows[-1]}", flush=True)
    return rows, skipped


def main(argv=None):
    args = parse_args(argv)
    source = bc.provenance(args.allow_dirty, "bench_capture")  # before any work
    device = bc.bench_device(args.device, args.threads, "bench_capture")
    if args.dry_run:
        graphs.BACKEND = CpuStandIn()
    try:
        rows, skipped = run(args, device)
    finally:
        graphs.BACKEND = graphs.CudaGraphBackend()
        graphs.clear_graph_cache()
    meta = {**bc.environment(device, source), "preset": args.preset, "dtype": args.dtype, "dry_run": args.dry_run,
            "whole_graph_max": graphs.WHOLE_GRAPH_MAX,
            "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if args.json:
        bc.write_json_atomic(args.json, {"meta": meta, "rows": rows, "skipped": skipped})
    chunked = rows[-1]
    ok = chunked["n_captures"] <= 1 and chunked["cache_hits"] == 2
    print(f"one graph for every chunk: {'yes' if ok else 'NO'} ({chunked['n_captures']} capture(s), "
          f"{chunked['cache_hits']} cache hits)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
