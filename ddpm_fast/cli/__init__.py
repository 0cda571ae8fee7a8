"""The `ddpm-fast` command line (also `python -m ddpm_fast`): train | sample | reference | eval | bench |
train-features.

One module per command (cli/train.py, ...), each with ``add(subparsers)`` declaring its flags and ``run(args)``
doing the work; heavy imports happen inside ``run`` so `ddpm-fast --help` stays fast. Exit codes and the form of
error messages are the same for every command (cli/common.py): 0 done, 1 the work failed, 2 usage error (found
before any work), 130 / 143 training stopped by SIGINT / SIGTERM after writing its checkpoint.
"""
import argparse
import importlib
import sys

from .common import run_command

COMMANDS = {"train": "train", "sample": "sample", "reference": "reference", "eval": "eval", "bench": "bench",
            "train-features": "features"}


class _Version(argparse.Action):
    """--version: the package version and what the compiled extension holds (CPU / CUDA kernels and archs)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from .._version import __version__
        from ..ops._ext import build_info
        print(f"ddpm-fast {__version__}; {build_info()}")
        parser.exit()


def build_parser():
    parser = argparse.ArgumentParser(prog="ddpm-fast", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=_Version, help="the version and the compiled kernels, then exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for module in COMMANDS.values():
        importlib.import_module(f"{__name__}.{module}").add(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
