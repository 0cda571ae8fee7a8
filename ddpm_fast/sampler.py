"""ddpm_fast.sample: images from a DDPM with the fused reverse step, in chunks, as CUDA graphs on a GPU.

One chunk of B samples whose first element is element ``offset`` of the whole (n, C, H, W) batch:
    x = seeded_randn(seed, element_offset=offset)               x_T (Philox stream STREAM_INIT)
    for i = steps-1 .. 0:                                        step indices of the (respaced) schedule
        m = model(x, t[i])                                       t[i]: (B,) ORIGINAL training timesteps
        p_step(tables, m, x, i, seed=seed, element_offset=offset, out=x)     in place, noise Philox(seed, i, e)
Tables, the (steps, B) timestep batches and the seed live on the device before the loop starts: no host sync, no
Python branch on a tensor value, nothing allocated by the loop itself. On CUDA the loop is captured as a CUDA
graph (sampler_graph.py); on the CPU it runs eagerly with the fused C++ step.

Reproducibility: the noise of element e (sample index * C*H*W + its index in NCHW order) at step i is a pure
function of (seed, i, e). The chain x is always float32 in NCHW memory order, whatever memory format or dtype the
model runs in, so the seed alone fixes the noise: chunked == unchunked, graph == eager, and CPU and CUDA draw
the same numbers (images then agree up to the model's float rounding, which a long chain amplifies).
"""
import contextlib
import copy
import itertools
import json
import logging
import time
import weakref

import torch
from torch import nn

from .ops.p_step import p_step, seeded_randn
from .sampler_args import as_unet, resolve
from .unet import UNet

log = logging.getLogger("ddpm_fast")

_MASK64 = (1 << 64) - 1
_LAST_INFO = {}


# ---- the public API ---------------------------------------------------------------------------------------

def sample(model, n, steps=None, *, shape=None, schedule=None, prediction=None, variance=None, sampler="ddpm",
           eta=0.0, clip=None, seed=None, device=None, dtype=None, batch_size=None, cuda_graph="auto",
           progress=True, spacing="linspace", graph="auto", memory_format="auto", generator=None):
    """Draws ``n`` images from a diffusion model: returns (n, C, H, W) float32 on ``device``, in [-1, 1] when
    ``clip`` (the final x_0 is clipped); with clip=False the raw final x_0.

    :param model: ``model(x_t, t) -> output``, t an int64 (B,) tensor of ORIGINAL training timesteps; output
        (B, C, H, W), or (B, 2C, H, W) with a learned variance (the second half is ignored by fixed variances).
        A ddpm_fast UNet (or a loaded checkpoint) supplies shape, schedule, prediction, variance and clip from
        ``model.diffusion``; any other module needs ``shape`` and ``schedule``, and prediction / variance / clip
        default to "eps" / "fixed_small" / True. The model runs in eval mode (restored afterwards).
    :param steps: None = the schedule's T; fewer respace it (``schedule.respace(steps, spacing)``).
    :param schedule: the TRAINING ``NoiseSchedule`` (a respaced one is used as is when steps is None).
    :param sampler: "ddpm" (ancestral) or "ddim" (with ``eta`` >= 0; eta = 1 has DDPM's posterior variance).
    :param seed: int: the same seed gives the same images on a device, for any batch_size and with or without
        graphs; None draws one from torch's global RNG (so ``torch.manual_seed`` makes the call reproducible).
    :param device, dtype: default to the model's. dtype is the MODEL's compute dtype: its own dtype runs as is,
        float16/bfloat16 with float32 weights runs under torch.autocast; the chain stays float32 throughout.
    :param batch_size: samples per chunk (default min(n, 256)); chunk k starts at element k*batch_size*C*H*W.
    :param cuda_graph: "auto" (graphs on CUDA when no generator is given), True (must capture), False.
    :param graph: "auto" | "whole" (the whole loop in one graph) | "step" (one step's graph replayed).
        "auto" captures the whole loop for a single chunk with steps * batch <= sampler_graph.WHOLE_GRAPH_MAX,
        one step otherwise, and falls back to the next kind (then eager) when a capture fails.
    :param memory_format: the model input's: "auto" (see ``choose_channels_last``), "contiguous", "channels_last".
    :param generator: a torch.Generator on ``device`` instead of ``seed``: diffusers' noise convention (x_T and
        each step's noise drawn with torch.randn), for parity with DDPMPipeline; eager only, and chunks continue
        one stream (so chunked != unchunked).
    :param progress: a tqdm bar over steps of all chunks; False silences it.
    """
    t_start = time.perf_counter()
    job = resolve(model, n, steps, shape=shape, schedule=schedule, prediction=prediction, variance=variance,
                  sampler=sampler, eta=eta, clip=clip, seed=seed, device=device, dtype=dtype,
                  batch_size=batch_size, cuda_graph=cuda_graph, progress=progress, spacing=spacing, graph=graph,
                  memory_format=memory_format, generator=generator)
    info = {"device": str(job.plan.device), "n": job.n, "batch_size": job.plan.batch, "chunks": len(job.chunks),
            "steps": job.schedule.num_steps, "sampler": job.plan.sampler, "seed": job.seed,
            "dtype": str(job.plan.dtype), "autocast": job.plan.autocast, "channels_last": job.plan.channels_last,
            "modes": [], "captures": [], "cache_hits": 0}
    C, H, W = job.plan.shape
    result = torch.empty((job.n, C, H, W), device=job.plan.device)  # a normal tensor, not an inference tensor
    with _eval_mode(job.model), torch.inference_mode():
        _run(job, result, info)
    if job.plan.device.type == "cuda":
        torch.cuda.synchronize(job.plan.device)
    info["wall_s"] = time.perf_counter() - t_start
    _LAST_INFO.clear()
    _LAST_INFO.update(info)
    return result


def last_run_info():
    """What the last ``sample`` call did (a copy): device, n, batch_size, chunks, steps, seed, dtype, autocast,
    channels_last, modes (per chunk: "eager" | "graph-whole" | "graph-step"), captures (per capture: mode,
    offset, capture_s, graph_bytes = device memory the capture took, pool_bytes = its memory-pool growth),
    cache_hits (chunks that replayed a cached graph), wall_s (the call, synchronized)."""
    return json.loads(json.dumps(_LAST_INFO, default=str))


# ---- the loop ---------------------------------------------------------------------------------------------

_TWINS = weakref.WeakKeyDictionary()  # UNet -> (layout, versions, channels_last twin)


def channels_last_twin(unet):
    """A channels_last copy of a UNet for inference (conv weights in the input's format: no per-call re-layout).
    In-place changes of the original's tensors (training steps, load_state_dict) are copied into the twin's same
    storage, so graphs captured on it stay valid; new storage or dtypes (.to(), .half()) rebuild it."""
    tensors = list(itertools.chain(unet.parameters(), unet.buffers()))
    layout = tuple((t.data_ptr(), t.dtype, t.device) for t in tensors)
    versions = tuple(t._version for t in tensors)
    hit = _TWINS.get(unet)
    if hit is not None and hit[:2] == (layout, versions):
        return hit[2]
    with torch.inference_mode(False), torch.no_grad():
        if hit is None or hit[0] != layout:
            twin = copy.deepcopy(unet).eval().to(memory_format=torch.channels_last).requires_grad_(False)
        else:
            twin = hit[2]
            for mine, theirs in zip(itertools.chain(twin.parameters(), twin.buffers()), tensors):
                mine.copy_(theirs)
    _TWINS[unet] = (layout, versions, twin)
    return twin


def model_to_run(job):
    """The module the loop calls: a ddpm_fast UNet's channels_last twin when the plan says so, else the model."""
    unet = as_unet(job.model)
    if job.plan.channels_last and unet is not None and isinstance(job.model, nn.Module):
        return channels_last_twin(unet)
    return job.model


class Statics:
    """The buffers one plan's loop reads and writes, allocated once: a captured graph holds their addresses.

    x: (B, C, H, W) float32 NCHW, the chain (updated in place). x_in: the model's input when it needs another
    dtype or memory format, else None. seed: (1,) int64. t: (steps, B) int64 original timesteps per step index.
    step, t_step: the step index (1,) and its timesteps (B,) for the one-step graph.
    time_proj, proj_step: see refresh_time_proj (ddpm_fast UNets only).
    """

    def __init__(self, plan, schedule):
        dev, B = plan.device, plan.batch
        self.tables = schedule.tables(dev)  # before any capture: the first call copies to the device
        self.x = torch.empty((B, *plan.shape), device=dev)
        in_dtype = torch.float32 if plan.autocast else plan.dtype
        fmt = torch.channels_last if plan.channels_last else torch.contiguous_format
        self.x_in = None if in_dtype == torch.float32 and not plan.channels_last else \
            torch.empty_like(self.x, dtype=in_dtype, memory_format=fmt)
        self.seed = torch.zeros(1, dtype=torch.int64, device=dev)
        self.t = self.tables.timesteps[:, None].expand(-1, B).contiguous()
        self.step = torch.zeros(1, dtype=torch.int64, device=dev)
        self.t_step = torch.empty(B, dtype=torch.int64, device=dev)
        self.time_proj = None  # (steps, P): a UNet's time projections of every step (refresh_time_proj)
        self.proj_step = None  # (1, P): the one-step graph's row, gathered by the step index

    def set_seed(self, seed):
        value = seed & _MASK64  # the int64 with the seed's low 64 bits, as p_step.seed_tensor
        self.seed.fill_(value - 2 ** 64 if value >= 2 ** 63 else value)


def autocast_for(plan):
    if not plan.autocast:
        return contextlib.nullcontext()
    return torch.autocast(plan.device.type, dtype=plan.dtype, cache_enabled=False)  # no cache across captures


def check_model_output(out, plan):
    """The C-channel (or 2C for learned_range) output p_step reads; metadata checks only (no sync)."""
    B, (C, H, W) = plan.batch, plan.shape
    learned = plan.variance == "learned_range"
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"the model must return a tensor (B, C, H, W), got {type(out).__name__}")
    got = tuple(out.shape)
    if learned and got == (B, C, H, W):
        raise ValueError(f"variance='learned_range' needs a model that returns 2C = {2 * C} channels "
                         f"(prediction and variance); it returned {got} for input {(B, C, H, W)}")
    if got not in ((B, C, H, W), (B, 2 * C, H, W)):
        raise ValueError(f"the model returned shape {got} for input {(B, C, H, W)}; expected "
                         f"{(B, 2 * C if learned else C, H, W)}")
    if out.dtype not in (torch.float32, torch.float16, torch.bfloat16) or out.device != plan.device:
        raise ValueError(f"the model returned {out.dtype} on {out.device}; expected a float32/16 or bfloat16 "
                         f"tensor on {plan.device}")
    return out[:, :C] if not learned and got[1] == 2 * C else out


def refresh_time_proj(model, st, plan):
    """For a ddpm_fast UNet: everything it computes from t alone (its ResBlocks' time projections), for every
    step in ONE batched pass, into st.time_proj (steps, P). All samples of a reverse step share t, so each
    forward then reads a (1, P) row instead of running ~30 small matmuls. Recomputed at the start of every
    chain (inside the whole-loop graph too), so updated weights are always used."""
    if not isinstance(model, UNet):
        return
    with autocast_for(plan):
        proj = model.time_projections(st.tables.timesteps)
    if st.time_proj is None or st.time_proj.dtype != proj.dtype:
        st.time_proj, st.proj_step = proj, torch.empty_like(proj[:1])
    else:
        st.time_proj.copy_(proj)


def model_step(model, st, plan, step, t, offset, noise):
    """x <- p_step(model(x, t), x, step) in place. step: int (baked into a graph) or st.step (read on device);
    noise: {"seed": st.seed} or {"generator": g}."""
    inp = st.x if st.x_in is None else st.x_in.copy_(st.x)
    with autocast_for(plan):
        if st.time_proj is None:
            out = model(inp, t)
        elif isinstance(step, int):
            out = model(inp, t, time_proj=st.time_proj[step:step + 1])
        else:
            out = model(inp, t, time_proj=torch.index_select(st.time_proj, 0, step, out=st.proj_step))
    out = check_model_output(out, plan)
    p_step(st.tables, out, st.x, step, prediction=plan.prediction, variance=plan.variance, clip=plan.clip,
           sampler=plan.sampler, eta=plan.eta, element_offset=offset, out=st.x, **noise)


def init_x(st, offset, generator=None):
    """x_T: Philox from the seed tensor (graph-capturable), or torch.randn from a generator (diffusers' way)."""
    if generator is None:
        seeded_randn(None, st.seed, out=st.x, element_offset=offset)
    else:
        st.x.copy_(torch.randn(st.x.shape, generator=generator, device=generator.device))


def run_loop(model, st, plan, offset, generator=None, bar=None):
    """The whole chain of one chunk, eagerly (also the body the whole-loop graph captures, with bar=None)."""
    init_x(st, offset, generator)
    refresh_time_proj(model, st, plan)
    noise = {"seed": st.seed} if generator is None else {"generator": generator}
    for i in reversed(range(st.t.shape[0])):
        model_step(model, st, plan, i, st.t[i], offset, noise)
        if bar is not None:
            bar.update(1)


def _run(job, result, info):
    """Every chunk (graph or eager) into result[start:start+b]; one finiteness check (one sync) at the end."""
    from tqdm.auto import tqdm
    plan, steps = job.plan, job.schedule.num_steps
    C, H, W = plan.shape
    use_graphs = job.generator is None and job.cuda_graph is not False and _graphs().BACKEND.available(plan.device)
    model = model_to_run(job)
    finite, statics = [], {}
    with tqdm(total=len(job.chunks) * steps, disable=not job.progress, desc="ddpm_fast.sample", unit="step",
              dynamic_ncols=True) as bar:
        for k, (start, b) in enumerate(job.chunks):
            chunk_plan, offset = plan.with_batch(b), start * C * H * W
            mode, x = None, None
            if use_graphs:
                mode, x = _graphs().run_chunk_graph(job, model, chunk_plan, offset, len(job.chunks), bar, info)
            if mode is None:
                st = statics.get(b) or statics.setdefault(b, Statics(chunk_plan, job.schedule))
                st.set_seed(job.seed or 0)
                run_loop(model, st, chunk_plan, offset, job.generator, bar)
                mode, x = "eager", st.x
            log.debug("ddpm_fast.sample: chunk %d/%d (samples %d..%d) ran %s", k + 1, len(job.chunks), start,
                      start + b - 1, mode)
            info["modes"].append(mode)
            finite.append(torch.isfinite(x).all())  # before the clamp, which would hide an inf
            out = result[start:start + b].copy_(x)
            if plan.clip:
                out.clamp_(-1.0, 1.0)  # x0 was clipped; this only removes the last coefficient's rounding
    _check_finite(torch.stack(finite).cpu(), job)


def _graphs():
    from . import sampler_graph  # imported on use: it imports this module
    return sampler_graph


def _check_finite(flags, job):
    bad = [k for k, ok in enumerate(flags.tolist()) if not ok]
    if bad:
        k = bad[0]
        start, b = job.chunks[k]
        raise FloatingPointError(
            f"sampling produced non-finite values (NaN or inf) in chunk {k + 1} of {len(job.chunks)} (samples "
            f"{start}..{start + b - 1}){f' and {len(bad) - 1} later chunk(s)' if len(bad) > 1 else ''}: check "
            f"the model's outputs, its dtype ({job.plan.dtype}) and the schedule")


@contextlib.contextmanager
def _eval_mode(model):
    """Dropout off while sampling; the caller's train/eval mode is restored afterwards."""
    was_training = isinstance(model, nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train(True)
