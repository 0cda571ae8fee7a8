"""Offline sample-quality metrics: Fréchet distance and KID in the feature space of a small classifier.

Without network access there are no Inception weights, so the features come from a small CNN trained on the
same dataset's train split (ddpm_fast/feature_net.py; weights committed under ddpm_fast/assets/). The numbers
are NOT comparable to Inception-FID; they are comparable with each other for one dataset and one feature net,
and ``evaluate`` always reports them beside the real-vs-real floors and the score of pure noise.

Commands (reproduce the committed weights and the README's reference numbers):
    python -m ddpm_fast.metrics train-features --dataset digits --out ddpm_fast/assets/features_digits.safetensors
    python -m ddpm_fast.metrics reference-scores --dataset digits
"""
import argparse
import contextlib
import json
import shlex
import sys
from typing import Optional, Tuple, Union

import torch

RANGE_TOLERANCE = 1e-3  # samples may overshoot [-1, 1] by this much (rounding); they are then clamped


def _as_features(f, name) -> torch.Tensor:
    f = torch.as_tensor(f).detach().to("cpu", torch.float64)
    if f.dim() != 2 or f.shape[0] < 2 or f.shape[1] < 1:
        raise ValueError(f"{name} must be (N, D) features with N >= 2; got shape {tuple(f.shape)}")
    if not torch.isfinite(f).all():
        raise ValueError(f"{name} contains NaN or inf")
    return f


def feature_stats(feats) -> Tuple[torch.Tensor, torch.Tensor]:
    """feats: (N, D), N >= 2 -> (mean (D,), covariance (D, D) with the N-1 normalization), float64."""
    f = _as_features(feats, "feats")
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (len(f) - 1)


@contextlib.contextmanager
def _one_thread():
    """Small (D <= a few hundred) eigensolvers gain nothing from threads, and on a loaded machine their
    OpenMP threads spin: measured here 5 ms with one thread vs 167 ms with two for a 128x128 eigh."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
    """||mu_a - mu_b||^2 + tr(A) + tr(B) - 2 tr((A B)^(1/2)) for PSD A, B, in float64.

    tr((A B)^(1/2)) = sum of sqrt(eigenvalues of A^(1/2) B A^(1/2)): that matrix is symmetric PSD, so a
    symmetric eigensolver gives real eigenvalues (tiny negative ones from rounding are clipped to 0) and no
    complex sqrtm is needed.
    """
    mu_a, mu_b, a, b = (torch.as_tensor(t).to("cpu", torch.float64) for t in (mu_a, mu_b, cov_a, cov_b))
    if a.shape != b.shape or a.dim() != 2 or a.shape[0] != a.shape[1] or mu_a.shape != (a.shape[0],) \
            or mu_b.shape != mu_a.shape:
        raise ValueError(f"stats disagree: mu {tuple(mu_a.shape)}/{tuple(mu_b.shape)}, covariances "
                         f"{tuple(a.shape)}/{tuple(b.shape)}")
    with _one_thread():
        w, v = torch.linalg.eigh((a + a.T) / 2)
        sqrt_a = (v * w.clamp(min=0).sqrt()) @ v.T
        m = sqrt_a @ b @ sqrt_a
        tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + a.trace() + b.trace() - 2 * tr_sqrt)


def frechet_distance(feats_a, feats_b) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets: (Na, D), (Nb, D) -> float."""
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    return frechet_distance_from_stats(*feature_stats(a), *feature_stats(b))


def _poly_kernel(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(x.y / D + 1)^3 for all row pairs: (M, D), (K, D) -> (M, K); one addmm and an in-place cube (the
    elementwise passes cost as much as the matmul here)."""
    g = torch.addmm(torch.ones((), dtype=p.dtype), p, q.T, alpha=1.0 / p.shape[1])
    return (g * g).mul_(g)


def kid(feats_a, feats_b, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> Tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): the unbiased MMD^2 with the kernel
    k(x, y) = (x.y / D + 1)^3, averaged over ``subsets`` random subsets of m = min(subset_size, Na, Nb)
    rows drawn without replacement from each set. Returns (mean, std over subsets), float64 math."""
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"need subsets >= 1 and subset_size >= 2; got {subsets}, {subset_size}")
    m = min(subset_size, len(a), len(b))
    gen = torch.Generator().manual_seed(seed)
    values = torch.empty(subsets, dtype=torch.float64)
    for s in range(subsets):
        x = a[torch.randperm(len(a), generator=gen)[:m]]
        y = b[torch.randperm(len(b), generator=gen)[:m]]
        kxx, kyy, kxy = (_poly_kernel(p, q) for p, q in ((x, x), (y, y), (x, y)))
        off_diag = (kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (m * (m - 1))
        values[s] = off_diag - 2 * kxy.sum() / (m * m)
    return float(values.mean()), float(values.std()) if subsets > 1 else 0.0


def check_samples(samples, shape: Tuple[int, int, int], what: str = "samples") -> torch.Tensor:
    """Validates (N, C, H, W) float images in [-1, 1] against ``shape`` = (C, H, W); returns them as float32,
    clamped to [-1, 1] (overshoot up to RANGE_TOLERANCE is allowed)."""
    if not isinstance(samples, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor (N, C, H, W) in [-1, 1]; got {type(samples).__name__}")
    if not samples.is_floating_point():
        raise TypeError(f"{what} must be a float tensor in [-1, 1]; got {samples.dtype} (uint8 images: "
                        f"x.float() / 127.5 - 1)")
    if samples.dim() != 4 or tuple(samples.shape[1:]) != tuple(shape):
        raise ValueError(f"{what} must have shape (N, {', '.join(map(str, shape))}) for this dataset/feature "
                         f"net; got {tuple(samples.shape)}")
    if len(samples) < 2:
        raise ValueError(f"need at least 2 {what}; got {len(samples)}")
    x = samples.detach().float()
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or inf")
    lo, hi = x.min().item(), x.max().item()
    if lo < -1 - RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise ValueError(f"{what} must lie in [-1, 1]; got values in [{lo:.4g}, {hi:.4g}] (clamp them, e.g. "
                         f"x.clamp(-1, 1), or rescale [0, 1] images with 2 * x - 1)")
    return x.clamp(-1, 1)


@torch.no_grad()
def extract_features(net, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """images: (N, C, H, W) float32 in [-1, 1] on the net's device -> (N, D) float64 features on the CPU."""
    net.eval()
    out = [net.features(images[i:i + batch_size]).double().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def _scores(feats, ref, prefix, kid_subsets, kid_subset_size, seed):
    mean, std = kid(feats, ref, kid_subsets, kid_subset_size, seed)
    return {f"{prefix}fd": frechet_distance(feats, ref), f"{prefix}kid": mean, f"{prefix}kid_std": std}


def _check_count(value, what: str, low: int):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{what} must be an int >= {low}; got {value!r}")


def random_floor_text(scores: dict) -> str:
    """'median (median of D draws of n: min...max)' of an evaluate() dict's random floor (it must have one)."""
    return (f"{scores['random_floor_fd']:10.3f}   (median of {scores['random_floor_draws']} draws of "
            f"{scores['n']}: {scores['random_floor_fd_min']:.3f}...{scores['random_floor_fd_max']:.3f})")


def random_floor(ref_feats, n: int, draws: int, generator: torch.Generator) -> dict:
    """The FD of ``n`` real images drawn at random (without replacement) from the reference, scored against the
    reference, ``draws`` times: their median, min and max (keys random_floor_fd, _min, _max, random_floor_draws).

    Why beside the held-out floor: a sampler draws its images independently, so the class counts of its n
    samples vary from draw to draw; a held-out split can be stratified (digits' is: exactly 35-36 per class),
    and in a classifier's feature space FD at small n is dominated by class counts. On digits at n = 355:
    stratified real images score ~0.02, random real images ~0.1 (measured; README, "The quality metric"),
    so no sampler, a perfect one included, can expect to score the stratified floor. These draws share images
    with the reference, which tends to lower their FD, so this floor errs on the strict side. None values
    when ``draws`` is 0 or n > half the reference (the draws would be most of the reference itself). For an
    even ``draws`` the lower of the two middle values is the median."""
    _check_count(n, "random_floor: n", 2)
    _check_count(draws, "random_floor: draws", 0)
    ref = _as_features(ref_feats, "ref_feats")
    if draws == 0 or n > len(ref) // 2:
        return {"random_floor_fd": None, "random_floor_fd_min": None, "random_floor_fd_max": None,
                "random_floor_draws": 0}
    stats = feature_stats(ref)
    fds = sorted(frechet_distance_from_stats(*feature_stats(ref[torch.randperm(len(ref), generator=generator)[:n]]),
                                             *stats) for _ in range(draws))
    return {"random_floor_fd": fds[(draws - 1) // 2], "random_floor_fd_min": fds[0], "random_floor_fd_max": fds[-1],
            "random_floor_draws": draws}


def _resolve_feature_net(feature_net, dataset, samples):
    """-> (net, device): a given FeatureNet runs where it lives; a loaded one on the samples' device."""
    from .feature_net import load_feature_net
    if isinstance(feature_net, torch.nn.Module):
        if not (hasattr(feature_net, "features") and hasattr(feature_net, "cfg")):
            raise TypeError("feature_net must be a ddpm_fast FeatureNet (with .features and .cfg), a "
                            ".safetensors path or None")
        return feature_net, next(feature_net.parameters()).device
    if feature_net is not None and not isinstance(feature_net, str):
        raise TypeError(f"feature_net must be a FeatureNet, a .safetensors path or None; got "
                        f"{type(feature_net).__name__}")
    device = samples.device if isinstance(samples, torch.Tensor) else None
    return load_feature_net(feature_net or dataset, device), device


def evaluate(samples: torch.Tensor, dataset: str, n: Optional[int] = None, data_dir: Optional[str] = None,
             seed: int = 0, feature_net: Union[str, "torch.nn.Module", None] = None,
             reference_size: int = 10000, kid_subsets: int = 100, kid_subset_size: int = 1000,
             floor_draws: int = 101, holdout: float = 0.1) -> dict:
    """Scores generated images against a dataset's train split in a feature net's space.

    samples: (N, C, H, W) float in [-1, 1], the dataset's image shape (e.g. (N, 1, 8, 8) for digits), any
    float dtype and device. n: images scored (default: min(N, held-out size)); the floor uses n held-out
    images too, so n may not exceed the held-out split. feature_net: a FeatureNet (runs on its own device),
    a .safetensors path or None for the committed net of ``dataset`` (both run on the samples' device).
    The reference is a random subset of ``reference_size`` train images; ``seed`` fixes it, the held-out
    subset, the noise images and KID's subsets.
    floor_draws: random real subsets behind random_floor_fd (``random_floor``; 0: skip).
    holdout: the held-out fraction of a folder / npz dataset (as in training; ``ddpm_fast.data.load_dataset``).
    Returns a dict: fd, kid, kid_std (the samples), floor_fd, floor_kid, floor_kid_std (held-out real images),
    random_floor_fd (median FD of floor_draws random n-subsets of the reference) with random_floor_fd_min /
    _max / random_floor_draws, noise_fd, noise_kid, noise_kid_std (N(0, 1) clipped to [-1, 1]), n,
    reference_n, dataset.
    """
    _check_count(floor_draws, "floor_draws", 0)
    from ..data import load_dataset
    net, device = _resolve_feature_net(feature_net, dataset, samples)
    shape = (net.cfg.in_channels, net.cfg.image_size, net.cfg.image_size)
    x = check_samples(samples, shape).to(device)
    held_out = load_dataset(dataset, "test", data_dir=data_dir, image_size=net.cfg.image_size, holdout=holdout)
    if held_out.shape != shape:
        raise ValueError(f"{dataset} images are {held_out.shape} but the feature net takes {shape}")
    n = min(len(x), len(held_out)) if n is None else n
    if not 2 <= n <= len(x):
        raise ValueError(f"n must be in [2, {len(x)}] (the number of samples given); got {n}")
    if n > len(held_out):
        raise ValueError(f"n={n} exceeds {dataset}'s {len(held_out)} held-out images; the real-vs-real floor "
                         f"needs as many, so pass n <= {len(held_out)}")
    gen = torch.Generator().manual_seed(seed)
    train = load_dataset(dataset, "train", data_dir=data_dir, image_size=net.cfg.image_size, holdout=holdout)
    ref_idx = torch.randperm(len(train), generator=gen)[:reference_size]
    ref = extract_features(net, train.batch(ref_idx, device=device))
    real = held_out.batch(torch.randperm(len(held_out), generator=gen)[:n], device=device)
    noise = torch.randn((n, *shape), generator=gen).clamp(-1, 1).to(device)
    result = {"dataset": dataset, "n": n, "reference_n": len(ref)}
    for prefix, images in (("", x[:n]), ("floor_", real), ("noise_", noise)):
        result.update(_scores(extract_features(net, images), ref, prefix, kid_subsets, kid_subset_size, seed))
    result.update(random_floor(ref, n, floor_draws, gen))  # drawn last: the scores above keep their draws
    return result


# --- reference scores of simple degradations (README numbers) ---------------------------------------------

def gaussian_blur(images: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """(N, C, H, W) float -> same, blurred per channel by a (6 sigma + 1)-wide Gaussian, reflect padding."""
    radius = max(1, min(int(3 * sigma + 0.5), min(images.shape[2:]) - 1))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=images.device)
    k = torch.exp(-t.square() / (2 * sigma * sigma))
    k = k / k.sum()
    c = images.shape[1]
    x = torch.nn.functional.pad(images, (radius,) * 4, mode="reflect")
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)
    return torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)


def reference_scores(dataset: str, n: Optional[int] = None, data_dir: Optional[str] = None, seed: int = 0,
                     feature_net=None) -> dict:
    """evaluate() of degraded held-out images: {case: result dict}. Cases: the held-out images themselves,
    + N(0, 0.1^2) and N(0, 0.3^2) noise, Gaussian blur (sigma 0.5 and 1 px), one class only (class 0, drawn
    with replacement).
    Each result also carries the floor and the pure-noise score."""
    from ..data import load_dataset
    held_out = load_dataset(dataset, "test", data_dir=data_dir)
    n = len(held_out) if n is None else n
    gen = torch.Generator().manual_seed(seed + 1)  # not ``seed``: evaluate() draws its own subsets from that
    real = held_out.batch(torch.randperm(len(held_out), generator=gen)[:n])
    cls0 = (held_out.labels == 0).nonzero().flatten() if held_out.labels is not None else None
    cases = {"real held-out": real}
    for std in (0.1, 0.3):
        cases[f"+N(0,{std}) noise"] = (real + std * torch.randn(real.shape, generator=gen)).clamp(-1, 1)
    for sigma in (0.5, 1.0):
        cases[f"blur sigma={sigma:g}"] = gaussian_blur(real, sigma).clamp(-1, 1)
    if cls0 is not None and len(cls0):
        cases["one class only"] = held_out.batch(cls0[torch.randint(len(cls0), (n,), generator=gen)])
    return {name: evaluate(x, dataset, n=n, data_dir=data_dir, seed=seed, feature_net=feature_net)
            for name, x in cases.items()}


def format_scores(table: dict) -> str:
    """{case: evaluate() dict} -> a fixed-width text table (FD, KID x 1e3), floor and noise rows last."""
    first = next(iter(table.values()))
    rows = [(name, r["fd"], r["kid"], r["kid_std"]) for name, r in table.items()]
    rows += [("floor (held-out vs train)", first["floor_fd"], first["floor_kid"], first["floor_kid_std"]),
             ("pure noise", first["noise_fd"], first["noise_kid"], first["noise_kid_std"])]
    lines = [f"{first['dataset']}: n={first['n']}, reference={first['reference_n']} train images",
             f"{'case':28s} {'FD':>10s} {'KIDx1e3':>10s} {'+-':>8s}"]
    lines += [f"{name:28s} {fd:10.3f} {k * 1e3:10.3f} {s * 1e3:8.3f}" for name, fd, k, s in rows]
    if first.get("random_floor_fd") is not None:
        lines.append(f"{'floor (random real subsets)':28s} {random_floor_text(first)}")
    return "\n".join(lines)


# --- command line -----------------------------------------------------------------------------------------

def _parser():
    p = argparse.ArgumentParser(prog="python -m ddpm_fast.metrics", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train-features", help="train a feature net (the metric's classifier) on a dataset")
    t.add_argument("--dataset", required=True)
    t.add_argument("--out", required=True, help="FILE.safetensors (a FILE.json record is written beside it)")
    t.add_argument("--data-dir")
    for name, typ in (("epochs", int), ("batch-size", int), ("lr", float), ("weight-decay", float),
                      ("seed", int), ("threads", int)):
        t.add_argument(f"--{name}", type=typ)
    r = sub.add_parser("reference-scores", help="scores of real / degraded held-out images, floor, noise")
    r.add_argument("--dataset", required=True)
    r.add_argument("--data-dir")
    r.add_argument("--n", type=int)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--feature-net", help="a .safetensors feature net (default: the committed one)")
    r.add_argument("--json", help="also write the results to this JSON file")
    return p


def _train_features(args, argv):
    from .feature_net import FeatureTrainConfig, save_feature_net, train_feature_net
    overrides = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "weight_decay", "seed", "threads")
                 if getattr(args, k) is not None}
    cfg = FeatureTrainConfig(dataset=args.dataset, data_dir=args.data_dir, **overrides)
    net, info = train_feature_net(cfg)
    info["command"] = "python -m ddpm_fast.metrics " + shlex.join(argv)
    save_feature_net(net, args.out, info)
    print(f"wrote {args.out}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    if args.command == "train-features":
        _train_features(args, argv)
        return
    table = reference_scores(args.dataset, args.n, args.data_dir, args.seed, args.feature_net)
    print(format_scores(table))
    if args.json:
        from ..files import atomic_write
        text = json.dumps(table, indent=2) + "\n"
        atomic_write(args.json, lambda tmp: open(tmp, "w").write(text))


if __name__ == "__main__":
    main()
