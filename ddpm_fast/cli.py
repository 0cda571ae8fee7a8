"""The `ddpm-fast` command line: train | sample | eval | bench.

Each subcommand has an `_add_<name>(subparsers)` that declares its flags and a `_run_<name>(args)` that does the
work; heavy imports happen inside the `_run_*` functions so `ddpm-fast --help` stays fast.
"""
import argparse
import sys


# ---- sample ----
def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_sample(sub):
    p = sub.add_parser("sample", help="draw images from a trained model (PNG grid, optional .npz)",
                       description="Draw images with ddpm_fast.sample and write them as a PNG grid (and an .npz).")
    p.add_argument("--checkpoint", metavar="PATH", help="a model file (ddpm_fast.save), a training checkpoint "
                   "(its EMA weights) or a run directory; default: the bundled model, when this install has one")
    p.add_argument("--n", type=_positive_int, default=64, help="number of images (default 64)")
    p.add_argument("--steps", type=_positive_int, help="sampling steps (default: all T training steps; fewer "
                   "respace the schedule: linspace rule, see README)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's eta (sampler ddim only; default 0)")
    p.add_argument("--seed", type=int, help="same seed -> same images on a device (default: a fresh one, printed)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available (default)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="the model's compute dtype (default: the model's; fp16/bf16 run under autocast)")
    p.add_argument("--batch-size", type=_positive_int, help="images per chunk (default min(n, 256))")
    p.add_argument("--out", default="samples.png", metavar="PNG", help="image grid (default samples.png)")
    p.add_argument("--npz", metavar="PATH", help="also write the samples as .npz (images: float32 NCHW in "
                   "[-1, 1]; arr_0: uint8 NHWC)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_sample)


def _run_sample(args):
    import os

    import torch

    import ddpm_fast
    from ddpm_fast.images import save_grid_png, save_npz
    from ddpm_fast.sampler import last_run_info

    def fail(message):
        raise SystemExit(f"ddpm-fast sample: error: {message}")

    for path in filter(None, (args.out, args.npz)):
        if os.path.isdir(path):
            fail(f"{path} is a directory; give a file name")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but CUDA is not available")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        "cpu" if args.device == "auto" else args.device
    try:
        model = ddpm_fast.load(args.checkpoint, device=device)
    except FileNotFoundError as err:
        if args.checkpoint is None:
            fail(f"--checkpoint PATH is needed: this install has no bundled default model ({err})")
        fail(str(err))
    except (ValueError, TypeError) as err:
        fail(str(err))
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    try:
        samples = ddpm_fast.sample(model, args.n, args.steps, sampler=args.sampler, eta=args.eta, seed=args.seed,
                                   device=device, dtype=dtype, batch_size=args.batch_size,
                                   progress=not args.no_progress)
    except (ValueError, FloatingPointError) as err:
        fail(str(err))
    save_grid_png(samples, args.out)
    if args.npz:
        save_npz(samples, args.npz)
    info = last_run_info()
    written = args.out + (f" and {args.npz}" if args.npz else "")
    print(f"wrote {args.n} samples to {written} ({info['steps']} {args.sampler} steps, seed {info['seed']}, "
          f"{info['wall_s']:.1f} s on {info['device']}, {'/'.join(sorted(set(info['modes'])))})")
    return 0
# ---- end sample ----


# ---- train ----
# ---- end train ----


# ---- eval ----
# ---- end eval ----


# ---- bench ----
def _add_bench(sub):
    from .bench import __doc__ as doc, add_arguments  # the standard library only: --help stays fast
    p = sub.add_parser("bench", help="sampling speed: ddpm_fast vs plain PyTorch, torch.compile and diffusers",
                       description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=_run_bench)


def _run_bench(args):
    from .bench import config_from_args, run
    try:
        config = config_from_args(args).resolved()
    except ValueError as err:
        raise SystemExit(f"ddpm-fast bench: error: {err}") from None
    return run(config)
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
