"""Which timestep grid each sampler should use, measured on an exact-score oracle (no trained model, no seed
spread): data x0 ~ 0.5 N(mu1, s1^2) + 0.5 N(mu2, s2^2) per pixel, whose optimal eps is known in closed form
(tests/oracles.py, MixtureOracle). The score is the Wasserstein-1 distance from the samples to the TRUE data law
(per pixel, averaged over pixels), beside the distance of as many exact draws of the data (the sampling floor).

Rows: every sampler x spacing ("linspace", "trailing", "logsnr", and "dpm-linspace": the grid diffusers'
DPMSolverMultistepScheduler / UniPCMultistepScheduler use by default, 999 ... 100 then a jump to sigma 0,
given through NoiseSchedule.respace(timesteps=...)) x steps; plus diffusers' own DPMSolverMultistepScheduler (2M)
with its default grid, with ``use_lu_lambdas=True`` and with our logsnr timesteps, from the same x_T.

    python benchmarks/solver_grids.py                      # writes benchmarks/results/solver-grids-mixture.json
    python benchmarks/solver_grids.py --steps 10 --n 4000  # quicker
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the oracles live with the tests that use them

import ddpm_fast  # noqa: E402
from ddpm_fast import NoiseSchedule  # noqa: E402
from ddpm_fast.diffusion.config import SAMPLERS  # noqa: E402
from ddpm_fast.files import atomic_write  # noqa: E402
from ddpm_fast.ops.noise import seeded_randn  # noqa: E402
from oracles import MixtureOracle, w1_to_law  # noqa: E402

SHAPE = (1, 2, 2)
SPACINGS = ("linspace", "trailing", "logsnr", "dpm-linspace")


def make_oracle(base):
    """Four pixels, four different bimodal laws (modes apart by 4-9 of their widths, like image intensities)."""
    mu1 = torch.tensor([-0.6, -0.4, -0.5, -0.7]).view(SHAPE)
    mu2 = torch.tensor([0.5, 0.6, 0.3, 0.4]).view(SHAPE)
    s1 = torch.tensor([0.1, 0.15, 0.2, 0.12]).view(SHAPE)
    s2 = torch.tensor([0.15, 0.1, 0.12, 0.2]).view(SHAPE)
    return MixtureOracle(base, mu1, s1, mu2, s2)


def dpm_default_timesteps(T, steps):
    """diffusers' DPM-Solver/UniPC "linspace" grid: round(linspace(0, T-1, steps+1))[::-1][:-1] (no timestep 0)."""
    import numpy as np
    return np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].astype(np.int64).tolist()


def chain(base, steps, spacing):
    if spacing == "dpm-linspace":
        return base.respace(timesteps=dpm_default_timesteps(base.T, steps))
    return base.respace(steps, spacing)


def ours(oracle, base, sampler, steps, spacing, n, seed):
    sched = chain(base, steps, spacing)
    x = ddpm_fast.sample(oracle, n, shape=SHAPE, schedule=sched, sampler=sampler, clip=False, seed=seed,
                         progress=False)
    return w1_to_law(x, oracle), sched.num_steps


def diffusers_2m(oracle, base, steps, n, seed, grid):
    """diffusers' DPMSolverMultistepScheduler (2M, its defaults) from the same x_T as ours."""
    import diffusers
    sch = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=base.T, use_lu_lambdas=grid == "lu")
    if grid == "logsnr":
        sch.set_timesteps(timesteps=base.respace(steps, "logsnr").timesteps.flip(0).tolist())
    else:
        sch.set_timesteps(steps)
    x = seeded_randn((n, *SHAPE), seed)
    for t in sch.timesteps:
        x = sch.step(oracle(x, t.expand(n)), t, x).prev_sample
    return w1_to_law(x, oracle), len(sch.timesteps)


def run(args):
    torch.set_num_threads(1)
    base = NoiseSchedule.linear(1000)
    oracle = make_oracle(base)
    floor = w1_to_law(oracle.sample_data(args.n, torch.Generator().manual_seed(args.seed)), oracle)
    rows = []
    for steps in args.steps:
        for sampler in args.samplers:
            for spacing in SPACINGS:
                if sampler == "ddpm" and spacing != "linspace":
                    continue
                w1, used = ours(oracle, base, sampler, steps, spacing, args.n, args.seed)
                rows.append(dict(tool="ddpm_fast", sampler=sampler, spacing=spacing, steps=steps, used=used, w1=w1))
                print(f"{sampler:13s} {spacing:13s} {steps:4d} ({used:4d})  W1 {w1:.4f}", flush=True)
        for grid in ("default", "lu", "logsnr"):
            w1, used = diffusers_2m(oracle, base, steps, args.n, args.seed, grid)
            rows.append(dict(tool="diffusers", sampler="dpmpp_2m", spacing=grid, steps=steps, used=used, w1=w1))
            print(f"diffusers 2M  {grid:13s} {steps:4d} ({used:4d})  W1 {w1:.4f}", flush=True)
    return {"what": "W1 distance to the exact data law of a two-component Gaussian mixture per pixel (exact-score "
                    "oracle, linear schedule T=1000), mean over 4 pixels", "n": args.n, "seed": args.seed,
            "floor_w1": floor, "commit": _commit(), "date": time.strftime("%Y-%m-%d"), "rows": rows}


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=lambda s: [int(v) for v in s.split(",")], default=[5, 10, 20, 50])
    p.add_argument("--samplers", type=lambda s: s.split(","), default=list(SAMPLERS))
    p.add_argument("--n", type=int, default=20000, help="samples per pixel (default 20000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(HERE, "results", "solver-grids-mixture.json"))
    args = p.parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=1) + "\n"
    atomic_write(args.out, lambda tmp: open(tmp, "w").write(text))
    print(f"floor (exact draws): W1 {result['floor_w1']:.4f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
