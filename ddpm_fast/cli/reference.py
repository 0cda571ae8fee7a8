"""`ddpm-fast reference`: a dataset's real images as an FID reference batch (.npz holding uint8 NHWC arr_0)."""
import os

from .common import UsageError, positive_int, usage_errors


def add(sub):
    p = sub.add_parser("reference", help="write a dataset's real images as an FID reference batch (.npz arr_0)",
                       description="Write a dataset's images, pixel for pixel, as an .npz holding arr_0: uint8 "
                       "(N, H, W, C): the reference batch guided-diffusion's evaluator reads beside the samples.")
    p.add_argument("--dataset", required=True, help="digits, fashion-mnist, folder:DIR or npz:FILE")
    p.add_argument("--split", choices=("train", "test", "all"), default="train", help="(default train)")
    p.add_argument("--n", type=positive_int, help="the first N images of the split (default: all)")
    p.add_argument("--data-dir", help="where the dataset's files are")
    p.add_argument("--image-size", type=positive_int, help="resize + center-crop to this size (folder datasets)")
    p.add_argument("--holdout", type=float, default=0.1, help="held-out fraction of a folder / npz dataset, as in "
                   "training: the test split (default 0.1)")
    p.add_argument("--out", required=True, metavar="NPZ", help="the .npz to write")
    p.set_defaults(func=run)


def run(args):
    from ..data import reference_batch
    from ..images import save_uint8_npz
    if os.path.isdir(args.out):
        raise UsageError(f"{args.out} is a directory; give a file name")
    try:
        pixels = reference_batch(args.dataset, args.split, args.n, data_dir=args.data_dir,
                                 image_size=args.image_size, holdout=args.holdout)
    except usage_errors() as err:
        raise UsageError(str(err)) from None
    save_uint8_npz(args.out, [pixels], pixels.shape)
    n, h, w, c = pixels.shape
    print(f"wrote {n} images ({h}x{w}x{c}, uint8) of {args.dataset} ({args.split}) to {args.out} as arr_0")
    return 0
