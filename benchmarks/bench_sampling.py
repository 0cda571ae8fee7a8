"""Sampling benchmark: ddpm_fast.sample vs the plain PyTorch baseline, torch.compile and diffusers.

The harness lives in the package (ddpm_fast/bench.py, bench_sampling.py) so that `ddpm-fast bench` runs it from
any install; this script is the same command from a source checkout:

    python benchmarks/bench_sampling.py --device cpu              # the CPU table (~10 min on 2 quiet cores)
    python benchmarks/bench_sampling.py --device cuda             # the full GPU matrix (long; gpu_suite.sh trims it)
    python benchmarks/bench_sampling.py --quick                   # dry run with tiny settings
    python benchmarks/bench_sampling.py --help                    # every option
"""
import sys

from ddpm_fast.bench import main

if __name__ == "__main__":
    sys.exit(main())
