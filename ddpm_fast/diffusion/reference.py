"""The reference diffusion math in plain PyTorch: the specification every fused op is tested against.

Index convention, stated once: every ``t`` below is a STEP INDEX into the (possibly respaced) schedule, an int64
tensor of shape (N,) with values in [0, schedule.num_steps). The model is called with the ORIGINAL training
timestep ``schedule.timesteps[t]``; the math here never needs it. Without respacing the two coincide.

``schedule`` may be a ``NoiseSchedule`` or the ``ScheduleTables`` it hands out for x's device. Math runs in
float32 (float64 when x is float64, with float64 tables); results come back in x's dtype.
Model outputs follow improved-diffusion: C channels, or 2C for ``variance="learned_range"`` (the second half is
the interpolation value v in [-1, 1] between log posterior variance and log beta).
"""
import math

import torch

from .config import PREDICTIONS, VARIANCES, check_choice
from .schedule import ScheduleTables


# ---- helpers ---------------------------------------------------------------------------------------------

def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _tables(schedule, x) -> ScheduleTables:
    if isinstance(schedule, ScheduleTables):
        return schedule
    return schedule.tables(x.device, _compute_dtype(x))


def extract(schedule, name, t, x):
    """Row ``name`` of the tables at step indices t, shaped (N, 1, ..., 1) to broadcast against x."""
    row = getattr(_tables(schedule, x), name).to(_compute_dtype(x))
    return row[t].view(-1, *([1] * (x.dim() - 1)))


def mean_flat(x):
    """Mean over all non-batch dimensions: (N, ...) -> (N,)."""
    return x.mean(dim=tuple(range(1, x.dim())))


def _f(x, like):
    return x.to(_compute_dtype(like))


# ---- forward process --------------------------------------------------------------------------------------

def q_sample(schedule, x_start, t, noise):
    """Sample q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).

    :param x_start: the [N x C x ...] tensor of clean data.
    :param t: step indices, int64 (N,).
    :param noise: the Gaussian noise eps, like x_start.
    :return: x_t, like x_start.
    """
    x = _f(x_start, x_start)
    out = extract(schedule, "sqrt_alphas_cumprod", t, x) * x + \
        extract(schedule, "sqrt_one_minus_alphas_cumprod", t, x) * _f(noise, x)
    return out.to(x_start.dtype)


def v_target(schedule, x_start, t, noise):
    """The v-prediction target v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022)."""
    x = _f(x_start, x_start)
    return extract(schedule, "sqrt_alphas_cumprod", t, x) * _f(noise, x) - \
        extract(schedule, "sqrt_one_minus_alphas_cumprod", t, x) * x


def q_posterior_mean_variance(schedule, x_start, x_t, t):
    """The posterior q(x_{t-1} | x_t, x_0) of the chain (eq. 6-7 of Ho et al.).

    :return: (mean, variance, log_variance_clipped); the variances are (N, 1, ...) broadcastable.
    """
    x0, xt = _f(x_start, x_t), _f(x_t, x_t)
    mean = extract(schedule, "posterior_mean_coef1", t, xt) * x0 + \
        extract(schedule, "posterior_mean_coef2", t, xt) * xt
    return (mean, extract(schedule, "posterior_variance", t, xt),
            extract(schedule, "posterior_log_variance_clipped", t, xt))


def predict_x0(schedule, x_t, t, model_output, prediction):
    """x_0 implied by a model output of kind ``prediction`` ("eps", "x0" or "v"); model_output has C channels."""
    xt, out = _f(x_t, x_t), _f(model_output, x_t)
    if prediction == "eps":
        return extract(schedule, "sqrt_recip_alphas_cumprod", t, xt) * xt - \
            extract(schedule, "sqrt_recipm1_alphas_cumprod", t, xt) * out
    if prediction == "x0":
        return out
    if prediction == "v":
        return extract(schedule, "sqrt_alphas_cumprod", t, xt) * xt - \
            extract(schedule, "sqrt_one_minus_alphas_cumprod", t, xt) * out
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def predict_eps_from_x0(schedule, x_t, t, x0):
    """eps = (x_t / sqrt(abar) - x_0) / sqrt(1 / abar - 1): the noise that takes x_0 to x_t."""
    xt = _f(x_t, x_t)
    return (extract(schedule, "sqrt_recip_alphas_cumprod", t, xt) * xt - _f(x0, xt)) / \
        extract(schedule, "sqrt_recipm1_alphas_cumprod", t, xt)


def split_model_output(model_output, x_t, variance):
    """(C-channel prediction, variance values or None). learned_range needs 2C channels, the others C."""
    check_choice("variance", variance, VARIANCES)
    C = x_t.shape[1]
    want = 2 * C if variance == "learned_range" else C
    if model_output.dim() != x_t.dim() or model_output.shape[1] != want or \
            model_output.shape[2:] != x_t.shape[2:] or model_output.shape[0] != x_t.shape[0]:
        raise ValueError(f"model_output must have shape {(x_t.shape[0], want, *x_t.shape[2:])} for "
                         f"variance={variance!r} and x_t {tuple(x_t.shape)}, got {tuple(model_output.shape)}")
    if variance == "learned_range":
        return model_output[:, :C], model_output[:, C:]
    return model_output, None


def guided_model_output(model_output, x_t, variance, guidance_scale):
    """Classifier-free guidance (Ho & Salimans 2022) on one batch of 2N model outputs at the N samples x_t:
    rows 0..N-1 are the conditional outputs c, rows N..2N-1 the unconditional ones u (the null label), both at
    x_t. Returns the N-row output a step uses, in the compute dtype: the prediction half u + w (c - u), and for
    variance="learned_range" the variance half of c (unguided). w = 1 gives c and w = 0 gives u exactly (this w
    is the paper's w + 1: the paper writes (1 + w) c - w u).

    The combine acts on the model output before it becomes the data prediction. Whatever the model predicts
    (eps, x0 or v), the data prediction is affine in that output with a coefficient of x_t that does not depend
    on it, so guiding eps, x0 or v gives the same x0 = x0_u + w (x0_c - x0_u).

    :param model_output: (2N, C, ...) or (2N, 2C, ...) for learned_range.
    :param guidance_scale: w, a float or a one-element tensor.
    """
    n = x_t.shape[0]
    want = (2 * n, 2 * x_t.shape[1] if variance == "learned_range" else x_t.shape[1], *x_t.shape[2:])
    if tuple(model_output.shape) != want:
        raise ValueError(f"a guided model_output must have shape {want} (the conditional outputs of the {n} "
                         f"samples, then their unconditional ones) for variance={variance!r} and x_t "
                         f"{tuple(x_t.shape)}, got {tuple(model_output.shape)}")
    w = float(guidance_scale)
    out = _f(model_output, x_t)
    cond, uncond = out[:n], out[n:]
    mean, _ = split_model_output(cond, x_t, variance)
    if w == 0:
        mean = split_model_output(uncond, x_t, variance)[0]
    elif w != 1:
        mean = uncond[:, :x_t.shape[1]] + w * (mean - uncond[:, :x_t.shape[1]])
    return torch.cat([mean, cond[:, x_t.shape[1]:]], dim=1) if variance == "learned_range" else mean


# ---- reverse process --------------------------------------------------------------------------------------

def p_mean_variance(schedule, model_output, x_t, t, *, prediction="eps", variance="fixed_small", clip=True):
    """p(x_{t-1} | x_t): mean from the predicted x_0 (optionally clipped to [-1, 1]) and the model variance.

    :return: dict with "mean" (like x_t, compute dtype), "variance" and "log_variance" (broadcastable to x_t),
             "pred_x0".
    """
    out, var_values = split_model_output(model_output, x_t, variance)
    pred_x0 = predict_x0(schedule, x_t, t, out, prediction)
    if clip:
        pred_x0 = pred_x0.clamp(-1, 1)
    mean, _, _ = q_posterior_mean_variance(schedule, pred_x0, x_t, t)
    if variance == "fixed_small":
        log_variance = extract(schedule, "posterior_log_variance_clipped", t, mean)
    elif variance == "fixed_large":
        log_variance = extract(schedule, "fixed_large_log_variance", t, mean)
    else:
        # v in [-1, 1] interpolates the log variance between the posterior's and beta's (improved-diffusion).
        min_log = extract(schedule, "posterior_log_variance_clipped", t, mean)
        max_log = extract(schedule, "log_betas", t, mean)
        frac = (_f(var_values, mean) + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
    return {"mean": mean, "variance": torch.exp(log_variance), "log_variance": log_variance, "pred_x0": pred_x0}


def _nonzero_mask(t, x):
    # no noise when t == 0
    return (t != 0).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def ddpm_step(schedule, model_output, x_t, t, noise, *, prediction="eps", variance="fixed_small", clip=True):
    """One ancestral DDPM step: x_{t-1} = mean + [t != 0] sigma_t z.

    :param model_output: [N x C x ...] (or 2C for learned_range) network output at (x_t, timesteps[t]).
    :param noise: z ~ N(0, I) like x_t (ignored where t == 0).
    :return: x_{t-1} in x_t's dtype.
    """
    out = p_mean_variance(schedule, model_output, x_t, t, prediction=prediction, variance=variance, clip=clip)
    mean = out["mean"]
    sample = mean + _nonzero_mask(t, mean) * torch.exp(0.5 * out["log_variance"]) * _f(noise, mean)
    return sample.to(x_t.dtype)


def ddim_step(schedule, model_output, x_t, t, noise=None, *, prediction="eps", variance="fixed_small", clip=True,
              eta=0.0):
    """One DDIM step (Song et al. 2021, eq. 12 and 16), eta >= 0 (eta = 1: DDPM's posterior variance).

    eps is re-derived from the (clipped) predicted x_0, as improved-diffusion does (diffusers:
    ``use_clipped_model_output=True``). A learned variance is ignored. The previous abar at step 0 is 1.
    sqrt(1 - abar_prev - sigma^2) is clamped at 0 (only reachable with eta > 1).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    out = p_mean_variance(schedule, model_output, x_t, t, prediction=prediction, variance=variance, clip=clip)
    x0 = out["pred_x0"]
    eps = predict_eps_from_x0(schedule, x_t, t, x0)
    abar_prev = extract(schedule, "alphas_cumprod_prev", t, x0)
    one_minus_prev = extract(schedule, "one_minus_alphas_cumprod_prev", t, x0)
    # eq. 16: sigma^2 = eta^2 (1 - abar_prev) / (1 - abar) (1 - abar / abar_prev), which is eta^2 times the
    # chain's posterior variance (its beta is 1 - abar / abar_prev); the table avoids fp32 cancellation.
    sigma = eta * torch.sqrt(extract(schedule, "posterior_variance", t, x0))
    sample = torch.sqrt(abar_prev) * x0 + torch.sqrt((one_minus_prev - sigma ** 2).clamp(min=0)) * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        sample = sample + _nonzero_mask(t, x0) * sigma * _f(noise, x0)
    return sample.to(x_t.dtype)


# ---- losses -----------------------------------------------------------------------------------------------

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """A fast approximation of the standard normal CDF (the tanh form used by improved-diffusion)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log-likelihood of data in [-1, 1] quantised to 256 bins under N(means, exp(log_scales)^2), elementwise.

    The edge bins extend to -inf / +inf so the 256 probabilities sum to 1.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vb_terms_bpd(schedule, model_output, x_start, x_t, t, *, prediction="eps", variance="learned_range",
                 clip=False):
    """The VLB term L_t in bits per dimension, (N,): KL(q posterior || p) for t > 0, decoder NLL at t == 0."""
    x0 = _f(x_start, x_t)
    true_mean, _, true_log_var = q_posterior_mean_variance(schedule, x0, x_t, t)
    out = p_mean_variance(schedule, model_output, x_t, t, prediction=prediction, variance=variance, clip=clip)
    kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
    return torch.where(t == 0, mean_flat(nll) / math.log(2.0), kl)


def min_snr_weight(schedule, t, gamma, prediction, like):
    """Min-SNR-gamma loss weights (Hang et al. 2023), (N,): min(snr, gamma) divided by the SNR factor already
    in the target's MSE (snr for eps, 1 for x0, snr + 1 for v)."""
    snr = extract(schedule, "snr", t, like).view(-1)
    clipped = snr.clamp(max=gamma)
    return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[prediction]


def training_losses(schedule, model_output, x_start, x_t, t, noise, *, prediction="eps", variance="fixed_small",
                    min_snr_gamma=None):
    """Per-sample training losses for a model output at (x_t = q_sample(x_start, t, noise), timesteps[t]).

    :return: dict of (N,) float tensors: "mse" (the simple loss on the prediction target, min-SNR weighted when
             ``min_snr_gamma`` is set), "vb" (learned_range only: the VLB term with the mean's gradient stopped,
             scaled by num_steps / 1000 as improved-diffusion's rescaled MSE), and "loss" = mse (+ vb).
    """
    check_choice("prediction", prediction, PREDICTIONS)
    out, var_values = split_model_output(model_output, x_t, variance)
    target = {"eps": lambda: noise, "x0": lambda: x_start,
              "v": lambda: v_target(schedule, x_start, t, noise)}[prediction]()
    cdt = torch.float64 if out.dtype == torch.float64 else torch.float32
    mse = mean_flat((target.to(cdt) - out.to(cdt)) ** 2)
    if min_snr_gamma is not None:
        mse = mse * min_snr_weight(schedule, t, min_snr_gamma, prediction, out.to(cdt))
    terms = {"mse": mse, "loss": mse}
    if variance == "learned_range":
        # The VLB trains only the variance: the mean gets its gradient from the MSE alone.
        frozen = torch.cat([out.detach(), var_values], dim=1)
        vb = vb_terms_bpd(schedule, frozen, x_start, x_t, t, prediction=prediction, variance=variance)
        terms["vb"] = vb * (_tables(schedule, out.to(cdt)).num_steps / 1000.0)
        terms["loss"] = mse + terms["vb"]
    return terms
