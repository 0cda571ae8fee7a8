"""How often the digits classifier recognises the requested class in the bundled class-conditional model's samples,
per guidance scale w (this w = Ho & Salimans' w + 1: 0 the unconditional model, 1 the conditional one), and what
guidance costs in the project's quality metric: the numbers behind docs/guidance.md and the default w.

For each w and sampling seed: n images (label i % 10 for image i: balanced over the 10 classes, and every prefix
too) from ``ddpm_fast.load("digits-cond")`` with DDPM and all 1000 steps (the CLI's default sampler; each row's
sampling seconds are recorded), classified
by the committed digits feature net (ddpm_fast/assets/features_digits.safetensors: its argmax over the 10 digits);
the first 355 images (355: the held-out split's size, 35-36 per class) scored by ``eval.metrics.evaluate`` (FD / KID
against 10000 train images of every class, as `ddpm-fast eval`).

Decision rule for the documented default w, fixed before this run (a pilot of 50 DDIM-100 images per w showed the
classifier at 6% for w = 0 and 100% for w = 1, 2, 4):
  1. accuracy(w) = correct / images over all seeds, with its binomial standard error sqrt(p (1 - p) / N);
  2. candidates: every w whose accuracy is within 2 standard errors of the difference (sqrt(se_w^2 + se_best^2))
     of the best w's accuracy;
  3. among them the lowest median FD over the seeds (guidance trades diversity for fidelity: a collapse onto
     class modes raises FD against the all-class train split); a tie (equal to 3 decimals) goes to the smaller w.

    OMP_NUM_THREADS=1 python benchmarks/guidance_accuracy.py          # w 0,1,2,4, seeds 0,1,2, n 500: ~30 min
    python benchmarks/guidance_accuracy.py --quick --out /tmp/g.json  # a dry run (tiny n and steps)
Writes the JSON and a Markdown table (.md) next to it. No timings are recorded.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "guidance-digits.json")
SCALES, SEEDS, N, FD_N, CLASSES, STEPS = (0.0, 1.0, 2.0, 4.0), (0, 1, 2), 500, 355, 10, 1000


def measure(model, net, w, seed, n, steps, fd_n):
    """One (w, seed) row: per-class correct counts and the FD / KID of the first fd_n images."""
    import ddpm_fast
    from ddpm_fast.eval.metrics import evaluate
    labels = torch.arange(n) % CLASSES
    t0 = time.perf_counter()
    x = ddpm_fast.sample(model, n, steps, sampler="ddpm", seed=seed, labels=labels, guidance_scale=w,
                         batch_size=min(n, 250), progress=False)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        predicted = net(x).argmax(1)
    correct = [int(((predicted == labels) & (labels == k)).sum()) for k in range(CLASSES)]
    scores = evaluate(x, "digits", n=min(fd_n, n), seed=0, floor_draws=0)
    return dict(w=w, seed=seed, n=n, steps=steps, correct=correct, per_class=[n // CLASSES + (k < n % CLASSES)
                                                                              for k in range(CLASSES)],
                fd=scores["fd"], kid=scores["kid"], sampling_s=seconds)


def summarize(rows):
    """Per w: pooled accuracy and its standard error, per-class accuracy, median / min / max FD over seeds."""
    out = {}
    for w in sorted({r["w"] for r in rows}):
        mine = [r for r in rows if r["w"] == w]
        right = [sum(r["correct"][k] for r in mine) for k in range(CLASSES)]
        total = [sum(r["per_class"][k] for r in mine) for k in range(CLASSES)]
        p = sum(right) / sum(total)
        fds = [r["fd"] for r in mine]
        out[w] = dict(accuracy=p, se=math.sqrt(p * (1 - p) / sum(total)), images=sum(total),
                      per_class=[a / b for a, b in zip(right, total)], fd_median=statistics.median(fds),
                      fd_min=min(fds), fd_max=max(fds), seeds=len(mine))
    return out


def decide(summary):
    """The rule of the module doc -> (default w, the candidates of step 2)."""
    best = max(summary, key=lambda w: summary[w]["accuracy"])
    b = summary[best]
    candidates = [w for w, s in summary.items()
                  if b["accuracy"] - s["accuracy"] <= 2 * math.sqrt(s["se"] ** 2 + b["se"] ** 2)]
    chosen = min(candidates, key=lambda w: (round(summary[w]["fd_median"], 3), w))
    return chosen, candidates


def table(summary, chosen):
    head = ("| w | images | accuracy (+- 1 se) | lowest class | median FD (min-max over seeds) |\n"
            "|---|---|---|---|---|")
    lines = [head]
    for w, s in summary.items():
        low = min(range(CLASSES), key=lambda k: s["per_class"][k])
        mark = " (default)" if w == chosen else ""
        lines.append(f"| {w:g}{mark} | {s['images']} | {100 * s['accuracy']:.1f}% (+- {100 * s['se']:.1f}) | "
                     f"{low}: {100 * s['per_class'][low]:.0f}% | {s['fd_median']:.3f} ({s['fd_min']:.3f}-"
                     f"{s['fd_max']:.3f}) |")
    per = ["| w | " + " | ".join(str(k) for k in range(CLASSES)) + " |", "|---|" + "---|" * CLASSES]
    per += [f"| {w:g} | " + " | ".join(f"{100 * a:.0f}" for a in s["per_class"]) + " |" for w, s in summary.items()]
    return "\n".join(lines) + "\n\nPer-class accuracy (%):\n\n" + "\n".join(per) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", default=",".join(f"{w:g}" for w in SCALES))
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--n", type=int, default=N, help=f"images per (w, seed) (default {N})")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--quick", action="store_true", help="dry run: n 20, 5 steps, one seed, w 0 and 2")
    ap.add_argument("--allow-dirty", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.steps, args.seeds, args.scales = 20, 5, "0", "0,2"
    import ddpm_fast
    from ddpm_fast.bench import common as bc
    from ddpm_fast.eval.feature_net import load_feature_net
    source = bc.provenance(args.allow_dirty or args.quick, "guidance_accuracy")
    torch.set_num_threads(1)
    model, net = ddpm_fast.load("digits-cond"), load_feature_net("digits")
    rows = []
    for w in (float(v) for v in args.scales.split(",")):
        for seed in (int(v) for v in args.seeds.split(",")):
            rows.append(measure(model, net, w, seed, args.n, args.steps, FD_N))
            print(f"w={w:g} seed={seed}: {sum(rows[-1]['correct'])}/{args.n} correct, FD {rows[-1]['fd']:.3f}, "
                  f"{rows[-1]['sampling_s']:.0f} s sampling",
                  file=sys.stderr)
    summary = summarize(rows)
    chosen, candidates = decide(summary)
    doc = {"meta": {**bc.environment("cpu", source), "model": "digits-cond", "sampler": "ddpm",
                    "steps": args.steps, "fd_n": min(FD_N, args.n), "command": " ".join(sys.argv)},
           "rows": rows, "summary": {f"{w:g}": s for w, s in summary.items()},
           "decision": {"default_w": chosen, "candidates": candidates}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(table(summary, chosen))
    print(table(summary, chosen))
    print(f"default w = {chosen:g} (candidates within 2 se of the best accuracy: {candidates})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
