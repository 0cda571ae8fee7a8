"""Noise schedules: beta schedules, respacing, and the coefficient tables every sampler step reads.

Index convention (used by diffusion.py and the fused ops): a schedule has ``num_steps`` STEP INDICES
``i = 0 .. num_steps-1``; ``schedule.timesteps[i]`` is the ORIGINAL training timestep (0 .. T-1) of step ``i``,
ascending. Every table is indexed by step index; the model is always called with ``timesteps[i]``.
An un-respaced schedule has ``timesteps == arange(T)``, so step index and timestep coincide.

All tables are computed once in float64 (NumPy) and handed out as device tensors, cached per device, so a
sampling loop never copies coefficients from the host (no host syncs; the loop is CUDA-graph capturable).
"""
import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from . import solvers

SPACINGS = ("linspace", "leading", "trailing", "logsnr")

# Rows of ScheduleTables.packed (float, shape (len(ROWS), num_steps)). Fused kernels take the packed table as
# one pointer and read row r of step i at ``r * num_steps + i``; the row numbers are part of their contract.
ROWS = (
    "betas",                            # beta_i of the (respaced) chain: 1 - abar_i / abar_{i-1}
    "alphas_cumprod",                   # abar_i
    "alphas_cumprod_prev",              # abar_{i-1}, 1.0 at i = 0
    "one_minus_alphas_cumprod_prev",    # 1 - abar_{i-1} from float64 (no fp32 cancellation near abar ~ 1)
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_alphas_cumprod_prev",
    "sqrt_recip_alphas_cumprod",        # 1 / sqrt(abar)
    "sqrt_recipm1_alphas_cumprod",      # sqrt(1 / abar - 1)
    "posterior_variance",               # beta_i (1 - abar_{i-1}) / (1 - abar_i); 0 at i = 0
    "posterior_log_variance_clipped",   # log posterior_variance, entry 0 replaced by entry 1 (log 0 is -inf)
    "posterior_std",                    # exp(0.5 * posterior_log_variance_clipped): the fixed_small sigma
    "posterior_mean_coef1",             # coefficient of x0 in the posterior mean
    "posterior_mean_coef2",             # coefficient of x_t in the posterior mean
    "log_betas",                        # the upper end of learned_range's interpolation
    "fixed_large_log_variance",         # log(append(posterior_variance[1], betas[1:])) (improved-diffusion)
    "fixed_large_std",                  # exp(0.5 * fixed_large_log_variance)
    "snr",                              # abar / (1 - abar), for min-SNR-gamma loss weights
)
ROW = {name: i for i, name in enumerate(ROWS)}


@dataclass(frozen=True)
class ScheduleTables:
    """The coefficients of one schedule on one device, indexed by step index. Every row is a view of ``packed``.

    packed: (len(ROWS), num_steps) float32 (or float64 on request), contiguous.
    timesteps: (num_steps,) int64, the original training timestep of each step index.
    """
    packed: torch.Tensor
    timesteps: torch.Tensor

    def __getattr__(self, name):
        # Only reached for names that are not fields: the table rows.
        if name in ROW:
            return self.packed[ROW[name]]
        raise AttributeError(f"ScheduleTables has no table {name!r}; rows are {ROWS}")

    @property
    def device(self):
        return self.packed.device

    @property
    def num_steps(self):
        return self.packed.shape[1]


def _linspace_timesteps(T, steps):
    return np.linspace(0, T - 1, steps).round().astype(np.int64)


def logsnr_timesteps(alphas_cumprod, steps):
    """Integer timesteps uniform in lambda = log(alpha / sigma) = 0.5 log(abar / (1 - abar)), ascending.

    ``steps`` targets linspace(lambda(T-1), lambda(0), steps) (both ends kept), each mapped to the timestep
    whose lambda it equals (linear between integer neighbours, as diffusers' ``_sigma_to_t``), rounded, and
    duplicates removed: near t = 0 a lambda step can be shorter than one timestep, so neighbours merge and the
    chain has FEWER than ``steps`` steps (never a zero-length one). The chain then uses the alphas of these
    integer timesteps.
    """
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    lam = 0.5 * (np.log(abar) - np.log1p(-abar))  # strictly decreasing in t
    targets = np.linspace(lam[-1], lam[0], steps)
    t = np.interp(targets, lam[::-1], np.arange(abar.size, dtype=np.float64)[::-1])
    return np.unique(np.round(t).astype(np.int64))


def spaced_timesteps(T, steps, spacing="linspace", offset=0, alphas_cumprod=None):
    """The original timesteps kept when sampling with ``steps`` of the ``T`` training steps, ascending.

    Same rule as diffusers' ``set_timesteps`` with ``timestep_spacing=spacing`` and ``steps_offset=0``:
      linspace: round(linspace(0, T-1, steps));  leading: arange(steps) * (T // steps);
      trailing: round(T - k * T/steps) - 1 for k < steps. (diffusers writes this as
      round(arange(T, 0, -T/steps)) - 1, which floating point sometimes stretches to steps+1 values ending in
      timestep -1, e.g. T=1000, steps=13; we keep the first ``steps``: the same values whenever diffusers' are valid.)
    offset: added to the "leading" timesteps (diffusers' ``steps_offset``, which diffusers applies to "leading"
      only; other spacings require 0).
      logsnr: uniform in log-SNR of ``alphas_cumprod`` (the training schedule's, required), see
      ``logsnr_timesteps``: possibly fewer than ``steps`` values.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise ValueError(f"steps must be an int, got {steps!r}")
    if not 1 <= steps <= T:
        raise ValueError(f"steps must satisfy 1 <= steps <= T = {T}, got {steps}")
    if spacing == "linspace":
        ts = _linspace_timesteps(T, steps)
    elif spacing == "leading":
        ts = np.arange(steps, dtype=np.int64) * (T // steps) + _check_offset(offset, T, steps)
    elif spacing == "trailing":
        ts = np.round(T - np.arange(steps) * (T / steps)).astype(np.int64)[::-1] - 1
    elif spacing == "logsnr":
        if alphas_cumprod is None or len(alphas_cumprod) != T:
            raise ValueError("spacing='logsnr' needs the training schedule's alphas_cumprod (T values)")
        ts = logsnr_timesteps(alphas_cumprod, steps)
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if offset and spacing != "leading":
        raise ValueError(f"offset={offset} applies to spacing='leading' only (as diffusers' steps_offset)")
    return np.ascontiguousarray(ts)


def _check_offset(offset, T, steps):
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
        raise ValueError(f"offset must be an int >= 0, got {offset!r}")
    if (steps - 1) * (T // steps) + offset >= T:
        raise ValueError(f"offset={offset} moves the last 'leading' timestep of {steps} steps past T - 1 = {T - 1}")
    return int(offset)


# diffusers' beta_schedule names -> NoiseSchedule constructors (the same betas, computed in float64)
DIFFUSERS_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine", "scaled_linear": "scaled_linear",
                       "sigmoid": "sigmoid"}


def diffusers_config(scheduler):
    """({field: value}, class name or None) of a diffusers scheduler, its ``.config``, or a config dict (e.g. a
    parsed scheduler_config.json); keys starting with "_" dropped. No diffusers import needed."""
    cfg = getattr(scheduler, "config", scheduler)
    try:
        given = dict(cfg)
    except (TypeError, ValueError):
        raise TypeError(f"expected a diffusers scheduler or its config (a mapping), got "
                        f"{type(scheduler).__name__}") from None
    name = given.get("_class_name") or (type(scheduler).__name__ if hasattr(scheduler, "config") else None)
    return {k: v for k, v in given.items() if not k.startswith("_")}, name


def _explicit_timesteps(timesteps, T):
    """A user's list of original timesteps -> ascending int64 array, checked: integers in [0, T), strictly
    monotone (either direction, e.g. diffusers' ``scheduler.timesteps``), at least one."""
    if isinstance(timesteps, torch.Tensor):
        timesteps = timesteps.detach().cpu().tolist()
    try:
        arr = np.asarray(timesteps)
    except (TypeError, ValueError) as err:
        raise ValueError(f"timesteps must be a 1-D sequence of ints: {err}") from None
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D sequence of ints, got shape {arr.shape}")
    if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(arr == np.round(arr))):
        raise ValueError(f"timesteps must be integers (original training timesteps), got {arr[:4].tolist()}")
    arr = arr.astype(np.int64)
    if arr.min() < 0 or arr.max() >= T:
        raise ValueError(f"timesteps must lie in [0, T) = [0, {T}), got values from {arr.min()} to {arr.max()}")
    d = np.diff(arr)
    if arr.size > 1 and not (np.all(d > 0) or np.all(d < 0)):
        raise ValueError("timesteps must be strictly increasing or strictly decreasing (no repeats)")
    return np.ascontiguousarray(np.sort(arr))


def _cosine_alpha_bar(t, s):
    return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def _as_betas(betas):
    if isinstance(betas, torch.Tensor):
        betas = betas.detach().cpu().double().numpy()
    try:
        arr = np.array(betas, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"betas must be a 1-D sequence of floats: {err}") from None
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("betas must be finite (found NaN or inf)")
    if not np.all((arr > 0) & (arr < 1)):
        bad = arr[(arr <= 0) | (arr >= 1)]
        raise ValueError(f"betas must lie in the open interval (0, 1); found {bad[:4].tolist()}")
    return arr


class NoiseSchedule:
    """A DDPM forward process: betas over T training steps, optionally respaced to fewer sampling steps.

    Build with ``NoiseSchedule.linear / cosine / sigmoid / scaled_linear`` or ``NoiseSchedule(betas=...)``;
    ``respace(steps, spacing)`` gives the chain over a subset of timesteps. Equal schedules (same T, betas and
    timesteps) compare and hash equal (``key``), so caches can key on them. ``to_dict()/from_dict()`` serialise.
    """

    def __init__(self, betas, *, _timesteps=None, _base=None, _spec=None):
        self._betas = _as_betas(betas)
        self._base = _base if _base is not None else self
        self._spec = _spec if _spec is not None else {"kind": "custom", "betas": self._betas.tolist()}
        n = self._betas.size
        ts = np.arange(n, dtype=np.int64) if _timesteps is None else np.asarray(_timesteps, dtype=np.int64)
        if ts.shape != (n,) or np.any(np.diff(ts) <= 0) or ts[0] < 0 or ts[-1] >= self.T:
            raise ValueError("timesteps must be strictly increasing, one per beta, within [0, T)")
        self._timesteps = ts
        self._alphas_cumprod = np.cumprod(1.0 - self._betas)
        abar = np.concatenate([[1.0], self._alphas_cumprod])
        if np.any(np.diff(abar) >= 0) or abar[-1] <= 0:
            raise ValueError("alphas_cumprod must be strictly decreasing and positive: betas too close to 0 or 1")
        self._tables = {}
        self._key = (self.T, hashlib.sha1(self._betas.tobytes() + ts.tobytes()).hexdigest())

    # ---- constructors -------------------------------------------------------------------------------------
    @classmethod
    def linear(cls, T=1000, beta_start=1e-4, beta_end=0.02):
        """DDPM (Ho et al. 2020): betas = linspace(beta_start, beta_end, T), not rescaled with T."""
        cls._check_T(T)
        return cls(np.linspace(beta_start, beta_end, T, dtype=np.float64),
                   _spec={"kind": "linear", "T": T, "beta_start": beta_start, "beta_end": beta_end})

    @classmethod
    def scaled_linear(cls, T=1000, beta_start=0.00085, beta_end=0.012):
        """diffusers' "scaled_linear" (latent diffusion): betas = linspace(sqrt(start), sqrt(end), T) ** 2."""
        cls._check_T(T)
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
        return cls(betas, _spec={"kind": "scaled_linear", "T": T, "beta_start": beta_start, "beta_end": beta_end})

    @classmethod
    def cosine(cls, T=1000, s=0.008, max_beta=0.999):
        """Nichol & Dhariwal 2021 (diffusers' "squaredcos_cap_v2"):
        beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta), abar(t) = cos((t + s) / (1 + s) * pi / 2) ** 2."""
        cls._check_T(T)
        betas = [min(1 - _cosine_alpha_bar((i + 1) / T, s) / _cosine_alpha_bar(i / T, s), max_beta)
                 for i in range(T)]
        return cls(betas, _spec={"kind": "cosine", "T": T, "s": s, "max_beta": max_beta})

    @classmethod
    def sigmoid(cls, T=1000, beta_start=1e-4, beta_end=0.02, start=-6.0, end=6.0):
        """diffusers' "sigmoid" (GeoDiff): betas = sigmoid(linspace(start, end, T)) * (end - start) + start."""
        cls._check_T(T)
        sig = 1.0 / (1.0 + np.exp(-np.linspace(start, end, T, dtype=np.float64)))
        return cls(sig * (beta_end - beta_start) + beta_start,
                   _spec={"kind": "sigmoid", "T": T, "beta_start": beta_start, "beta_end": beta_end,
                          "start": start, "end": end})

    @classmethod
    def from_diffusers(cls, scheduler):
        """The training schedule (betas over num_train_timesteps) of a diffusers scheduler (DDPMScheduler,
        DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler, ...), its config or a config dict:
        beta_schedule linear / squaredcos_cap_v2 / scaled_linear / sigmoid with beta_start / beta_end, or
        trained_betas. rescale_betas_zero_snr is refused (its last beta is 1, which a DDPM chain cannot use)."""
        c, _ = diffusers_config(scheduler)
        if c.get("rescale_betas_zero_snr"):
            raise ValueError("unsupported diffusers scheduler config: rescale_betas_zero_snr=True (ddpm_fast "
                             "supports False)")
        if c.get("trained_betas") is not None:
            return cls(betas=c["trained_betas"])
        name = c.get("beta_schedule", "linear")
        if name not in DIFFUSERS_SCHEDULES:
            raise ValueError(f"unsupported diffusers scheduler config: beta_schedule={name!r} (ddpm_fast supports "
                             f"{sorted(DIFFUSERS_SCHEDULES)} and trained_betas)")
        T = int(c.get("num_train_timesteps", 1000))
        if DIFFUSERS_SCHEDULES[name] == "cosine":
            return cls.cosine(T)
        return getattr(cls, DIFFUSERS_SCHEDULES[name])(T, beta_start=float(c.get("beta_start", 1e-4)),
                                                       beta_end=float(c.get("beta_end", 0.02)))

    @staticmethod
    def _check_T(T):
        if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
            raise ValueError(f"T (the number of training steps) must be an int >= 1, got {T!r}")

    # ---- respacing ----------------------------------------------------------------------------------------
    def respace(self, steps=None, spacing="linspace", offset=0, *, timesteps=None):
        """The chain over ``steps`` of the T training timesteps (rule: ``spaced_timesteps``; ``offset``: diffusers'
        steps_offset, "leading" spacing only), or over the given original ``timesteps`` (any strictly increasing
        or decreasing list in [0, T), e.g. another scheduler's ``timesteps``, to reproduce its grid exactly;
        ``steps``, ``spacing`` and ``offset`` are then not used).

        improved-diffusion's construction: keep abar at the kept timesteps and recompute
        beta_i = 1 - abar[t_i] / abar[t_{i-1}] (abar[t_{-1}] = 1), so the respaced chain is itself a DDPM.
        Always starts from the full training schedule, also when called on a respaced one.
        """
        base = self._base
        if timesteps is not None:
            if steps is not None and steps != len(timesteps):
                raise ValueError(f"steps={steps} but {len(timesteps)} timesteps were given: give one of them")
            if offset:
                raise ValueError("offset applies to a spacing rule, not to explicit timesteps")
            ts = _explicit_timesteps(timesteps, base.T)
            how = {"timesteps": ts.tolist()}
        else:
            if steps is None:
                raise ValueError("respace needs steps (with a spacing) or timesteps=[...]")
            ts = spaced_timesteps(base.T, steps, spacing, offset, base._alphas_cumprod)
            how = {"steps": int(steps), "spacing": spacing, **({"offset": int(offset)} if offset else {})}
        if ts.size == base.T:
            return base  # every timestep kept: the training chain itself
        abar = base._alphas_cumprod[ts]
        betas = 1.0 - abar / np.concatenate([[1.0], abar[:-1]])
        spec = dict(base._spec, respace=how)
        return NoiseSchedule(betas, _timesteps=ts, _base=base, _spec=spec)

    # ---- properties ---------------------------------------------------------------------------------------
    @property
    def T(self):
        """The number of training timesteps (of the un-respaced schedule)."""
        return self._base._betas.size

    @property
    def num_steps(self):
        """The number of steps of this chain (T unless respaced)."""
        return self._betas.size

    def __len__(self):
        return self.num_steps

    @property
    def timesteps(self):
        """(num_steps,) int64 CPU tensor: the original training timestep of each step index, ascending."""
        return torch.from_numpy(self._timesteps.copy())

    @property
    def betas(self):
        """(num_steps,) float64 NumPy copy of this chain's betas."""
        return self._betas.copy()

    @property
    def alphas_cumprod(self):
        """(num_steps,) float64 NumPy copy of abar at each step index."""
        return self._alphas_cumprod.copy()

    @property
    def is_respaced(self):
        return self._base is not self

    @property
    def key(self):
        """A hashable identity: (T, digest of betas and timesteps)."""
        return self._key

    def __eq__(self, other):
        return isinstance(other, NoiseSchedule) and self._key == other._key

    def __hash__(self):
        return hash(self._key)

    def __repr__(self):
        spec = {k: v for k, v in self._spec.items() if k not in ("betas", "respace")}
        text = ", ".join(f"{k}={v}" for k, v in spec.items())
        if self.is_respaced:
            text += f", steps={self.num_steps} ({self._spec['respace'].get('spacing', 'given timesteps')})"
        return f"NoiseSchedule({text})"

    # ---- tables -------------------------------------------------------------------------------------------
    def numpy_tables(self):
        """dict row name -> (num_steps,) float64 NumPy array (see ROWS for the definitions)."""
        return _compute_rows(self._betas)

    def tables(self, device="cpu", dtype=torch.float32):
        """ScheduleTables on ``device`` in ``dtype`` (float32 for the kernels; float64 for exact references).

        Cached per (device, dtype): call once before capturing a CUDA graph (the first call copies to the device).
        """
        try:  # fast path: the exact argument seen before (a per-step call in a sampling loop)
            hit = self._tables.get((device, dtype))
        except TypeError:  # unhashable device argument: let torch.device() report it
            hit = None
        if hit is not None:
            return hit
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"tables dtype must be torch.float32 or torch.float64, got {dtype}")
        key = (str(dev), dtype)
        if key not in self._tables:
            rows = self.numpy_tables()
            packed = torch.from_numpy(np.stack([rows[name] for name in ROWS])).to(dtype)
            self._tables[key] = ScheduleTables(packed=packed.to(dev).contiguous(),
                                               timesteps=self.timesteps.to(dev))
        if dev.type == "cpu" or torch.device(device).index is not None:  # "cuda" alone follows current_device
            self._tables[(device, dtype)] = self._tables[key]
        return self._tables[key]

    def solver_tables(self, sampler, device="cpu", dtype=torch.float32):
        """SolverTables of a few-step solver (diffusion/solvers.py) on ``device``: its per-step coefficients,
        computed once in float64 from this chain's alphas_cumprod and cached per (sampler, device, dtype)."""
        solvers.check_solver(sampler)
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"tables dtype must be torch.float32 or torch.float64, got {dtype}")
        key = ("solver", sampler, str(dev), dtype)
        hit = self._tables.get(key)
        if hit is None:
            rows = solvers.solver_rows(self._alphas_cumprod, sampler)
            packed = torch.from_numpy(np.stack([rows[name] for name in solvers.ROWS])).to(dtype)
            hit = self._tables[key] = solvers.SolverTables(packed=packed.to(dev).contiguous(), sampler=sampler)
        return hit

    # ---- serialisation ------------------------------------------------------------------------------------
    def to_dict(self):
        """A JSON-serialisable description from which ``from_dict`` rebuilds an equal schedule."""
        return {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
                for k, v in self._spec.items()}

    @classmethod
    def from_dict(cls, d):
        """Inverse of ``to_dict``."""
        d = dict(d)
        kind = d.pop("kind", None)
        respace = d.pop("respace", None)
        if kind == "custom":
            if "betas" not in d:
                raise ValueError("a custom schedule's dict needs 'betas'")
            sched = cls(d.pop("betas"))
        elif kind in ("linear", "scaled_linear", "cosine", "sigmoid"):
            try:
                sched = getattr(cls, kind)(**d)
            except TypeError as err:
                raise ValueError(f"bad parameters for a {kind} schedule: {err}") from None
        else:
            raise ValueError(f"unknown schedule kind {kind!r}: expected custom, linear, scaled_linear, "
                             "cosine or sigmoid")
        if respace is not None:
            if "timesteps" in respace:
                return sched.respace(timesteps=respace["timesteps"])
            sched = sched.respace(respace["steps"], respace.get("spacing", "linspace"), respace.get("offset", 0))
        return sched


def _compute_rows(betas):
    """Every table row in float64 from a chain's betas (improved-diffusion's definitions)."""
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    # Step 0 never adds noise; its variance only enters the VLB's decoder term, so borrow step 1's (or beta_0
    # for a 1-step chain) instead of log(0).
    first = post_var[1] if betas.size > 1 else betas[0]
    post_log_var = np.log(np.concatenate([[first], post_var[1:]]))
    large_log_var = np.log(np.concatenate([[first], betas[1:]]))
    return {
        "betas": betas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "one_minus_alphas_cumprod_prev": 1.0 - abar_prev,
        "sqrt_alphas_cumprod": np.sqrt(abar),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
        "sqrt_alphas_cumprod_prev": np.sqrt(abar_prev),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1.0),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_log_var,
        "posterior_std": np.exp(0.5 * post_log_var),
        "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
        "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
        "log_betas": np.log(betas),
        "fixed_large_log_variance": large_log_var,
        "fixed_large_std": np.exp(0.5 * large_log_var),
        "snr": abar / (1.0 - abar),
    }

