"""What every `ddpm-fast` command shares: exit codes, error reporting, --threads, --class / --guidance, flags derived
from dataclasses.

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


def class_arg(text):
    """--class: "all", or one class or a comma-separated list of classes (ints >= 0)."""
    if text == "all":
        return "all"
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a class, a comma-separated list of classes or 'all', got "
                                         f"{text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"classes are >= 0, got {text!r}")
    return values


def add_class_flags(parser, what="images"):
    """--class and --guidance (sample, eval): class labels and classifier-free guidance for a conditional model."""
    parser.add_argument("--class", dest="classes", type=class_arg, metavar="K[,K...]|all",
                        help=f"a class-conditional model's class(es): one class for all {what}, or a list (or "
                        f"'all'): the {what} in equal blocks, one per class in order")
    parser.add_argument("--guidance", type=float, metavar="W",
                        help="classifier-free guidance scale with --class: the prediction u + W (c - u); 0 = the "
                        "unconditional model, 1 = the conditional one without guidance (this W is the Ho & "
                        "Salimans paper's w + 1); default: the measured default of docs/guidance.md")


def class_labels(args, model, n):
    """The labels of n images for --class (image i gets classes[i * k // n]: k blocks in the classes' order), or
    None without --class; a UsageError for --guidance alone, an unconditional model or a class it lacks."""
    if args.classes is None:
        if args.guidance is not None:
            raise UsageError("--guidance needs --class (the classes to guide towards)")
        return None
    null = getattr(model, "null_label", None)
    if null is None:
        raise UsageError("--class needs a class-conditional model (e.g. --checkpoint digits-cond); this one is "
                         "unconditional")
    classes = list(range(null)) if args.classes == "all" else args.classes
    bad = [c for c in classes if c >= null]
    if bad:
        raise UsageError(f"--class {bad[0]}: the model's classes are 0..{null - 1}")
    return [classes[i * len(classes) // n] for i in range(n)]


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
