"""`ddpm-fast bench`: the sampling benchmark (flags derived from BenchConfig)."""
import argparse

from .common import UsageError


def add(sub):
    from ..bench.config import __doc__ as doc, add_arguments  # the standard library only: --help stays fast
    p = sub.add_parser("bench", help="sampling speed: ddpm_fast vs plain PyTorch, torch.compile and diffusers",
                       description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def run(args):
    from ..bench.config import config_from_args
    from ..bench.sampling import run as run_bench
    try:
        config = config_from_args(args).resolved()
    except ValueError as err:
        raise UsageError(str(err)) from None
    return run_bench(config)
