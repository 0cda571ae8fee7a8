"""The `ddpm-fast` command line: train | sample | reference | eval | bench.

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
    p.add_argument("-n", "--n", type=_positive_int, default=64, help="number of images (default 64; under torchrun "
                   "write -n: torchrun reads --n as an abbreviation of its own options)")
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
    p.add_argument("--out", metavar="PNG", help="image grid (default samples.png)")
    p.add_argument("--npz", metavar="PATH", help="also write the samples as .npz (images: float32 NCHW in "
                   "[-1, 1]; arr_0: uint8 NHWC)")
    p.add_argument("--out-dir", metavar="DIR", help="an evaluation run instead of a grid: one file per chunk, "
                   "resumable (rerun the same command), then DIR/samples.npz (arr_0: uint8 NHWC); under torchrun "
                   "every process draws its share (see docs/evaluation.md)")
    p.add_argument("--png-dir", metavar="DIR", help="with --out-dir: also one PNG per image (for folder-based "
                   "FID tools)")
    p.add_argument("--overwrite", action="store_true", help="with --out-dir: start over when DIR holds a run "
                   "with other settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_sample)


def _run_sample(args):
    import os

    import torch

    import ddpm_fast
    from ddpm_fast.distributed import torchrun_env
    from ddpm_fast.images import save_grid_png, save_npz
    from ddpm_fast.sampling import last_run_info

    def fail(message):
        raise SystemExit(f"ddpm-fast sample: error: {message}")

    if args.out_dir is not None:
        return _run_sample_dir(args, fail)
    if args.png_dir is not None or args.overwrite:
        fail("--png-dir and --overwrite go with --out-dir")
    if torchrun_env()[1] > 1:
        fail("under torchrun, give --out-dir DIR: every process then draws its share of the images into DIR")
    args.out = args.out or "samples.png"
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


def _run_sample_dir(args, fail):
    """ddpm-fast sample --out-dir: ddpm_fast.sample_to_dir over the processes torchrun started (or this one)."""
    import torch

    import ddpm_fast
    from ddpm_fast import distributed
    if args.out is not None or args.npz is not None:
        fail("--out and --npz write a grid; with --out-dir the images go to DIR/samples.npz (and --png-dir)")
    rank, _, local_rank = distributed.torchrun_env()
    try:
        device = distributed.resolve_device(args.device, local_rank)  # under torchrun: cuda:LOCAL_RANK
        model = ddpm_fast.load(args.checkpoint, device=device)
    except FileNotFoundError as err:
        fail(f"--checkpoint PATH is needed: this install has no bundled default model ({err})"
             if args.checkpoint is None else str(err))
    except (ValueError, TypeError) as err:
        fail(str(err))
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    try:
        run = ddpm_fast.sample_to_dir(model, args.n, args.out_dir, png_dir=args.png_dir, overwrite=args.overwrite,
                                      progress=not args.no_progress, steps=args.steps, sampler=args.sampler,
                                      eta=args.eta, seed=args.seed, dtype=dtype, batch_size=args.batch_size)
    except (ValueError, TypeError, FloatingPointError) as err:
        fail(str(err))
    if rank == 0:
        print(run.summary() + (f"; PNGs in {run.png_dir}" if run.png_dir else ""))
    return 0
# ---- end sample ----


# ---- reference ----
def _add_reference(sub):
    p = sub.add_parser("reference", help="write a dataset's real images as an FID reference batch (.npz arr_0)",
                       description="Write a dataset's images, pixel for pixel, as an .npz holding arr_0: uint8 "
                       "(N, H, W, C): the reference batch guided-diffusion's evaluator reads beside the samples.")
    p.add_argument("--dataset", required=True, help="digits, fashion-mnist, folder:DIR or npz:FILE")
    p.add_argument("--split", choices=("train", "test", "all"), default="train", help="(default train)")
    p.add_argument("--n", type=_positive_int, help="the first N images of the split (default: all)")
    p.add_argument("--data-dir", help="where the dataset's files are")
    p.add_argument("--image-size", type=_positive_int, help="resize + center-crop to this size (folder datasets)")
    p.add_argument("--out", required=True, metavar="NPZ", help="the .npz to write")
    p.set_defaults(func=_run_reference)


def _run_reference(args):
    import os

    from ddpm_fast.data import reference_batch
    from ddpm_fast.images import save_uint8_npz
    if os.path.isdir(args.out):
        raise SystemExit(f"ddpm-fast reference: error: {args.out} is a directory; give a file name")
    try:
        pixels = reference_batch(args.dataset, args.split, args.n, data_dir=args.data_dir,
                                 image_size=args.image_size)
    except (ValueError, FileNotFoundError, ImportError) as err:
        raise SystemExit(f"ddpm-fast reference: error: {err}") from None
    save_uint8_npz(args.out, [pixels], pixels.shape)
    n, h, w, c = pixels.shape
    print(f"wrote {n} images ({h}x{w}x{c}, uint8) of {args.dataset} ({args.split}) to {args.out} as arr_0")
    return 0
# ---- end reference ----


# ---- train ----
def _dataclass_flags(parser, cls, defaults_note=None):
    """One flag per field of the dataclass ``cls``: ``--field-name``, typed from the annotation (Optional[X]
    -> X), help and choices from the field's metadata; bool fields become switches. Values left unset stay
    at the field's default (None fields: ``defaults_note(name)`` says what they resolve to)."""
    import dataclasses
    import typing
    for f in dataclasses.fields(cls):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        if f.type is bool:
            parser.add_argument(flag, action="store_true", help=meta.get("help"))
            continue
        typ = next((a for a in typing.get_args(f.type) if a is not type(None)), f.type)
        note = defaults_note(f.name) if f.default is None and defaults_note else None
        default = note or f"{f.default}"
        parser.add_argument(flag, type=typ, default=f.default, choices=meta.get("choices"),
                            metavar=None if meta.get("choices") else f.name.upper(),
                            help=f"{meta.get('help', '')} (default: {default})")


def _dataclass_values(args, cls):
    import dataclasses
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}


def _add_train(sub):
    from ddpm_fast.training.config import RECIPES, TrainConfig
    p = sub.add_parser("train", help="train a DDPM (checkpoints, resume, torchrun DDP)",
                       description="Train a DDPM on a dataset; writes checkpoints, the EMA model, metrics and a "
                       "loss curve into --out. Under `torchrun --nproc_per_node K -m ddpm_fast train ...` it "
                       "runs DDP (NCCL on GPUs, gloo on the CPU).")

    def recipe(name):
        return "the preset's: " + ", ".join(f"{k} {v[name]}" for k, v in RECIPES.items()) if name in \
            RECIPES["tiny"] else None

    _dataclass_flags(p, TrainConfig, recipe)
    p.set_defaults(func=_run_train)


def _run_train(args):
    import torch.distributed as dist
    from ddpm_fast import distributed
    from ddpm_fast.training import Trainer, TrainConfig
    owns_group = not dist.is_initialized()  # under torchrun the group is made here, unless a caller made it
    try:
        try:
            trainer = Trainer(TrainConfig(**_dataclass_values(args, TrainConfig)))
        except (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError) as err:
            print(f"ddpm-fast train: error: {err}", file=sys.stderr)
            return 2
        path = trainer.fit()
    finally:
        if owns_group:
            distributed.cleanup()
    if trainer.dist.is_main:
        print(f"trained {trainer.step} steps; EMA model: {path} (ddpm-fast sample --checkpoint {path})")
    return 0
# ---- end train ----


# ---- eval ----
def _add_eval(sub):
    p = sub.add_parser("eval", help="score a model's samples (FD/KID in a feature net's space) beside the "
                       "real-vs-real floor and pure noise",
                       description="Sample n images from a model and score them with ddpm_fast.metrics.evaluate "
                       "against the dataset's train split; prints the held-out real floor and the noise score "
                       "beside them.")
    p.add_argument("--checkpoint", metavar="PATH", help="a model file, a training checkpoint (its EMA weights) "
                   "or a run directory (default: the bundled model)")
    p.add_argument("--dataset", required=True, help="the dataset the model was trained on (digits, "
                   "fashion-mnist, folder:DIR, npz:FILE)")
    p.add_argument("--n", type=int, default=None, help="images to sample and score (default: the held-out "
                   "split's size, which is also the maximum)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: all T)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    p.add_argument("--seed", type=int, default=0, help="sampling and metric seed (default 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--batch-size", type=int, default=None, help="images per sampling chunk")
    p.add_argument("--data-dir", default=None, help="where the dataset's files are")
    p.add_argument("--feature-net", default=None, help="a feature net .safetensors (default: the committed one)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the scores as JSON")
    p.set_defaults(func=_run_eval)


def _run_eval(args):
    import json
    import ddpm_fast
    from ddpm_fast.files import atomic_write
    from ddpm_fast.data import load_dataset
    from ddpm_fast.distributed import resolve_device
    from ddpm_fast.eval.metrics import evaluate
    try:
        device = resolve_device(args.device)
        model = ddpm_fast.load(args.checkpoint, device=device)
        held_out = len(load_dataset(args.dataset, "test", data_dir=args.data_dir))
        n = held_out if args.n is None else args.n
        if not 2 <= n <= held_out:
            raise ValueError(f"--n must be in [2, {held_out}] ({args.dataset}'s held-out images, which the "
                             f"real-vs-real floor uses); got {n}")
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        print(f"ddpm-fast eval: error: {err}", file=sys.stderr)
        return 2
    samples = ddpm_fast.sample(model, n, steps=args.steps, sampler=args.sampler, seed=args.seed,
                               batch_size=args.batch_size, progress=sys.stderr.isatty())
    scores = evaluate(samples, args.dataset, n=n, data_dir=args.data_dir, seed=args.seed,
                      feature_net=args.feature_net)
    scores.update(checkpoint=args.checkpoint or "bundled default", steps=args.steps or model.diffusion.T,
                  sampler=args.sampler, seed=args.seed)
    print(_format_eval(scores))
    if args.json:
        text = json.dumps(scores, indent=2) + "\n"
        atomic_write(args.json, lambda tmp: open(tmp, "w").write(text))
    return 0


def _format_eval(s):
    from ddpm_fast.eval.metrics import random_floor_text
    rows = [("samples", "", s["fd"], s["kid"], s["kid_std"]),
            ("real held-out (floor)", "", s["floor_fd"], s["floor_kid"], s["floor_kid_std"]),
            ("pure noise", "", s["noise_fd"], s["noise_kid"], s["noise_kid_std"])]
    lines = [f"{s['dataset']}: {s['n']} samples ({s['sampler']}, {s['steps']} steps, seed {s['seed']}) vs "
             f"{s['reference_n']} train images",
             f"{'':24s} {'FD':>10s} {'KIDx1e3':>10s} {'+-':>8s}"]
    lines += [f"{name:24s} {fd:10.3f} {k * 1e3:10.3f} {sd * 1e3:8.3f}" for name, _, fd, k, sd in rows]
    random_fd = s.get("random_floor_fd")
    if random_fd is not None:
        lines.append(f"{'random real subsets':24s} {random_floor_text(s)}")

    def ratio(floor):
        return s["fd"] / floor if floor > 0 else float("inf")
    text = f"FD / held-out floor = {ratio(s['floor_fd']):.2f}"
    if random_fd is not None:
        text += f"; FD / random-subset floor = {ratio(random_fd):.2f}"
    lines.append(text)
    return "\n".join(lines)
# ---- end eval ----


# ---- bench ----
def _add_bench(sub):
    from .bench.config import __doc__ as doc, add_arguments  # the standard library only: --help stays fast
    p = sub.add_parser("bench", help="sampling speed: ddpm_fast vs plain PyTorch, torch.compile and diffusers",
                       description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=_run_bench)


def _run_bench(args):
    from .bench.config import config_from_args
    from .bench.sampling import run
    try:
        config = config_from_args(args).resolved()
    except ValueError as err:
        raise SystemExit(f"ddpm-fast bench: error: {err}") from None
    return run(config)
# ---- end bench ----


def build_parser():
    from ._version import __version__
    parser = argparse.ArgumentParser(prog="ddpm-fast", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ddpm-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,sample,reference,eval,bench}")
    for name in ("train", "sample", "reference", "eval", "bench"):
        adder = globals().get(f"_add_{name}")
        if adder is not None:
            adder(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
