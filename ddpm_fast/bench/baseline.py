"""The plain PyTorch DDPM that ddpm_fast is measured against: what a user writes without ddpm_fast.

The same U-Net weights run with ``fused=False`` (nn.GroupNorm, then SiLU), eagerly, in a Python loop whose
posterior math is separate torch ops with ``torch.randn`` noise per step (improved-diffusion's formulas, tables
kept on the device), or diffusers' ``DDPMScheduler.step`` in its place. None of ddpm_fast's math is used here:
``PlainDiffusion`` derives its own tables from the betas, so tests can compare the two implementations
(tests/test_baseline.py checks both against the closed-form Gaussian oracle).

Also classifier-free guidance done the plain way (``plain_guided_sample``: the baseline of
benchmarks/bench_guidance.py) and the plain training step (q_sample as torch ops, eps-MSE, AdamW), the baseline of
benchmarks/bench_train.py.
"""
import contextlib
import inspect
from typing import Optional

import torch
import torch.nn.functional as F


class PlainDiffusion:
    """Coefficient tables of a DDPM chain, computed in float64 and kept as float32 tensors on ``device``.

    :param betas: (T,) training betas (any sequence of floats in (0, 1)).
    :param steps: sampling steps; fewer than T keeps the timesteps round(linspace(0, T-1, steps)) and
        recomputes beta_i = 1 - abar[t_i] / abar[t_{i-1}] (improved-diffusion's respacing).
    :param prediction: "eps" | "x0" | "v";  variance: "fixed_small" | "fixed_large" | "learned_range".
    """

    def __init__(self, betas, steps: Optional[int] = None, *, prediction="eps", variance="fixed_small",
                 clip=True, device="cpu"):
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        T = betas.numel()
        steps = T if steps is None else int(steps)
        if not 1 <= steps <= T:
            raise ValueError(f"steps must satisfy 1 <= steps <= T = {T}, got {steps}")
        if prediction not in ("eps", "x0", "v") or variance not in ("fixed_small", "fixed_large", "learned_range"):
            raise ValueError(f"unsupported prediction={prediction!r} or variance={variance!r}")
        self.prediction, self.variance, self.clip = prediction, variance, bool(clip)
        abar_full = torch.cumprod(1 - betas, 0)
        ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long() if steps < T else torch.arange(T)
        abar = abar_full[ts]
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        betas = 1 - abar / abar_prev
        post_var = betas * (1 - abar_prev) / (1 - abar)
        first = post_var[1] if steps > 1 else betas[0]  # log(0) at step 0: borrow step 1's value
        tables = {
            "sqrt_recip_abar": (1 / abar).sqrt(), "sqrt_recipm1_abar": (1 / abar - 1).sqrt(),
            "sqrt_abar": abar.sqrt(), "sqrt_1m_abar": (1 - abar).sqrt(),
            "coef1": betas * abar_prev.sqrt() / (1 - abar),
            "coef2": (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar),
            "log_var_small": torch.cat([first.view(1), post_var[1:]]).log(),
            "log_var_large": torch.cat([first.view(1), betas[1:]]).log(),
            "log_betas": betas.log(),
        }
        self.tables = {k: v.to(device=device, dtype=torch.float32) for k, v in tables.items()}
        self.timesteps = ts.tolist()  # original training timestep of each step index (Python ints)
        self.num_steps, self.device = steps, torch.device(device)

    @classmethod
    def for_model(cls, model, steps=None, device=None) -> "PlainDiffusion":
        """From a ddpm_fast UNet's DiffusionConfig (its betas; prediction, variance and clip as trained)."""
        cfg = model.diffusion
        if cfg is None:
            raise ValueError("PlainDiffusion.for_model: the model has no DiffusionConfig (model.diffusion)")
        device = device or _device_dtype(model)[0]
        return cls(cfg.make_schedule().betas, steps, prediction=cfg.prediction, variance=cfg.variance,
                   clip=cfg.clip, device=device)

    def _at(self, name, t):
        return self.tables[name][t].view(-1, 1, 1, 1)  # (N,) step indices -> (N, 1, 1, 1)

    def p_sample(self, model_output, x, t, noise):
        """One ancestral step. model_output: (N, C or 2C, H, W); x, noise: (N, C, H, W) fp32; t: (N,) step
        indices. Returns x_{t-1} (fp32); no noise where t == 0."""
        C = x.shape[1]
        out = model_output[:, :C].float()
        if self.prediction == "eps":
            x0 = self._at("sqrt_recip_abar", t) * x - self._at("sqrt_recipm1_abar", t) * out
        elif self.prediction == "v":
            x0 = self._at("sqrt_abar", t) * x - self._at("sqrt_1m_abar", t) * out
        else:
            x0 = out
        if self.clip:
            x0 = x0.clamp(-1, 1)
        mean = self._at("coef1", t) * x0 + self._at("coef2", t) * x
        if self.variance == "learned_range":
            frac = (model_output[:, C:].float() + 1) / 2
            log_var = frac * self._at("log_betas", t) + (1 - frac) * self._at("log_var_small", t)
        else:
            log_var = self._at("log_var_small" if self.variance == "fixed_small" else "log_var_large", t)
        nonzero = (t != 0).float().view(-1, 1, 1, 1)
        return mean + nonzero * torch.exp(0.5 * log_var) * noise


def _device_dtype(model):
    """The device and float dtype of a module's first parameter (or buffer); (cpu, float32) when it has none."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def _autocast(device, dtype):
    """bf16/fp16 models run under autocast (what a user writes); fp32 needs nothing."""
    if dtype in (None, torch.float32):
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


@torch.inference_mode()
def plain_sample(model, n, steps=None, *, diffusion: Optional[PlainDiffusion] = None, shape=None,
                 generator: Optional[torch.Generator] = None, scheduler=None, channels_last: bool = False):
    """Samples n images with the plain loop: (n, C, H, W) float32 on the model's device.

    :param model: ``model(x, t) -> output``, t an int64 (n,) tensor of ORIGINAL timesteps (a ddpm_fast UNet,
        typically built with fused=False). ``shape`` (C, H, W) defaults to the model's image shape.
    :param diffusion: the tables (default ``PlainDiffusion.for_model(model, steps)``).
    The model runs in its own parameter dtype (cast the model, e.g. ``.to(torch.bfloat16)``, as diffusers users
    do); x and the posterior math stay fp32.
    :param scheduler: None for the hand-written step, or a diffusers scheduler (DDPMScheduler, or that of another
        sampler; configured like the model, ``set_timesteps`` is called here) whose ``step`` replaces it.
    :param channels_last: feed the model channels_last input (for a model whose weights are channels_last).
    """
    device, dtype = _device_dtype(model)
    shape = tuple(shape or model.diffusion.image_shape)
    if scheduler is not None:
        scheduler.set_timesteps(steps or scheduler.config.num_train_timesteps, device=device)
        plan = [(None, int(t)) for t in scheduler.timesteps]
        # diffusers' step() takes generator= when it draws noise (DDPM, SDE solvers); UniPC's takes none
        extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    else:
        diffusion = diffusion or PlainDiffusion.for_model(model, steps, device)
        plan = [(i, diffusion.timesteps[i]) for i in reversed(range(diffusion.num_steps))]
    x = torch.randn((n, *shape), generator=generator, device=device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for i, timestep in plan:
        t = torch.full((n,), timestep, device=device, dtype=torch.long)
        out = model(x.to(dtype).contiguous(memory_format=fmt), t)
        if scheduler is not None:
            x = scheduler.step(out.float(), timestep, x, **extra).prev_sample
        else:
            noise = torch.randn(x.shape, generator=generator, device=device)
            x = diffusion.p_sample(out, x, torch.full((n,), i, device=device, dtype=torch.long), noise)
    return x


@torch.inference_mode()
def plain_guided_sample(model, n, steps, labels, guidance_scale, *, null_label, batched=True,
                        diffusion: Optional[PlainDiffusion] = None, shape=None,
                        generator: Optional[torch.Generator] = None):
    """Classifier-free guidance the plain way: per step the model on the labels and on the null label -- ONE call
    on both halves concatenated (``batched``, what a careful user writes) or two calls --, the combine
    eps_u + w (eps_c - eps_u) as torch ops (a learned variance from the conditional half), then the plain step
    with torch.randn noise. (n, C, H, W) float32.

    :param model: ``model(x, t, y)``, y an int64 (n,) (or (2n,)) tensor of labels, ``null_label`` = no class.
    :param labels: (n,) int64 labels on the model's device.
    """
    device, dtype = _device_dtype(model)
    shape = tuple(shape or model.diffusion.image_shape)
    diffusion = diffusion or PlainDiffusion.for_model(model, steps, device)
    null = torch.full_like(labels, null_label)
    both = torch.cat([labels, null])
    x = torch.randn((n, *shape), generator=generator, device=device)
    for i in reversed(range(diffusion.num_steps)):
        t = torch.full((n,), diffusion.timesteps[i], device=device, dtype=torch.long)
        if batched:
            cond, uncond = model(torch.cat([x, x]).to(dtype), torch.cat([t, t]), both).float().chunk(2)
        else:
            cond, uncond = model(x.to(dtype), t, labels).float(), model(x.to(dtype), t, null).float()
        C = x.shape[1]
        out = uncond[:, :C] + guidance_scale * (cond[:, :C] - uncond[:, :C])
        if diffusion.variance == "learned_range":
            out = torch.cat([out, cond[:, C:]], dim=1)
        noise = torch.randn(x.shape, generator=generator, device=device)
        x = diffusion.p_sample(out, x, torch.full((n,), i, device=device, dtype=torch.long), noise)
    return x


class CompiledStepSampler:
    """The strongest torch.compile baseline: the WHOLE reverse step (U-Net, posterior update and its torch.randn
    noise) is one compiled function. The per-step timestep and step index are tensors made once, so every step
    calls the same graph (no recompilation per step); the coefficient tables are indexed on the device.

    ``mode="reduce-overhead"`` adds CUDA graphs (cudagraph trees): each call is marked as a new step, and the
    chain feeds each output back as the next input (copied into the graph's static input before replay).
    Call ``sample(n)``; the first call compiles (its time is the benchmark's first-call time).
    """

    def __init__(self, model, steps, *, mode=None, diffusion: Optional[PlainDiffusion] = None, shape=None,
                 channels_last: bool = False):
        self.device, self.dtype = _device_dtype(model)
        self.model, self.mode = model, mode
        self.diffusion = diffusion or PlainDiffusion.for_model(model, steps, self.device)
        self.shape = tuple(shape or model.diffusion.image_shape)
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.step = torch.compile(self._step, mode=mode, dynamic=False)
        self._plans = {}

    def _step(self, x, t, i):
        out = self.model(x.to(self.dtype).contiguous(memory_format=self.fmt), t)
        return self.diffusion.p_sample(out, x, i, torch.randn_like(x))

    def _plan(self, n):
        """(timestep tensor, step-index tensor) per step, reverse order, made once per batch size."""
        if n not in self._plans:
            d, dev = self.diffusion, self.device
            self._plans[n] = [(torch.full((n,), d.timesteps[i], device=dev, dtype=torch.long),
                               torch.full((n,), i, device=dev, dtype=torch.long))
                              for i in reversed(range(d.num_steps))]
        return self._plans[n]

    @torch.inference_mode()
    def sample(self, n):
        x = torch.randn((n, *self.shape), device=self.device)
        for t, i in self._plan(n):
            if self.mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            x = self.step(x, t, i)
        return x.clone()


def plain_train_step(model, optimizer, x0, diffusion: PlainDiffusion, *, dtype=None, grad_clip: float = 0.0,
                     ema=None, ema_decay: float = 0.9999, generator: Optional[torch.Generator] = None,
                     ema_foreach: bool = False):
    """One eager training step: random timesteps, q_sample as torch ops, eps-MSE, backward, optional grad-norm
    clip, optimizer step, optional EMA update: a Python loop over tensors as improved-diffusion's update_ema, or
    with ``ema_foreach`` one torch._foreach_lerp_ (what a user who knows PyTorch writes; ddpm_fast's EMA is
    foreach too). The optimizer is the caller's (the benchmark gives the strong baseline fused AdamW).

    x0: (N, C, H, W) fp32 data in [-1, 1]; ``diffusion`` must be the un-respaced chain (steps = T).
    dtype: bf16/fp16 run the model under autocast (fp32 weights). ema: a list of tensors like the parameters.
    Returns the loss (a 0-dim tensor, not synchronised).
    """
    n = x0.shape[0]
    t = torch.randint(0, diffusion.num_steps, (n,), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, generator=generator)
    x_t = diffusion._at("sqrt_abar", t) * x0 + diffusion._at("sqrt_1m_abar", t) * noise
    with _autocast(x0.device, dtype):
        out = model(x_t, t)
    loss = F.mse_loss(out.float(), noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if ema is not None:
        with torch.no_grad():
            if ema_foreach:
                torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - ema_decay)
            else:
                for e, p in zip(ema, model.parameters()):
                    e.mul_(ema_decay).add_(p.detach(), alpha=1 - ema_decay)
    return loss.detach()
