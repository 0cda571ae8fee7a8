"""`ddpm-fast sample`: images from a model (default: the bundled digits model) as a grid picture and/or .npz; with
--class, of a class-conditional model's classes (one grid row per class), guided by --guidance."""
import os

from .common import (UsageError, add_class_flags, add_sampler_flags, add_threads, class_labels, positive_int,
                     usage_errors)


def add(sub):
    p = sub.add_parser("sample", help="draw images from a trained model (image grid, optional .npz)",
                       description="Draw images with ddpm_fast.sample and write them as an image grid (PNG, JPEG "
                       "or WebP, by --out's extension) and optionally as an .npz.")
    p.add_argument("--checkpoint", metavar="PATH", help="a model file (ddpm_fast.save), a training checkpoint "
                   "(its EMA weights), a run directory, or a bundled model's name (digits, digits-cond) when no "
                   "such path exists; default: the bundled model, when this install has one")
    p.add_argument("-n", "--n", type=positive_int, help="number of images (default 64; 8 per class with several "
                   "--class; under torchrun write -n: torchrun reads --n as an abbreviation of its own options)")
    add_sampler_flags(p)
    add_class_flags(p)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's eta (sampler ddim only; default 0)")
    p.add_argument("--seed", type=int, help="same seed and thread count -> same images on a device (default: a "
                   "fresh one, printed)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when available (default)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="the model's compute dtype (default: the model's; fp16/bf16 run under autocast)")
    p.add_argument("--batch-size", type=positive_int, help="images per chunk (default min(n, 256))")
    p.add_argument("--out", metavar="FILE", help="image grid; the extension picks the format: .png (default "
                   "samples.png), .jpg / .jpeg, .webp")
    p.add_argument("--scale", type=_scale_arg, default="auto", metavar="K|auto",
                   help="enlarge each image K times (nearest neighbour, sharp pixels); auto (default): the "
                   "smallest K that makes images at least 32 px (8x8 digits: 4), 1 for larger images")
    p.add_argument("--npz", metavar="PATH", help="also write the samples as .npz (images: float32 NCHW in "
                   "[-1, 1]; arr_0: uint8 NHWC; with --class arr_1: the labels)")
    p.add_argument("--out-dir", metavar="DIR", help="an evaluation run instead of a grid: one file per chunk, "
                   "resumable (rerun the same command), then DIR/samples.npz (arr_0: uint8 NHWC); under torchrun "
                   "every process draws its share (see docs/evaluation.md)")
    p.add_argument("--png-dir", metavar="DIR", help="with --out-dir: also one PNG per image (for folder-based "
                   "FID tools)")
    p.add_argument("--overwrite", action="store_true", help="with --out-dir: start over when DIR holds a run "
                   "with other settings")
    add_threads(p)
    p.add_argument("--compile", action="store_true", help="run the model compiled by torch.compile inside "
                   "ddpm_fast's loop (the first call compiles: tens of seconds; docs/compile.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _scale_arg(text):
    return "auto" if text == "auto" else positive_int(text)


def _check_outputs(args):
    from ..images import check_image_path
    for path in filter(None, (args.out, args.npz)):
        if os.path.isdir(path):
            raise UsageError(f"{path} is a directory; give a file name")
    try:
        check_image_path(args.out)
    except ValueError as err:
        raise UsageError(f"--out {err}") from None


def _load(args, device):
    import ddpm_fast
    try:
        return ddpm_fast.load(args.checkpoint, device=device)
    except FileNotFoundError as err:
        if args.checkpoint is None:
            raise UsageError(f"--checkpoint PATH is needed: this install has no bundled default model ({err})")
        raise UsageError(str(err)) from None
    except usage_errors() as err:
        raise UsageError(str(err)) from None


def _images_and_labels(args, model):
    """(n, labels or None, images per grid row or None): several classes make one grid row each, so -n must
    divide among them (default 8 per class); otherwise -n images (default 64)."""
    classes = args.classes
    k = (getattr(model, "null_label", None) or 1) if classes == "all" else 1 if classes is None else len(classes)
    n = args.n if args.n is not None else (8 * k if k > 1 else 64)
    if k > 1 and n % k:
        raise UsageError(f"-n {n} is not a multiple of the {k} classes (one grid row per class)")
    return n, class_labels(args, model, n), (n // k if k > 1 else None)


def run(args):
    import torch

    import ddpm_fast
    from ..distributed import torchrun_env
    from ..images import check_image_path, default_scale, save_grid, save_npz
    from ..sampling import last_run_info
    from ..sampling.args import resolve

    if args.out_dir is not None:
        return run_dir(args)
    if args.png_dir is not None or args.overwrite:
        raise UsageError("--png-dir and --overwrite go with --out-dir")
    if torchrun_env()[1] > 1:
        raise UsageError("under torchrun, give --out-dir DIR: every process then draws its share of the images "
                         "into DIR")
    args.out = args.out or "samples.png"
    _check_outputs(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but CUDA is not available")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = _load(args, device)
    n, labels, per_row = _images_and_labels(args, model)
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    kwargs = dict(sampler=args.sampler, eta=args.eta, seed=args.seed, device=device, dtype=dtype,
                  batch_size=args.batch_size, progress=not args.no_progress, threads=args.threads,
                  spacing=args.spacing, labels=labels, guidance_scale=args.guidance, compile=args.compile)
    try:
        job = resolve(model, n, args.steps, **kwargs)  # every check, before any work
        check_image_path(args.out, job.plan.shape[0])
    except usage_errors() as err:
        raise UsageError(str(err)) from None
    samples = ddpm_fast.sample(model, n, args.steps, **kwargs)
    scale = default_scale(samples.shape[-2:]) if args.scale == "auto" else args.scale
    save_grid(samples, args.out, nrow=per_row, scale=scale)
    if args.npz:
        save_npz(samples, args.npz, labels=labels)
    info = last_run_info()
    written = args.out + (f" and {args.npz}" if args.npz else "")
    print(f"wrote {n} samples to {written} ({info['steps']} {args.sampler} steps, seed {info['seed']}, "
          f"{_classes_text(labels, info)}{info['wall_s']:.1f} s on {info['device']} with {info['threads']} thread"
          f"{'s' if info['threads'] != 1 else ''}, {'/'.join(sorted(set(info['modes'])))}{_compile_text(info)})")
    return 0


def _compile_text(info):
    if not info["compile"]:
        return ""
    return f", model compiled ({info['compile']}" + (f", {info['compile_s']:.1f} s of it compiling)"
                                                        if info["compiles"] else ", cached)")


def _classes_text(labels, info):
    if labels is None:
        return ""
    classes = sorted(set(labels))
    what = f"class {classes[0]}" if len(classes) == 1 else f"classes {','.join(map(str, classes))}"
    return f"{what}, guidance {info['guidance_scale']:g}, "


def run_dir(args):
    """ddpm-fast sample --out-dir: ddpm_fast.sample_to_dir over the processes torchrun started (or this one)."""
    import torch

    import ddpm_fast
    from .. import distributed
    if args.out is not None or args.npz is not None:
        raise UsageError("--out and --npz write a grid; with --out-dir the images go to DIR/samples.npz (and "
                         "--png-dir)")
    rank, _, local_rank = distributed.torchrun_env()
    try:
        device = distributed.resolve_device(args.device, local_rank)  # under torchrun: cuda:LOCAL_RANK
    except usage_errors() as err:
        raise UsageError(str(err)) from None
    model = _load(args, device)
    n = 64 if args.n is None else args.n
    labels = class_labels(args, model, n)
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    try:
        run = ddpm_fast.sample_to_dir(model, n, args.out_dir, png_dir=args.png_dir, overwrite=args.overwrite,
                                      progress=not args.no_progress, steps=args.steps, sampler=args.sampler,
                                      eta=args.eta, seed=args.seed, dtype=dtype, batch_size=args.batch_size,
                                      threads=args.threads, spacing=args.spacing, labels=labels,
                                      guidance_scale=args.guidance, compile=args.compile)
    except (ValueError, TypeError) as err:  # sample_to_dir checks everything before drawing
        raise UsageError(str(err)) from None
    if rank == 0:
        print(run.summary() + (f"; PNGs in {run.png_dir}" if run.png_dir else ""))
    return 0
