"""What every `ddpm-fast` command shares: exit codes, error reporting, --threads, flags derived from dataclasses.

Exit codes, the same for every command:
    0    done
    1    the work failed (non-finite samples, a file that could not be written, out of memory, ...)
    2    usage: bad flags or values, or inputs (files, devices, datasets) that cannot work -- found before any work
    130  training stopped by SIGINT (Ctrl-C), 143 by SIGTERM, after writing its checkpoint
Messages have one form: "ddpm-fast COMMAND: error: WHAT" on stderr, as argparse's own usage errors.
"""
import argparse
import dataclasses
import sys
import typing

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A command's arguments cannot work; raised before any work starts (exit code 2)."""


# Failures during the work that deserve one clear line rather than a traceback (exit code 1).
RUNTIME_ERRORS = (FloatingPointError, OSError, MemoryError)


def run_command(args) -> int:
    """Runs ``args.func(args)`` with the exit codes and message form above."""
    try:
        return args.func(args) or EXIT_OK
    except UsageError as err:
        print(f"ddpm-fast {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except RUNTIME_ERRORS as err:
        print(f"ddpm-fast {args.command}: error: {err}", file=sys.stderr)
        return EXIT_FAILED


def usage_errors(*extra):
    """The exceptions that mean "these arguments cannot work" when raised while validating (not while working)."""
    return (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError, NotADirectoryError,
            IsADirectoryError, PermissionError) + extra


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def threads_arg(text):
    """--threads: "auto" or an integer >= 1."""
    if text == "auto":
        return "auto"
    return positive_int(text)


def add_threads(parser, default="auto"):
    parser.add_argument("--threads", type=threads_arg, default=default, metavar="N|auto",
                        help="torch CPU threads: N, or auto = 1 thread for a small model and batch, where a second "
                        "thread only waits for the first (measured: docs/sampling.md, \"Threads\"), else torch's "
                        f"default (default: {default})")


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def dataclass_flags(parser, cls, defaults_note=None):
    """One flag per field of the dataclass ``cls``: ``--field-name``, typed from the annotation (Optional[X] ->
    X) or the field's metadata "parse", help / choices / metavar from its metadata; bool fields become switches.
    Flags not given are absent from the parsed namespace (default SUPPRESS), so a command can tell what the user
    set (``given_values``); help shows the field's default (None fields: ``defaults_note(name)``)."""
    for f in dataclasses.fields(cls):
        flag, meta = flag_name(f.name), f.metadata
        if f.type is bool:
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=meta.get("help"))
            continue
        typ = next((a for a in typing.get_args(f.type) if a is not type(None)), f.type)
        parse = meta.get("parse")
        note = defaults_note(f.name) if f.default is None and defaults_note else None
        default = meta.get("default_text") or note or f"{f.default}"
        parser.add_argument(flag, type=_argparse_type(parse) if parse else typ, default=argparse.SUPPRESS,
                            choices=meta.get("choices"),
                            metavar=meta.get("metavar") or (None if meta.get("choices") else f.name.upper()),
                            help=f"{meta.get('help', '')} (default: {default})")


def _argparse_type(parse):
    def convert(text):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    convert.__name__ = parse.__name__
    return convert


def given_values(args, cls) -> dict:
    """{field: value} of the dataclass fields whose flags were given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


# diffusion.SAMPLERS and SPACINGS, spelled out so `--help` needs no torch import (tests/test_cli_sample.py checks)
SAMPLER_CHOICES = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc")
SPACING_CHOICES = ("linspace", "leading", "trailing", "logsnr")


def add_sampler_flags(parser, steps_type=positive_int):
    """--steps, --sampler, --spacing: shared by sample, eval and bench (ddpm_fast.sample's arguments)."""
    parser.add_argument("--steps", type=steps_type, help="sampling steps (default: the sampler's, docs/solvers.md; "
                        "ddpm: all T training steps); fewer than T respace the schedule")
    parser.add_argument("--sampler", choices=SAMPLER_CHOICES, default="ddpm", help="ddpm (default), ddim, or a "
                        "few-step solver: dpmpp_2m, dpmpp_3m, dpmpp_2m_sde (DPM-Solver++), unipc")
    parser.add_argument("--spacing", choices=SPACING_CHOICES, help="timestep spacing (default: the sampler's)")
