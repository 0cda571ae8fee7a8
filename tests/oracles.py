"""Exact answers for sampler tests: models whose predictions are the true score of known data, and the float64
recursions that give the exact output law of a sampler driven by them (see sampling/test_oracle.py)."""
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


def exact_moments(schedule, mu, s, sampler="ddpm", variance="fixed_small", eta=0.0, var_value=0.0):
    """Per-pixel mean and variance (float64) of the chain's output for the oracle: x_T ~ N(0, 1), and each step
    is x' = A x + B + sigma z with x0* = A0 x + B0 (the oracle's, whatever it predicts)."""
    r = schedule.numpy_tables()
    mu, s2 = mu.double().numpy(), s.double().numpy() ** 2
    m, v = np.zeros_like(mu), np.ones_like(mu)
    for i in reversed(range(schedule.num_steps)):
        ab, sra, srm1 = r["alphas_cumprod"][i], r["sqrt_recip_alphas_cumprod"][i], r["sqrt_recipm1_alphas_cumprod"][i]
        gain = math.sqrt(ab) * s2 / (ab * s2 + 1 - ab)
        A0, B0 = gain, mu - gain * math.sqrt(ab) * mu
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
