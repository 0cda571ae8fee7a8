"""`ddpm-fast eval`: sample a model and score the samples (FD / KID in a feature net's space) beside the
real-vs-real floors and pure noise. Everything that can fail is checked before sampling starts."""
import json
import os
import sys

from .common import UsageError, add_class_flags, add_sampler_flags, add_threads, class_labels, usage_errors


def add(sub):
    p = sub.add_parser("eval", help="score a model's samples (FD/KID in a feature net's space) beside the "
                       "real-vs-real floor and pure noise",
                       description="Sample n images from a model and score them with ddpm_fast.metrics.evaluate "
                       "against the dataset's train split; prints the held-out real floor and the noise score "
                       "beside them. digits and fashion-mnist have committed feature nets; any other dataset "
                       "needs --feature-net FILE (train one with `ddpm-fast train-features`).")
    p.add_argument("--checkpoint", metavar="PATH", help="a model file, a training checkpoint (its EMA weights), "
                   "a run directory or a bundled model's name (digits, digits-cond) (default: the bundled model)")
    p.add_argument("--dataset", required=True, help="the dataset the model was trained on (digits, "
                   "fashion-mnist, folder:DIR, npz:FILE)")
    p.add_argument("--n", type=int, default=None, help="images to sample and score (default: the held-out "
                   "split's size, which is also the maximum)")
    add_sampler_flags(p, int)
    add_class_flags(p, "samples")
    p.add_argument("--seed", type=int, default=0, help="sampling and metric seed (default 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--batch-size", type=int, default=None, help="images per sampling chunk")
    p.add_argument("--data-dir", default=None, help="where the dataset's files are")
    p.add_argument("--holdout", type=float, default=None, help="held-out fraction of a folder / npz dataset "
                   "(default: the run's, when --checkpoint is a run directory, else 0.1, as `ddpm-fast train`)")
    p.add_argument("--feature-net", default=None, metavar="FILE", help="a feature net .safetensors (default: "
                   "the committed one of digits / fashion-mnist)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the scores as JSON")
    add_threads(p)
    p.set_defaults(func=run)


def _holdout(args):
    if args.holdout is not None:
        return args.holdout
    if args.checkpoint and os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        from ..training.resume import run_settings
        return run_settings(args.checkpoint)["holdout"]
    return 0.1


def _feature_net(args, shape, device):
    """The feature net, loaded before any sampling; a dataset without a committed one needs --feature-net."""
    from ..eval.feature_net import PRESETS, load_feature_net
    if args.feature_net is None and args.dataset not in PRESETS:
        raise UsageError(f"{args.dataset} has no committed feature net (only {', '.join(PRESETS)} do): pass "
                         f"--feature-net FILE. Train one on the dataset's labels with `ddpm-fast train-features "
                         f"--dataset {args.dataset} --out FILE.safetensors` (a folder needs one sub-folder per "
                         f"class)")
    net = load_feature_net(args.feature_net or args.dataset, device)
    if (net.cfg.in_channels, net.cfg.image_size, net.cfg.image_size) != shape:
        raise UsageError(f"--feature-net {args.feature_net or args.dataset} takes {net.cfg.in_channels}x"
                         f"{net.cfg.image_size}x{net.cfg.image_size} images, the model makes {shape}")
    return net


def _prepare(args):
    import ddpm_fast
    from ..data import load_dataset
    from ..distributed import resolve_device
    device = resolve_device(args.device)
    model = ddpm_fast.load(args.checkpoint, device=device)
    c, size = model.config.in_channels, model.config.image_size
    holdout = _holdout(args)
    held_out = len(load_dataset(args.dataset, "test", data_dir=args.data_dir, image_size=size, holdout=holdout))
    net = _feature_net(args, (c, size, size), device)
    n = held_out if args.n is None else args.n
    if not 2 <= n <= held_out:
        raise ValueError(f"--n must be in [2, {held_out}] ({args.dataset}'s held-out images, which the "
                         f"real-vs-real floor uses); got {n}")
    return model, net, n, holdout


def run(args):
    import ddpm_fast
    from ..eval.metrics import evaluate
    from ..files import atomic_write
    from ..sampling.args import resolve
    sample_kw = dict(steps=args.steps, sampler=args.sampler, seed=args.seed, batch_size=args.batch_size,
                     threads=args.threads, spacing=args.spacing)
    try:
        model, net, n, holdout = _prepare(args)
        sample_kw.update(labels=class_labels(args, model, n), guidance_scale=args.guidance)
        resolve(model, n, **sample_kw)
    except UsageError:
        raise
    except usage_errors() as err:
        raise UsageError(str(err)) from None
    samples = ddpm_fast.sample(model, n, progress=sys.stderr.isatty(), **sample_kw)
    from ..sampling import last_run_info
    used_steps = last_run_info()["steps"]
    scores = evaluate(samples, args.dataset, n=n, data_dir=args.data_dir, seed=args.seed, feature_net=net,
                      holdout=holdout)
    scores.update(checkpoint=args.checkpoint or "bundled default", steps=used_steps, sampler=args.sampler,
                  spacing=args.spacing, seed=args.seed)
    if sample_kw["labels"] is not None:
        scores.update(classes=sorted(set(sample_kw["labels"])), guidance_scale=last_run_info()["guidance_scale"])
    print(format_eval(scores))
    if args.json:
        text = json.dumps(scores, indent=2) + "\n"
        atomic_write(args.json, lambda tmp: open(tmp, "w").write(text))
    return 0


def format_eval(s):
    from ..eval.metrics import random_floor_text
    rows = [("samples", s["fd"], s["kid"], s["kid_std"]),
            ("real held-out (floor)", s["floor_fd"], s["floor_kid"], s["floor_kid_std"]),
            ("pure noise", s["noise_fd"], s["noise_kid"], s["noise_kid_std"])]
    guided = f", classes {min(s['classes'])}-{max(s['classes'])} in equal blocks, guidance " \
        f"{s['guidance_scale']:g}" if "classes" in s else ""
    lines = [f"{s['dataset']}: {s['n']} samples ({s['sampler']}, {s['steps']} steps, seed {s['seed']}{guided}) vs "
             f"{s['reference_n']} train images",
             f"{'':24s} {'FD':>10s} {'KIDx1e3':>10s} {'+-':>8s}"]
    lines += [f"{name:24s} {fd:10.3f} {k * 1e3:10.3f} {sd * 1e3:8.3f}" for name, fd, k, sd in rows]
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
