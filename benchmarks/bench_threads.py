"""CPU thread count vs sampling time: is one thread faster than torch's default for small models?

Measures ``ddpm_fast.sample`` at each thread count two ways, interleaved round by round (the order alternates, so
neither count always runs after the other):
    set_num_threads   one process per case, torch.set_num_threads(k) before each timed call
    OMP_NUM_THREADS   a fresh process per timed call with OMP_NUM_THREADS=k (what `OMP_NUM_THREADS=k ddpm-fast
                      sample` does); the time is the sample call only, measured inside that process
Cases: the bundled 8x8 digits model (64 images, the `ddpm-fast sample` default batch), the tiny preset at 32x32x3
(batch 16) and the CIFAR-10 U-Net (batch 1); each with the model call's work, estimated as in
ddpm_fast.threads (parameters x pixels x batch), recorded beside it. The 1-minute load average is recorded
before and after every timed call: on a shared machine it decides the answer as much as the model does.

    python benchmarks/bench_threads.py                      # writes benchmarks/results/threads-<cpu>-<date>.json
    python benchmarks/bench_threads.py --quick              # dry run (1 round, 2 steps)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from ddpm_fast.bench import common as bc

CASES = {  # name: (preset or "bundled", image size, channels, n, steps)
    "bundled-8x8-n64": ("bundled", 8, 1, 64, 50),
    "tiny-32x32x3-n16": ("tiny", 32, 3, 16, 20),
    "cifar10-32x32x3-n1": ("ddpm_cifar10", 32, 3, 1, 3),
}
CHILD = r'''
import json, sys, time, torch
sys.path.insert(0, sys.argv[2])
from benchmarks.bench_threads import build, run_once
model, n, _ = build(sys.argv[1])
steps = int(sys.argv[3])
run_once(model, n, 2)                      # warm-up: allocations, weight layouts
print(json.dumps({"seconds": run_once(model, n, steps), "threads": torch.get_num_threads()}))
'''


def build(case):
    """(model, n, steps) of a case; weights from a fixed seed (the bundled model's own for "bundled")."""
    import ddpm_fast
    preset, size, channels, n, steps = CASES[case]
    if preset == "bundled":
        return ddpm_fast.load(), n, steps
    torch.manual_seed(0)
    return ddpm_fast.UNet.preset(preset, image_size=size, in_channels=channels).eval(), n, steps


def run_once(model, n, steps):
    import ddpm_fast
    t0 = time.perf_counter()
    ddpm_fast.sample(model, n, steps, seed=0, progress=False, threads=None)
    return time.perf_counter() - t0


def _load():
    return os.getloadavg()[0]


def _subprocess_time(case, threads, root, steps):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(
        filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", CHILD, case, root, str(steps)], env=env, capture_output=True, text=True,
                          cwd=root, timeout=3600)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["threads"] == threads, row
    return row["seconds"]


def measure(case, counts, rounds, root, log):
    """{mode: {threads: [(seconds, load before, load after), ...]}} for one case."""
    from ddpm_fast.threads import model_work
    model, n, steps = build(case)
    out = {"set_num_threads": {k: [] for k in counts}, "OMP_NUM_THREADS": {k: [] for k in counts}}
    before = torch.get_num_threads()
    run_once(model, n, 2)
    for r in range(rounds):
        order = counts if r % 2 == 0 else tuple(reversed(counts))
        for k in order:
            torch.set_num_threads(k)
            l0 = _load()
            out["set_num_threads"][k].append((run_once(model, n, steps), l0, _load()))
            l0 = _load()
            out["OMP_NUM_THREADS"][k].append((_subprocess_time(case, k, root, steps), l0, _load()))
            log(f"{case} round {r + 1}/{rounds} threads {k}: in-process {out['set_num_threads'][k][-1][0]:.2f} s, "
                f"subprocess {out['OMP_NUM_THREADS'][k][-1][0]:.2f} s (load {l0:.1f})")
    torch.set_num_threads(before)
    size = CASES[case][1]
    return {"n": n, "steps": steps, "work": model_work(model, (size, size), n), "timings": out}


def summarize(results):
    lines = [f"{'case':22s} {'mode':16s} " + " ".join(f"{f'{k} thr median s':>16s}" for k in (1, 2))
             + f" {'2/1':>6s}"]
    for case, res in results["cases"].items():
        for mode, per in res["timings"].items():
            med = {int(k): statistics.median(t for t, _, _ in v) for k, v in per.items()}
            lines.append(f"{case:22s} {mode:16s} " + " ".join(f"{med[k]:16.2f}" for k in sorted(med))
                         + f" {med[max(med)] / med[min(med)]:6.2f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out-dir", default="benchmarks/results")
    args = p.parse_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cases = [c for c in args.cases.split(",") if c]
    if args.quick:
        for c in CASES:
            CASES[c] = CASES[c][:4] + (2,)
        args.rounds = 1
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    results = {"meta": bc.environment("cpu"), "rounds": args.rounds, "cases": {}}
    for case in cases:
        results["cases"][case] = measure(case, (1, 2), args.rounds, root, log)
    results["meta"]["load_average_end"] = list(os.getloadavg())
    print(summarize(results))
    name = f"threads-cpu-{time.strftime('%Y-%m-%d')}{'-quick' if args.quick else ''}"
    path = os.path.join(args.out_dir, name + ".json")
    bc.atomic_write(path, lambda tmp: open(tmp, "w").write(json.dumps(results, indent=1) + "\n"))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
