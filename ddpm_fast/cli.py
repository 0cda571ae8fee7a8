"""The `ddpm-fast` command line: train | sample | eval | bench.

Each subcommand has an `_add_<name>(subparsers)` that declares its flags and a `_run_<name>(args)` that does the
work; heavy imports happen inside the `_run_*` functions so `ddpm-fast --help` stays fast.
"""
import argparse
import sys


# ---- sample ----
# ---- end sample ----


# ---- train ----
# ---- end train ----


# ---- eval ----
# ---- end eval ----


# ---- bench ----
# ---- end bench ----


def build_parser():
    parser = argparse.ArgumentParser(prog="ddpm-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,sample,eval,bench}")
    for name in ("train", "sample", "eval", "bench"):
        adder = globals().get(f"_add_{name}")
        if adder is not None:
            adder(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
