"""Sample quality per step count for every sampler: the bundled digits model, the project's metric (FD in the
digits feature net's space against 10000 train images, n = 355 samples = the held-out split's size), at least
5 sampling seeds per setting, beside the random real-subset floor; with wall time per image.

Decision rule, fixed BEFORE measuring (FD at n = 355 varies up to 2x between sampling seeds, so single runs decide
nothing):
  1. The reference is DDPM with all 1000 steps; its seed spread is [min, max] of its FDs over the seeds.
  2. A setting (sampler, spacing, steps) MATCHES the reference when its median FD over the seeds is at most the
     reference's largest FD (within the reference's seed spread, or better).
  3. DDIM and each solver are measured with every spacing ("linspace", "trailing", "logsnr") at 5, 10 and 20
     steps, where the grid matters most. If some of those settings match, the default is the fewest steps that
     match, with the spacing of the lowest median among the matching ones at that count.
  4. Otherwise the default spacing is the one with the lowest geometric mean of its median FDs at 5, 10, 20
     steps (FD spans an order of magnitude across these counts: an arithmetic mean would rank by 5 steps
     alone), and the default steps are the fewer of 50, 100 that match at that spacing (100 if neither does).
     50 and 100 steps are measured with the default spacing only; DDPM keeps "linspace" and the full schedule.
  5. Recommendation: the sampler whose default needs the fewest steps (model evaluations); ties go to the
     lower median FD at that step count.
(The rule's wording was fixed after a 2-seed trial of this script at 5 and 10 steps showed that 10x spread.)
Timing: torch on ONE thread (two threads on this shared 2-core machine measured up to 10x slower per step),
batch 128; wall time per image = the sample() call's wall time / n, median over seeds. The system load is
recorded with every row: times taken while others load the machine are labelled so and are not final.

    python benchmarks/quality_per_step.py                 # resumable: rows already in the JSON are kept
    python benchmarks/quality_per_step.py --seeds 0,1 --steps 5,10 --out /tmp/q.json       # a quick look
Writes the JSON, a Markdown table (.md) and a plot (.png) next to each other.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "quality-digits.json")
SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc")
SPACINGS = ("linspace", "trailing", "logsnr")
FEW, MANY = (5, 10, 20), (50, 100)
REFERENCE = ("ddpm", "linspace", 1000)
N, BATCH = 355, 128


# ---- measuring ----------------------------------------------------------------------------------------------

def measure(model, sampler, spacing, steps, seed, commit):
    """One row: sample N images, score them (FD against the fixed reference of evaluate(seed=0))."""
    import ddpm_fast
    from ddpm_fast.eval.metrics import evaluate
    from ddpm_fast.sampling import last_run_info
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    x = ddpm_fast.sample(model, N, steps, sampler=sampler, spacing=spacing, seed=seed, batch_size=BATCH,
                         progress=False)
    wall = time.perf_counter() - t0
    used = last_run_info()["steps"]
    scores = evaluate(x, "digits", n=N, seed=0, floor_draws=0)
    return dict(sampler=sampler, spacing=spacing, steps=steps, used_steps=used, seed=seed, fd=scores["fd"],
                kid=scores["kid"], wall_s=wall, s_per_image=wall / N, load1=load, commit=commit)


def floor_scores():
    """The floors of the metric at n = N (one sampling-free evaluate call on real held-out images)."""
    from ddpm_fast.data import load_dataset
    from ddpm_fast.eval.metrics import evaluate
    real = load_dataset("digits", "test").batch(torch.arange(N))
    s = evaluate(real, "digits", n=N, seed=0, floor_draws=101)
    return {k: s[k] for k in ("floor_fd", "random_floor_fd", "random_floor_fd_min", "random_floor_fd_max",
                              "random_floor_draws", "noise_fd")}


def settings_few(samplers, steps):
    for sampler in samplers:
        for spacing in (("linspace",) if sampler == "ddpm" else SPACINGS):
            for k in steps:
                yield sampler, spacing, k
    if "ddpm" in samplers:
        yield REFERENCE  # the long part, but rule 3 needs it before 50 and 100 steps are chosen


def run(args, result, save):
    import ddpm_fast
    commit = _commit()  # the code this process imports now and runs throughout (it never reloads)
    torch.set_num_threads(1)
    model = ddpm_fast.load(None)
    done = {(r["sampler"], r["spacing"], r["steps"], r["seed"]) for r in result["rows"]}
    if result.get("floors") is None:
        result["floors"] = floor_scores()
        save()

    def do(settings):
        for seed in args.seeds:  # seeds outermost: a cut-short run still has complete seeds
            for sampler, spacing, k in settings:
                if (sampler, spacing, k, seed) in done:
                    continue
                row = measure(model, sampler, spacing, k, seed, commit)
                result["rows"].append(row)
                done.add((sampler, spacing, k, seed))
                save()
                print(f"{sampler:13s} {spacing:9s} {k:5d} ({row['used_steps']:4d}) seed {seed}: FD "
                      f"{row['fd']:.4f}  {row['s_per_image'] * 1e3:.2f} ms/image  load {row['load1']:.1f}",
                      flush=True)
    do(list(settings_few(args.samplers, [k for k in args.steps if k in FEW])))
    spacing = decide(result["rows"], args.samplers)["spacing"]
    do([(s, spacing[s], k) for s in args.samplers for k in args.steps if k not in FEW and k != REFERENCE[2]])


# ---- the decision rule --------------------------------------------------------------------------------------

def medians(rows):
    """{(sampler, spacing, steps): dict(median, min, max, seeds, s_per_image, used_steps)}."""
    groups = {}
    for r in rows:
        groups.setdefault((r["sampler"], r["spacing"], r["steps"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        fds = sorted(r["fd"] for r in rs)
        out[key] = dict(median=statistics.median(fds), min=fds[0], max=fds[-1], seeds=len(fds),
                        s_per_image=statistics.median(r["s_per_image"] for r in rs), used_steps=rs[0]["used_steps"])
    return out


def default_setting(med, sampler, ref_max):
    """Rules 3-4 for one sampler -> (spacing, steps or None when not yet measured)."""
    few = [(k, med[(sampler, sp, k)]["median"], sp) for sp in SPACINGS for k in FEW if (sampler, sp, k) in med]
    matching = [f for f in few if ref_max is not None and f[1] <= ref_max]
    if matching:
        k, _, sp = min(matching)  # the fewest steps, then the lowest median
        return sp, k
    geo = {sp: statistics.geometric_mean([m for _, m, s in few if s == sp]) for sp in SPACINGS
           if any(s == sp for _, _, s in few)}  # in SPACINGS order: a tie goes to the first
    sp = min(geo, key=geo.get) if geo else "logsnr"
    many = [k for k in MANY if (sampler, sp, k) in med]
    ok = [k for k in many if ref_max is not None and med[(sampler, sp, k)]["median"] <= ref_max]
    return sp, (min(ok) if ok else 100 if len(many) == len(MANY) else None)


def decide(rows, samplers):
    """Rules 1-5 -> dict(spacing, default_steps, reference_max, recommended)."""
    med = medians(rows)
    ref = med.get(REFERENCE)
    ref_max = None if ref is None else ref["max"]
    spacing, defaults = {"ddpm": "linspace"}, {"ddpm": None}
    for sampler in samplers:
        if sampler != "ddpm":
            spacing[sampler], defaults[sampler] = default_setting(med, sampler, ref_max)
    candidates = [s for s in samplers if s != "ddpm" and (s, spacing[s], defaults[s]) in med]
    best = min(candidates, key=lambda s: (defaults[s], med[(s, spacing[s], defaults[s])]["median"]), default=None)
    return dict(spacing=spacing, default_steps=defaults, reference_max=ref_max,
                recommended=None if best is None else {"sampler": best, "steps": defaults[best],
                                                       "spacing": spacing[best]})


# ---- reporting ----------------------------------------------------------------------------------------------

def table(result):
    """Markdown: median FD (min-max over seeds) and ms/image per sampler and step count, at the chosen spacing,
    then every spacing at the few-step counts."""
    med, dec = medians(result["rows"]), result["decision"]
    steps = sorted({k for (_, _, k) in med})
    head = "| sampler (spacing) | " + " | ".join(f"{k} steps" for k in steps) + " |"
    lines = [head, "|" + " --- |" * (len(steps) + 1)]
    for sampler in result["samplers"]:
        cells = [_cell(med.get((sampler, dec["spacing"][sampler], k))) for k in steps]
        lines.append(f"| {sampler} ({dec['spacing'][sampler]}) | " + " | ".join(cells) + " |")
    lines += ["", "| sampler, spacing | " + " | ".join(f"{k} steps" for k in FEW) + " |", "|" + " --- |" * 4]
    for sampler, spacing in sorted({(s, sp) for (s, sp, k) in med if k in FEW and s != "ddpm"}):
        lines.append(f"| {sampler}, {spacing} | " + " | ".join(_cell(med.get((sampler, spacing, k)), time=False)
                                                         for k in FEW) + " |")
    return "\n".join(lines) + "\n"


def _cell(m, time=True):
    if m is None:
        return ""
    text = f"{m['median']:.3f} ({m['min']:.3f}-{m['max']:.3f})"
    return text + (f", {m['s_per_image'] * 1e3:.1f} ms" if time else "")


def plot(result, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    med, dec, floors = medians(result["rows"]), result["decision"], result["floors"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ref = med.get(REFERENCE)
    for sampler in result["samplers"]:
        pts = sorted((k, m) for (s, sp, k), m in med.items() if s == sampler and sp == dec["spacing"][sampler])
        if not pts:
            continue
        ks, ms = [k for k, _ in pts], [m for _, m in pts]
        err = [[m["median"] - m["min"] for m in ms], [m["max"] - m["median"] for m in ms]]
        for ax, xs in ((axes[0], ks), (axes[1], [m["s_per_image"] * 1e3 for m in ms])):
            ax.errorbar(xs, [m["median"] for m in ms], yerr=err, marker="o", capsize=3,
                        label=f"{sampler} ({dec['spacing'][sampler]})")
    for ax in axes:
        if ref is not None:
            ax.axhspan(ref["min"], ref["max"], color="grey", alpha=0.2, label="DDPM 1000 steps (seed spread)")
        ax.axhline(floors["random_floor_fd"], color="k", ls="--", lw=1, label="random real subsets (median)")
        ax.set_xscale("log"), ax.set_yscale("log"), ax.set_ylabel("FD (median over seeds, min-max bars)")
    axes[0].set_xlabel("steps (model evaluations)")
    axes[1].set_xlabel("ms per image (1 CPU thread, batch 128; shared machine)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"digits, n={N}, {len(result['seeds'])} sampling seeds, commit {result['commit']}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


# ---- files --------------------------------------------------------------------------------------------------

def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None):
    from ddpm_fast.files import atomic_write
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=lambda s: [int(v) for v in s.split(",")], default=list(FEW + MANY))
    p.add_argument("--samplers", type=lambda s: s.split(","), default=list(SAMPLERS))
    p.add_argument("--out", default=DEFAULT_OUT, help="the JSON (the .md and .png go next to it)")
    p.add_argument("--report-only", action="store_true", help="rewrite the table and plot from the JSON")
    args = p.parse_args(argv)
    result = json.load(open(args.out)) if os.path.exists(args.out) else {"rows": [], "floors": None}
    result.update(seeds=args.seeds, samplers=args.samplers, n=N, batch=BATCH, threads=1, cpu=_cpu_name(), timing_note="wall times measured on a shared 2-core machine under load from "
                  "other jobs (load1 per row): indicative only")

    def save():
        text = json.dumps(result, indent=1) + "\n"
        atomic_write(args.out, lambda tmp: open(tmp, "w").write(text))
    if not args.report_only:
        run(args, result, save)
    result["commit"] = ",".join(sorted({r["commit"] or "?" for r in result["rows"]}))
    result["decision"] = decide(result["rows"], args.samplers)
    save()
    base = os.path.splitext(args.out)[0]
    md = table(result)
    atomic_write(base + ".md", lambda tmp: open(tmp, "w").write(md))
    plot(result, base + ".png")
    print(md)
    print(json.dumps(result["decision"], indent=1))
    return 0


def _cpu_name():
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return None


if __name__ == "__main__":
    sys.exit(main())
