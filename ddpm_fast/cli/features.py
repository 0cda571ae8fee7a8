"""`ddpm-fast train-features`: train the quality metric's feature net (a small classifier) for a dataset that has
none committed -- a labelled image folder (one sub-folder per class) or an .npz with labels -- for `ddpm-fast
eval --feature-net FILE`."""
import shlex
import sys

from .common import UsageError, add_threads, positive_int, usage_errors


def add(sub):
    p = sub.add_parser("train-features", help="train the feature net `ddpm-fast eval` scores in, for a labelled "
                       "dataset without a committed one",
                       description=__doc__.split("\n", 1)[0].split(": ", 1)[1] + " The net is trained on the "
                       "dataset's train split (the same --holdout and --image-size as `ddpm-fast train`); its test "
                       "accuracy on the held-out split is printed and recorded in FILE.json beside FILE.")
    p.add_argument("--dataset", required=True, help="folder:DIR (one sub-folder per class) or npz:FILE with labels")
    p.add_argument("--out", required=True, metavar="FILE", help="FILE.safetensors (FILE.json is written beside it)")
    p.add_argument("--data-dir")
    p.add_argument("--image-size", type=positive_int, help="resize + center-crop the images to this size (use the "
                   "size the model was trained at)")
    p.add_argument("--holdout", type=float, default=0.1, help="held-out fraction (default 0.1, as training)")
    p.add_argument("--epochs", type=positive_int, default=30)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--seed", type=int, default=0)
    add_threads(p, default=1)
    p.set_defaults(func=run)


def run(args):
    from ..eval.feature_net import FeatureTrainConfig, save_feature_net, train_feature_net
    if not args.out.endswith(".safetensors"):
        raise UsageError(f"--out {args.out}: the feature net file must end in .safetensors")
    threads = 1 if args.threads == "auto" else args.threads
    cfg = FeatureTrainConfig(dataset=args.dataset, data_dir=args.data_dir, image_size=args.image_size,
                             holdout=args.holdout, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                             threads=threads)
    try:
        from ..data import load_dataset
        load_dataset(cfg.dataset, "test", data_dir=cfg.data_dir, image_size=cfg.image_size, holdout=cfg.holdout)
    except usage_errors() as err:
        raise UsageError(str(err)) from None
    try:
        net, info = train_feature_net(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except ValueError as err:  # no labels, one class, a size the net does not take: found before training
        raise UsageError(str(err)) from None
    info["command"] = "ddpm-fast " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "ddpm-fast train-features"
    save_feature_net(net, args.out, info)
    print(f"wrote {args.out} (test accuracy {info['test_accuracy']:.3f} on {info['n_test']} held-out images); "
          f"use it with: ddpm-fast eval --dataset {args.dataset} --feature-net {args.out}")
    return 0
