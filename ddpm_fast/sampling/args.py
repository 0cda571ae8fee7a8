"""The arguments of ddpm_fast.sample: every check and default, resolved before any work into a SampleJob.

Defaults: a ddpm_fast UNet (also inside DDP / torch.compile wrappers) supplies shape, schedule, prediction,
variance and clip from ``model.diffusion``; other modules need ``shape`` and ``schedule`` and get "eps",
"fixed_small", clip=True. ``steps`` respaces the training schedule (``NoiseSchedule.respace(steps, spacing)``);
``steps=None`` / ``spacing=None`` take the sampler's defaults (diffusion.config.DEFAULT_STEPS / DEFAULT_SPACING),
except that a schedule that is already respaced is used as given. Class labels and guidance: conditioning.py.
"""
import functools
import itertools
import json
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from .. import diffusion as _diffusion
from ..diffusion.config import DEFAULT_SPACING, DEFAULT_STEPS
from ..diffusion.schedule import SPACINGS, NoiseSchedule
from ..diffusion.solvers import ORDER, SOLVERS
from ..compiler import check_mode
from ..distributed import check_device
from ..threads import model_work, resolve_threads
from .conditioning import resolve_conditioning
from .pipelines import from_pipeline, is_pipeline

DEFAULT_MAX_BATCH = 256   # batch_size=None: one chunk up to this many samples, else chunks of this size


@dataclass(frozen=True)
class SamplePlan:
    """What fixes one chunk's computation apart from the seed and the chunk's element offset. With the model's
    identity it keys the CUDA-graph cache.

    shape: (C, H, W); dtype: the model's compute dtype; autocast: the model runs under torch.autocast(dtype)
    (fp32 weights) rather than in its own dtype; channels_last: the model runs channels_last (its input, and a
    channels_last twin of a ddpm_fast UNet). conditioning: "none" (unconditional), "labels" (the model gets the
    chunk's labels) or "guided" (2B samples per model call, the labels then the null label ``null_label``, and
    classifier-free guidance in the fused step); see conditioning.py.
    """
    device: torch.device
    batch: int
    shape: Tuple[int, int, int]
    schedule_key: tuple
    prediction: str
    variance: str
    clip: bool
    sampler: str
    eta: float
    dtype: torch.dtype
    autocast: bool
    channels_last: bool
    x_T_given: bool = False
    conditioning: str = "none"
    null_label: Optional[int] = None

    def with_batch(self, batch):
        return SamplePlan(**{**self.__dict__, "batch": batch})

    @property
    def model_batch(self):
        """Samples per model call: 2B with guidance (conditional and unconditional), else B."""
        return 2 * self.batch if self.conditioning == "guided" else self.batch


@dataclass
class SampleJob:
    """A validated ``sample`` call: everything resolved, nothing run yet."""
    model: object
    n: int
    schedule: NoiseSchedule
    plan: SamplePlan
    seed: int
    generator: Optional[torch.Generator]
    cuda_graph: object     # "auto" | True | False
    graph: str             # "auto" | "whole" | "step"
    progress: bool
    start: int = 0         # the call's first image is image ``start`` of a longer run (element offset start*C*H*W)
    threads: Optional[int] = None  # CPU threads while sampling (None: torch's setting)
    x_T: Optional[torch.Tensor] = None   # (n, C, H, W) starting noise, or None to draw it from the seed
    labels: Optional[torch.Tensor] = None  # (n,) int64 class labels (CPU), or None: unconditional
    guidance_scale: Optional[float] = None  # classifier-free guidance's w with labels (conditioning.py)
    compile: Optional[str] = None  # the torch.compile mode of the model's forward (None: not compiled)
    compile_explicit: bool = False  # compile was asked for (True or a mode), not chosen by "auto"

    @property
    def chunks(self):
        B = self.plan.batch
        return [(start, min(B, self.n - start)) for start in range(0, self.n, B)]


# ---- validation ---------------------------------------------------------------------------------------------

def resolve(model, n, steps=None, *, shape=None, schedule=None, prediction=None, variance=None, sampler=None,
            eta=None, clip=None, seed=None, device=None, dtype=None, batch_size=None, cuda_graph="auto",
            progress=True, spacing=None, graph="auto", memory_format="auto", generator=None, start=0,
            threads="auto", x_T=None, labels=None, guidance_scale=None, compile=False):
    """Validates a ``sample`` call and resolves its defaults (arguments as ``sample``) -> SampleJob.
    Wrong types raise TypeError, wrong values ValueError, both before any work."""
    pipe = from_pipeline(model) if is_pipeline(model) else None
    model = pipe.model if pipe else model
    if not callable(model):
        raise TypeError(f"model must be a callable nn.Module model(x_t, t), got {type(model).__name__}")
    n = _check_int("n", n, 1)
    unet = as_unet(model)
    trained = pipe.diffusion if pipe else unet.diffusion if unet is not None else None
    shape = _resolve_shape(shape, unet, pipe.shape if pipe else None)
    sampler = _choice("sampler", sampler, pipe.sampler if pipe else "ddpm", _diffusion.SAMPLERS)
    eta = _check_eta((pipe.eta if pipe else 0.0) if eta is None else eta, sampler)
    offset = pipe.offset if pipe and spacing is None else 0
    grid = pipe.grid if pipe and spacing is None and schedule is None else None
    spacing = pipe.spacing if pipe and spacing is None else spacing  # None: the sampler's default
    schedule = _resolve_schedule(schedule, steps, spacing, trained, unet, sampler, offset, grid)
    prediction = _choice("prediction", prediction, trained.prediction if trained else "eps", _diffusion.PREDICTIONS)
    variance = _choice("variance", variance, trained.variance if trained else "fixed_small", _diffusion.VARIANCES)
    clip = bool(trained.clip if trained else True) if clip is None else _check_bool("clip", clip)
    if unet is not None and variance == "learned_range" and unet.config.out_channels != 2 * shape[0]:
        raise ValueError(f"variance='learned_range' needs a model that returns 2C = {2 * shape[0]} channels "
                         f"(prediction and variance); this UNet returns {unet.config.out_channels}")
    dev = _resolve_device(model, device)
    compute_dtype, autocast = _resolve_dtype(model, dtype)
    batch = n if batch_size is None and n <= DEFAULT_MAX_BATCH else \
        DEFAULT_MAX_BATCH if batch_size is None else min(_check_int("batch_size", batch_size, 1), n)
    _check_graph_args(cuda_graph, graph, dev, generator)
    channels_last = _resolve_memory_format(memory_format, unet, dev, compute_dtype)
    seed = _resolve_seed(seed, generator, dev)
    start = _check_start(start, n, shape, generator)
    x_T = _check_x_T(x_T, n, shape)
    labels, w, mode, null = resolve_conditioning(labels, guidance_scale, model, unet, n)
    plan = SamplePlan(dev, batch, shape, schedule.key, prediction, variance, clip, sampler, eta, compute_dtype,
                      autocast, channels_last, x_T is not None, mode, null)
    work = model_work(model, shape[1:], plan.model_batch)
    threads = resolve_threads(threads, work, dev)
    compile_mode, explicit = _resolve_compile(compile, unet, dev, work)
    return SampleJob(model, n, schedule, plan, seed, generator, cuda_graph, graph, _check_bool("progress", progress),
                     start=start, threads=threads, x_T=x_T, labels=labels, guidance_scale=w, compile=compile_mode,
                     compile_explicit=explicit)


def _check_int(name, value, low, high=None):
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must satisfy {low} <= {name}" + (f" <= {high}" if high is not None else "")
                         + f", got {value}")
    return value


def _check_start(start, n, shape, generator):
    """start >= 0, with the run's last element index inside the noise counter's int64 element range."""
    start = _check_int("start", start, 0)
    if generator is not None and start:
        raise ValueError("start= places the call in a longer seed= run; generator= draws torch.randn noise, which "
                         "has no element offsets (use seed=)")
    per_image = shape[0] * shape[1] * shape[2]
    if (start + n) * per_image > 2 ** 63 - 1:
        raise ValueError(f"start + n = {start + n} images of {per_image} elements exceed the noise's element "
                         f"index range (2^63 - 1 elements)")
    return start


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _choice(name, value, default, choices):
    value = default if value is None else value
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {choices}, got {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _check_eta(eta, sampler):
    if isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise TypeError(f"eta must be a finite float >= 0, got {eta!r}")
    if not 0 <= eta < math.inf:
        raise ValueError(f"eta must be a finite float >= 0, got {eta!r}")
    if sampler != "ddim" and eta != 0:
        raise ValueError(f"eta applies to sampler='ddim' only (got eta={eta} with sampler={sampler!r}"
                         + (", which has no eta: dpmpp_2m_sde is the stochastic solver)" if sampler in SOLVERS
                            else ")"))
    return float(eta)


def _check_x_T(x_T, n, shape):
    """The caller's starting noise: a finite float tensor of shape (n, C, H, W), on any device (copied per chunk)."""
    if x_T is None:
        return None
    if not isinstance(x_T, torch.Tensor):
        raise ValueError(f"x_T must be a tensor of shape {(n, *shape)} or None, got {type(x_T).__name__}")
    if tuple(x_T.shape) != (n, *shape):
        raise ValueError(f"x_T must have shape (n, C, H, W) = {(n, *shape)}, got {tuple(x_T.shape)}")
    if not x_T.is_floating_point():
        raise ValueError(f"x_T must be a floating-point tensor, got {x_T.dtype}")
    if not bool(torch.isfinite(x_T).all()):
        raise ValueError("x_T must be finite (found NaN or inf)")
    return x_T


def as_unet(model):
    """The ddpm_fast UNet inside DDP / torch.compile wrappers, or None for a foreign model."""
    from ..models import UNet
    for _ in range(8):
        if isinstance(model, UNet):
            return model
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if model is None:
            return None
    return None


def _resolve_shape(shape, unet, default=None):
    """(C, H, W): given, else the UNet's (or the pipeline's); a given shape must be the UNet's own."""
    own = (unet.config.in_channels, unet.config.image_size, unet.config.image_size) if unet is not None else default
    if shape is None:
        if own is None:
            raise ValueError("shape=(C, H, W) is required for a model that is not a ddpm_fast UNet")
        return tuple(own)
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 3 or any(
            isinstance(s, bool) or not hasattr(s, "__index__") for s in shape):
        raise TypeError(f"shape must be (C, H, W) with positive ints, got {shape!r}")
    if any(int(s) < 1 for s in shape):
        raise ValueError(f"shape must be (C, H, W) with positive ints, got {shape!r}")
    shape = tuple(int(s) for s in shape)
    if unet is not None and shape != own:
        raise ValueError(f"shape {shape} does not fit the UNet: its config makes {own} images (in_channels, "
                         f"image_size, image_size); leave shape= out")
    return shape


@functools.lru_cache(maxsize=16)
def _trained_schedule(config_json):
    # One NoiseSchedule object per training config, so its device tables are computed once per process.
    return _diffusion.DiffusionConfig.from_dict(json.loads(config_json)).make_schedule()


def _resolve_schedule(schedule, steps, spacing, trained, unet, sampler, offset=0, grid=None):
    if schedule is None:
        if trained is None:
            what = "a UNet without .diffusion" if unet is not None else "a model that is not a ddpm_fast UNet"
            raise ValueError(f"schedule= (a ddpm_fast.NoiseSchedule) is required for {what}")
        schedule = _trained_schedule(json.dumps(trained.to_dict(), sort_keys=True))
    elif not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a ddpm_fast.NoiseSchedule, got {type(schedule).__name__}")
    spacing = DEFAULT_SPACING[sampler] if spacing is None else spacing
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if grid is not None:  # a solver scheduler's own grid for this many steps (a pipeline's)
        steps = min(DEFAULT_STEPS[sampler], schedule.T) if steps is None else \
            _check_int("steps", steps, 1, schedule.T)
        chain = _respaced_timesteps(schedule, tuple(grid(steps)))
    elif steps is None and (schedule.is_respaced or DEFAULT_STEPS[sampler] is None):
        chain = schedule  # as given: a respaced chain, or every step of the training schedule
    else:
        steps = min(DEFAULT_STEPS[sampler], schedule.T) if steps is None else \
            _check_int("steps", steps, 1, schedule.T)
        chain = _respaced(schedule, steps, spacing, offset)
    if sampler in SOLVERS and chain.num_steps < ORDER[sampler]:
        merged = f" ({steps} logsnr steps merge into {chain.num_steps} distinct timesteps)" \
            if spacing == "logsnr" and steps is not None and steps != chain.num_steps else ""
        raise ValueError(f"sampler {sampler!r} is a multistep solver of order {ORDER[sampler]}: it needs at least "
                         f"{ORDER[sampler]} steps, got {chain.num_steps}{merged}")
    return chain


@functools.lru_cache(maxsize=32)
def _respaced(schedule, steps, spacing, offset=0):
    return schedule.respace(steps, spacing, offset)


@functools.lru_cache(maxsize=32)
def _respaced_timesteps(schedule, timesteps):
    return schedule.respace(timesteps=list(timesteps))


def _model_tensor(model):
    """The first parameter (else buffer) of an nn.Module, or None."""
    if not isinstance(model, nn.Module):
        return None
    return next(itertools.chain(model.parameters(), model.buffers()), None)


def _resolve_device(model, device):
    own = _model_tensor(model)
    own = own.device if own is not None else None
    dev = (own or torch.device("cpu")) if device is None else check_device(device)
    if own is not None and own != dev:
        raise ValueError(f"the model is on {own} but device={str(dev)!r}: move it first (model.to({str(dev)!r}))")
    return dev


def _resolve_dtype(model, dtype):
    """(compute dtype, autocast?) from the model's parameter dtype and the requested one."""
    own = _model_tensor(model)
    own = own.dtype if own is not None and own.is_floating_point() else torch.float32
    dtype = own if dtype is None else dtype
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
    if dtype == own:
        return dtype, False
    if own == torch.float32:
        return dtype, True  # fp32 weights, fp16/bf16 compute: torch.autocast
    raise ValueError(f"dtype={dtype} with a {own} model: convert the model instead (e.g. model.float())")


def _check_graph_args(cuda_graph, graph, device, generator):
    if cuda_graph not in ("auto", True, False):
        raise ValueError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
    if graph not in ("auto", "whole", "step"):
        raise ValueError(f"graph must be 'auto', 'whole' or 'step', got {graph!r}")
    if cuda_graph is True and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, got {device}")
    if cuda_graph is True and generator is not None:
        raise ValueError("generator= draws noise with torch.randn between kernels: it cannot be graph-captured "
                         "(use seed=, or cuda_graph='auto'/False)")


def choose_channels_last(unet, device, dtype):
    """memory_format="auto": channels_last (input AND a channels_last twin of the weights) for a ddpm_fast UNet on
    the CPU, where it measured 1.1-1.3x on the tiny preset and 1.0-1.1x on ddpm_cifar10 (README, "Memory
    format"; a channels_last input alone gained nothing); contiguous on CUDA (not yet measured) and for foreign
    models. The chain stays NCHW either way, so seeds do not depend on this choice."""
    return unet is not None and device.type == "cpu"


def _resolve_memory_format(memory_format, unet, device, dtype):
    if memory_format == "auto":
        return choose_channels_last(unet, device, dtype)
    if memory_format not in ("contiguous", "channels_last"):
        raise ValueError(f"memory_format must be 'auto', 'contiguous' or 'channels_last', got {memory_format!r}")
    return memory_format == "channels_last"


def choose_compile(unet, device, work):
    """compile="auto": where compiling measured to pay off. Nowhere yet (docs/compile.md, "What it gains"): on the
    CPU a compile (10-35 s per process and input) costs more than a single call saves (~2 ms per step for the tiny
    U-Net at batch 16); GPU numbers do not exist."""
    return False


def _resolve_compile(value, unet, device, work):
    """(torch.compile mode or None, explicit?) of ``compile=``: "auto" decides by ``choose_compile`` and is not
    explicit (a model that cannot be compiled then falls back with a warning instead of raising)."""
    if isinstance(value, str) and value == "auto":
        return check_mode(choose_compile(unet, device, work)), False
    mode = check_mode(value)
    return mode, mode is not None


def _resolve_seed(seed, generator, device):
    if generator is not None:
        if seed is not None:
            raise ValueError("give seed= or generator=, not both")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if torch.device(generator.device).type != device.type:
            raise ValueError(f"generator is on {generator.device} but sampling runs on {device}")
        return None
    if seed is None:
        return int(torch.randint(0, 2 ** 62, (1,)).item())
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    if not 0 <= int(seed) < 2 ** 64:
        raise ValueError(f"seed must be in [0, 2**64), got {int(seed)} (seeds are 64-bit: a negative or larger "
                         f"one would silently alias another)")
    return int(seed)
