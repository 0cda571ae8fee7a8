"""Exact answers for sampler tests: models whose predictions are the true score of known data, and the float64
recursions that give the exact output law of a sampler driven by them (see sampling/test_oracle.py). Each
recursion takes the data prediction as an affine map x0*(x) = A0 x + B0 per noise level (``gaussian_x0``), so
classifier-free guidance of Gaussian models (``guided_x0``: still affine) has an exact law too."""
import math

import numpy as np
import torch
from torch import nn


class GaussianOracle(nn.Module):
    """The optimal model for x0 ~ N(mu, s^2): eps*, x0* or v* at ORIGINAL timestep t; learned_range appends a
    constant variance channel ``var_value`` in [-1, 1]."""

    def __init__(self, base, mu, s, prediction="eps", var_value=None):
        super().__init__()
        self.register_buffer("abar", torch.tensor(base.alphas_cumprod, dtype=torch.float32))
        self.register_buffer("mu", mu.float())
        self.register_buffer("s2", (s ** 2).float())
        self.prediction, self.var_value, self.calls = prediction, var_value, 0

    def forward(self, x, t):
        self.calls += 1
        ab = self.abar[t].view(-1, 1, 1, 1)
        centred = (x - ab.sqrt() * self.mu) / (ab * self.s2 + 1 - ab)
        eps = (1 - ab).sqrt() * centred
        x0 = self.mu + ab.sqrt() * self.s2 * centred
        out = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[self.prediction]
        if self.var_value is not None:
            out = torch.cat([out, torch.full_like(out, self.var_value)], dim=1)
        return out


class GuidedGaussianOracle(nn.Module):
    """A class-conditional Gaussian oracle: for label k < K the optimal model of x0 ~ N(mu[k], s[k]^2), for the
    null label K (and for y = None, the unconditional call) that of N(mu[K], s[K]^2), per pixel; mu, s: (K + 1,
    *pixel shape). ``model(x, t, y)`` as ``sample`` calls a class-conditional module (``null_label`` = K). A
    learned-range output appends ``var_value`` for labels and ``var_null`` for the null label, so a step that
    took the variance from the wrong half would change the output law. Records each call's batch size."""

    def __init__(self, base, mu, s, prediction="eps", var_value=None, var_null=None):
        super().__init__()
        self.register_buffer("abar", torch.tensor(base.alphas_cumprod, dtype=torch.float32))
        self.register_buffer("mu", mu.float())
        self.register_buffer("s2", (s ** 2).float())
        self.null_label = mu.shape[0] - 1
        self.prediction, self.var_value, self.var_null, self.batches = prediction, var_value, var_null, []

    def forward(self, x, t, y=None):
        self.batches.append(x.shape[0])
        y = torch.full((x.shape[0],), self.null_label, dtype=torch.int64, device=x.device) if y is None else y
        ab, mu, s2 = self.abar[t].view(-1, 1, 1, 1), self.mu[y], self.s2[y]
        centred = (x - ab.sqrt() * mu) / (ab * s2 + 1 - ab)
        eps = (1 - ab).sqrt() * centred
        x0 = mu + ab.sqrt() * s2 * centred
        out = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[self.prediction]
        if self.var_value is not None:
            var = torch.where(y == self.null_label, self.var_null, self.var_value).view(-1, 1, 1, 1).to(out.dtype)
            out = torch.cat([out, var.expand_as(out)], dim=1)
        return out


def assert_moments(x, m, v, what, z_max=5.0):
    """Sample mean / variance of x (n, ...) vs an exact Gaussian law (m, v) per pixel: each pixel's z and the
    pixel-pooled z within z_max (for Gaussian output these standard errors are exact)."""
    n = x.shape[0]
    xd = x.double().numpy()
    z_mean = (xd.mean(0) - m) / np.sqrt(v / n)
    z_var = (xd.var(0, ddof=1) - v) / (v * math.sqrt(2 / (n - 1)))
    for name, z in (("mean", z_mean), ("variance", z_var)):
        pooled = z.mean() * math.sqrt(z.size)
        assert np.abs(z).max() < z_max and abs(pooled) < z_max, \
            f"{what}: {name} off the exact law by z max {np.abs(z).max():.2f}, pooled {pooled:.2f}"


def gaussian_x0(mu, s):
    """The exact data prediction of x0 ~ N(mu, s^2) per pixel as an affine map of x_t: abar -> (A0, B0), float64
    arrays, x0*(x) = A0 x + B0 with A0 = sqrt(abar) s^2 / (abar s^2 + 1 - abar), B0 = mu - A0 sqrt(abar) mu."""
    mu, s2 = np.asarray(mu, dtype=np.float64), np.asarray(s, dtype=np.float64) ** 2

    def at(ab):
        gain = math.sqrt(ab) * s2 / (ab * s2 + 1 - ab)
        return gain, mu - gain * math.sqrt(ab) * mu
    return at


def guided_x0(cond, uncond, w):
    """Classifier-free guidance of two affine data predictions (``gaussian_x0`` maps): eps_u + w (eps_c - eps_u)
    of their eps is x0_u + w (x0_c - x0_u) of their x0 (x0 is affine in eps with a coefficient of x_t the same for
    both), so the guided prediction is affine too: abar -> (A0, B0)."""
    def at(ab):
        (a_c, b_c), (a_u, b_u) = cond(ab), uncond(ab)
        return a_u + w * (a_c - a_u), b_u + w * (b_c - b_u)
    return at


def exact_moments(schedule, mu, s, sampler="ddpm", variance="fixed_small", eta=0.0, var_value=0.0, x0=None):
    """Per-pixel mean and variance (float64) of the chain's output for the oracle: x_T ~ N(0, 1), and each step
    is x' = A x + B + sigma z with x0* = A0 x + B0 (the oracle's, whatever it predicts; ``x0``: another affine
    data prediction, abar -> (A0, B0), such as ``guided_x0``'s)."""
    r = schedule.numpy_tables()
    x0 = gaussian_x0(mu.double().numpy(), s.double().numpy()) if x0 is None else x0
    m, v = np.zeros(tuple(mu.shape)), np.ones(tuple(mu.shape))
    for i in reversed(range(schedule.num_steps)):
        ab, sra, srm1 = r["alphas_cumprod"][i], r["sqrt_recip_alphas_cumprod"][i], r["sqrt_recipm1_alphas_cumprod"][i]
        A0, B0 = x0(ab)
        if sampler == "ddpm":  # posterior mean of (x0*, x)
            A, B = r["posterior_mean_coef1"][i] * A0 + r["posterior_mean_coef2"][i], r["posterior_mean_coef1"][i] * B0
            frac = (var_value + 1) / 2
            var = {"fixed_small": r["posterior_variance"][i], "fixed_large": r["betas"][i],
                   "learned_range": math.exp(frac * r["log_betas"][i]
                                             + (1 - frac) * r["posterior_log_variance_clipped"][i])}[variance]
        else:  # DDIM eq. 12: sqrt(abar_prev) x0* + sqrt(1 - abar_prev - sigma^2) eps_hat, eps_hat from x0*
            var = eta ** 2 * r["posterior_variance"][i]
            d = math.sqrt(max(r["one_minus_alphas_cumprod_prev"][i] - var, 0.0))
            A = r["sqrt_alphas_cumprod_prev"][i] * A0 + d * (sra - A0) / srm1
            B = r["sqrt_alphas_cumprod_prev"][i] * B0 - d * B0 / srm1
        m, v = A * m + B, A * A * v + (var if i > 0 else 0.0)
    return m, v


def exact_solver_moments(schedule, mu, s, sampler, x0=None):
    """Per-pixel mean and variance (float64) of a few-step solver's output for the Gaussian oracle (clip=False;
    ``x0``: another affine data prediction abar -> (A0, B0), such as ``guided_x0``'s).

    With the exact data prediction x0*(x) = A0 x + B0 every solver update is affine in its inputs, so every
    quantity of the chain (x, the history, UniPC's corrected sample) is an affine function of x_T and of the
    SDE solver's step noises z_k, all independent N(0, 1). The recursion runs the solver's own update formulas
    (diffusion.solvers.solver_update_ref) on those coefficient vectors: rows [x_T, 1, z_0, ..., z_{N-1}]."""
    from ddpm_fast.diffusion import solvers
    x0 = gaussian_x0(mu.double().numpy(), s.double().numpy()) if x0 is None else x0
    n, pixels = schedule.num_steps, mu.numel()
    points = solvers.chain_points(schedule.alphas_cumprod)
    x = torch.zeros(n + 2, pixels, dtype=torch.float64)
    x[0] = 1.0
    h1 = h2 = last = torch.zeros_like(x)
    for k in range(n):
        p = points[k]
        A0, B0 = (torch.tensor(np.broadcast_to(c, tuple(mu.shape)), dtype=torch.float64).flatten()
                  for c in x0(p.alpha ** 2))
        m = A0 * x
        m[1] += B0
        z = torch.zeros_like(x)
        z[2 + k] = 1.0
        x_next, xc = solvers.solver_update_ref(sampler, points, k, x, m, h1, h2, last, z)
        last, h2, h1, x = xc, h1, m, x_next
    shape = tuple(s.shape)
    return x[1].view(shape).numpy(), (x[0] ** 2 + (x[2:] ** 2).sum(0)).view(shape).numpy()


class MixtureOracle(nn.Module):
    """The optimal model for x0 ~ w N(mu1, s1^2) + (1 - w) N(mu2, s2^2), independently per pixel: the posterior
    mean of x0 given x_t mixes the two components' Gaussian posterior means by their responsibilities,
        r_j(x_t) ~ w_j N(x_t; sqrt(abar) mu_j, abar s_j^2 + 1 - abar),
    and eps* = (x_t - sqrt(abar) E[x0 | x_t]) / sqrt(1 - abar). Computed in float64 (CPU tensors, not buffers:
    the sampler then runs the model in float32, its default), returned as float32."""

    def __init__(self, base, mu1, s1, mu2, s2, w=0.5, prediction="eps"):
        super().__init__()
        self.abar = torch.tensor(base.alphas_cumprod, dtype=torch.float64)
        self.mu1, self.s1, self.mu2, self.s2 = (torch.as_tensor(v, dtype=torch.float64) for v in (mu1, s1, mu2, s2))
        self.w, self.prediction, self.calls = w, prediction, 0

    def forward(self, x, t):
        self.calls += 1
        ab = self.abar[t].view(-1, 1, 1, 1)
        a, x64 = ab.sqrt(), x.double()
        logs, means = [], []
        for w, mu, s in ((self.w, self.mu1, self.s1), (1 - self.w, self.mu2, self.s2)):
            var = ab * s ** 2 + 1 - ab
            logs.append(math.log(w) - 0.5 * var.log() - 0.5 * (x64 - a * mu) ** 2 / var)
            means.append(mu + a * s ** 2 * (x64 - a * mu) / var)
        r = torch.softmax(torch.stack(logs), dim=0)
        x0 = r[0] * means[0] + r[1] * means[1]
        eps = (x64 - a * x0) / (1 - ab).sqrt()
        out = {"eps": eps, "x0": x0, "v": a * eps - (1 - ab).sqrt() * x0}[self.prediction]
        return out.float()

    def sample_data(self, n, generator):
        """n exact draws of x0, float64 (n, *pixel shape)."""
        shape = (n, *self.mu1.shape)
        first = torch.rand(shape, generator=generator, dtype=torch.float64) < self.w
        z = torch.randn(shape, generator=generator, dtype=torch.float64)
        return torch.where(first, self.mu1 + self.s1 * z, self.mu2 + self.s2 * z)

    def quantiles(self, n):
        """The exact law's (i - 1/2) / n quantiles per pixel, float64 (n, *pixel shape): W1 to the law is then
        mean |sorted samples - quantiles| (1-D optimal transport)."""
        lo = torch.minimum(self.mu1 - 8 * self.s1, self.mu2 - 8 * self.s2)
        hi = torch.maximum(self.mu1 + 8 * self.s1, self.mu2 + 8 * self.s2)
        probs = ((torch.arange(n, dtype=torch.float64) + 0.5) / n).view(-1, *([1] * self.mu1.dim()))
        for _ in range(60):  # bisection on the mixture CDF, all quantiles and pixels at once
            mid = (lo + hi) / 2
            below = self.cdf(mid) < probs
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return (lo + hi) / 2

    def cdf(self, x):
        phi = torch.special.ndtr
        return self.w * phi((x - self.mu1) / self.s1) + (1 - self.w) * phi((x - self.mu2) / self.s2)


def w1_to_law(samples, oracle):
    """Mean over pixels of the 1-D Wasserstein-1 distance between each pixel's samples and the exact law."""
    q = oracle.quantiles(samples.shape[0])
    return (samples.double().sort(dim=0).values - q).abs().mean().item()
