"""The sampling loop of one chunk, shared by eager runs and CUDA-graph captures: the static buffers a plan's loop
reads and writes (``Statics``), the model call with its dtype/memory-format handling (and its class labels:
guided plans run the conditional and unconditional inputs as one batch of 2B), and the chain x_T -> x_0 as fused
steps (``run_loop``): ``p_step`` for DDPM/DDIM, ``solver_step`` (with the solver's history in static buffers) for
the few-step solvers, either combining a guided output in the kernel; which one is fixed by the plan, never
decided per step. Nothing here decides between graph and eager (sample.py, graphs.py).
"""
import contextlib
import copy
import itertools
import weakref

import torch
from torch import nn

from ..diffusion.solvers import SOLVERS
from ..models import UNet
from ..ops.noise import seeded_randn
from ..ops.p_step import p_step
from ..ops.solver_step import SolverState, solver_step
from .args import as_unet

_MASK64 = (1 << 64) - 1

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
    dtype or memory format, else None. seed: (1,) int64. offset: (1,) int64, the chunk's element offset (sample
    index * C*H*W), with its residue mod 4 on the host in ``offset_mod4`` (the kernels' launch geometry; a
    captured graph is specific to it, not to the offset). t: (steps, B) int64 original timesteps per step index.
    step, t_step: the step index (1,) and its timesteps (B,) for the one-step graph.
    time_proj, proj_step: see refresh_time_proj (ddpm_fast UNets only).
    state: a solver's history (float32, like x; ops.solver_step.SolverState), None for DDPM/DDIM.
    x_init: the caller's x_T for this chunk (plan.x_T_given), copied in before each run or replay.
    labels, model_labels, guidance: see set_conditioning (plan.conditioning "labels" / "guided"), else None.
    emb_t, emb_y, proj_weights, emb_step: a conditional UNet's precomputed conditioning (refresh_time_proj).
    """

    def __init__(self, plan, schedule):
        dev, B = plan.device, plan.batch
        self.schedule = schedule
        self.tables = schedule.tables(dev)  # before any capture: the first call copies to the device
        self.x = torch.empty((B, *plan.shape), device=dev)
        self.state = None
        if plan.sampler in SOLVERS:
            schedule.solver_tables(plan.sampler, dev)  # before any capture, as the tables
            self.state = SolverState.zeros_like(self.x, plan.sampler)
        self.x_init = torch.empty_like(self.x) if plan.x_T_given else None
        in_dtype = torch.float32 if plan.autocast else plan.dtype
        fmt = torch.channels_last if plan.channels_last else torch.contiguous_format
        MB = plan.model_batch
        self.x_in = None if in_dtype == torch.float32 and not plan.channels_last and MB == B else \
            torch.empty((MB, *plan.shape), dtype=in_dtype, device=dev).contiguous(memory_format=fmt)
        self._conditioning_buffers(plan)
        self.seed = torch.zeros(1, dtype=torch.int64, device=dev)
        self.offset = torch.zeros(1, dtype=torch.int64, device=dev)
        self.offset_mod4 = 0
        self.t = self.tables.timesteps[:, None].expand(-1, MB).contiguous()
        self.step = torch.zeros(1, dtype=torch.int64, device=dev)
        self.t_step = torch.empty(MB, dtype=torch.int64, device=dev)
        self.time_proj = None  # (steps, P): a UNet's time projections of every step (refresh_time_proj)
        self.proj_step = None  # (1, P): the one-step graph's row, gathered by the step index
        self.emb_t = self.emb_y = self.proj_weights = self.emb_step = None

    def _conditioning_buffers(self, plan):
        """model_labels: (B,) labels, or (2B,) the labels then the null label (guided); labels: its first B rows,
        written per chunk; guidance: (1,) float32 w (guided). Device memory, so one graph serves any labels / w."""
        self.labels = self.model_labels = self.guidance = None
        if plan.conditioning == "none":
            return
        self.model_labels = torch.full((plan.model_batch,), plan.null_label, dtype=torch.int64, device=plan.device)
        self.labels = self.model_labels[:plan.batch]
        if plan.conditioning == "guided":
            self.guidance = torch.ones(1, dtype=torch.float32, device=plan.device)

    def set_conditioning(self, labels, guidance_scale):
        """The chunk's labels ((B,) ints, any device) and w into the device buffers (a copy and a fill)."""
        if self.labels is not None:
            self.labels.copy_(labels)
        if self.guidance is not None:
            self.guidance.fill_(guidance_scale)

    def set_seed(self, seed):
        value = seed & _MASK64  # the int64 with the seed's low 64 bits, as p_step.seed_tensor
        self.seed.fill_(value - 2 ** 64 if value >= 2 ** 63 else value)

    def set_offset(self, offset):
        """The chunk's element offset into the device tensor the loop reads (a device-side fill: no sync)."""
        self.offset.fill_(offset)
        self.offset_mod4 = offset % 4

    def offset_kw(self):
        """The element offset as the kernels take it: read from the tensor, its residue mod 4 from the host."""
        return {"element_offset": self.offset, "offset_mod4": self.offset_mod4}


def autocast_for(plan):
    if not plan.autocast:
        return contextlib.nullcontext()
    return torch.autocast(plan.device.type, dtype=plan.dtype, cache_enabled=False)  # no cache across captures


def model_tensor(out):
    """The tensor a model's output carries: itself, ``.sample`` (diffusers' UNet2DOutput) or a tuple's first
    element (diffusers' return_dict=False); None when there is none."""
    if isinstance(out, torch.Tensor):
        return out
    inner = getattr(out, "sample", None)
    if isinstance(inner, torch.Tensor):
        return inner
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def check_model_output(out, plan):
    """The C-channel (or 2C for learned_range) output p_step reads; metadata checks only (no sync). A guided
    plan's model returns 2B samples."""
    B, (C, H, W) = plan.model_batch, plan.shape
    learned = plan.variance == "learned_range"
    tensor = model_tensor(out)
    if tensor is None:
        raise ValueError(f"the model must return a tensor (B, C, H, W) (or an output holding one as .sample or "
                         f"as a tuple's first element), got {type(out).__name__}")
    out = tensor
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
    chain (inside the whole-loop graph too), so updated weights are always used. With labels: the t-only and
    class parts (refresh_class_conditioning). A compiled model (sampling/compiled.py) is looked through: these
    run once per chain, uncompiled."""
    unet = getattr(model, "_orig_mod", model)
    if not isinstance(unet, UNet):
        return
    if st.model_labels is not None:
        return refresh_class_conditioning(unet, st, plan)
    with autocast_for(plan):
        proj = unet.time_projections(st.tables.timesteps)
    if st.time_proj is None or st.time_proj.dtype != proj.dtype:
        st.time_proj, st.proj_step = proj, torch.empty_like(proj[:1])
    else:
        st.time_proj.copy_(proj)


def refresh_class_conditioning(model, st, plan):
    """A conditional UNet's conditioning split at the embedding (UNet.time_projections explains why): the timestep
    MLP of every step (st.emb_t, (steps, E)), the class rows of the chunk's model labels (st.emb_y, (B or 2B,
    E)) and every ResBlock's projection stacked (st.proj_weights), once per chain, into buffers allocated once
    (a captured one-step graph reads their addresses); per step ``step_projections`` adds, applies SiLU and runs
    ONE matmul."""
    with autocast_for(plan):
        fresh = (model.time_embeddings(st.tables.timesteps), model.class_embeddings(st.model_labels),
                 model.projection_weights())
    if st.emb_t is None or st.emb_t.dtype != fresh[0].dtype:
        st.emb_t, st.emb_y, st.proj_weights = fresh[0], fresh[1], fresh[2]
        st.emb_step = torch.empty_like(fresh[0][:1])
        return
    for mine, new in zip((st.emb_t, st.emb_y, *st.proj_weights), (fresh[0], fresh[1], *fresh[2])):
        mine.copy_(new)


def step_projections(model, st, step):
    """The time projections of step ``step`` (an int, or st.step on the device): a (1, P) row of st.time_proj,
    or with labels projections(emb_t[step] + emb_y) -> (B or 2B, P)."""
    if st.emb_t is None:
        if isinstance(step, int):
            return st.time_proj[step:step + 1]
        return torch.index_select(st.time_proj, 0, step, out=st.proj_step)
    emb = st.emb_t[step:step + 1] if isinstance(step, int) else torch.index_select(st.emb_t, 0, step, out=st.emb_step)
    return getattr(model, "_orig_mod", model).projections(emb + st.emb_y, st.proj_weights)  # uncompiled


def model_input(st, x=None):
    """What the model gets: the chain (or ``x``), converted into st.x_in when the model needs another dtype or
    memory format; for a guided plan x twice (its conditional and unconditional inputs), one copy."""
    x = st.x if x is None else x
    if st.x_in is None:
        return x
    if st.x_in.shape[0] == x.shape[0]:
        return st.x_in.copy_(x)
    st.x_in.view(2, *x.shape).copy_(x.unsqueeze(0).expand(2, *x.shape))
    return st.x_in


def model_step(model, st, plan, step, t, noise):
    """x <- the fused step (p_step or solver_step) of model(x, t) in place. step: int (baked into a graph) or
    st.step (read on device);
    noise: {"seed": st.seed} or {"generator": g}; the element offset is read from st.offset."""
    out = call_model(model, st, plan, model_input(st), step, t)
    fused_step(st, plan, check_model_output(out, plan), step, noise)


def call_model(model, st, plan, inp, step, t):
    """The model's output for step ``step`` (int or st.step) on ``inp``, called as every loop calls it (a compiled
    model compiles for exactly this call): with the precomputed projections, or the labels, or plain (x, t)."""
    with autocast_for(plan):
        if st.time_proj is not None or st.emb_t is not None:
            return model(inp, t, time_proj=step_projections(model, st, step))
        if st.model_labels is not None:
            return model(inp, t, st.model_labels)
        return model(inp, t)


def fused_step(st, plan, out, step, noise, x=None, state=None):
    """x (default st.x) <- one fused step in place from the model output ``out``: p_step for DDPM/DDIM,
    solver_step with the history ``state`` (default st.state) for the solvers; the element offset is read from
    st.offset."""
    x = st.x if x is None else x
    if plan.sampler in SOLVERS:
        solver_step(st.schedule, plan.sampler, out, x, step, st.state if state is None else state,
                    prediction=plan.prediction, variance=plan.variance, out=x, guidance_scale=st.guidance,
                    **st.offset_kw(), **noise)
    else:
        p_step(st.tables, out, x, step, prediction=plan.prediction, variance=plan.variance, clip=plan.clip,
               sampler=plan.sampler, eta=plan.eta, out=x, guidance_scale=st.guidance, **st.offset_kw(), **noise)


def load_x_T(st, x_T, start):
    """Copies the chunk's rows of the caller's x_T (n, C, H, W; ``start``: the chunk's first row) into
    st.x_init, before a run or a replay."""
    if st.x_init is not None:
        st.x_init.copy_(x_T[start:start + st.x.shape[0]])


def load_labels(st, job, start):
    """Writes the chunk's rows of the job's labels (``start``: the chunk's first row) and its guidance scale into
    the static buffers, before a run or a replay."""
    if st.labels is not None:
        st.set_conditioning(job.labels[start:start + st.x.shape[0]], job.guidance_scale)


def init_x(st, generator=None):
    """x_T: the caller's (st.x_init), Philox from the seed and offset tensors (graph-capturable), or torch.randn
    from a generator (diffusers' way); a solver's history starts at zero."""
    if st.x_init is not None:
        st.x.copy_(st.x_init)
    elif generator is None:
        seeded_randn(None, st.seed, out=st.x, **st.offset_kw())
    else:
        st.x.copy_(torch.randn(st.x.shape, generator=generator, device=generator.device))
    if st.state is not None:
        st.state.zero_()


def run_loop(model, st, plan, generator=None, bar=None):
    """The whole chain of one chunk, eagerly (also the body the whole-loop graph captures, with bar=None). The
    chunk is fixed by st.seed and st.offset (written before the call or the replay)."""
    init_x(st, generator)
    refresh_time_proj(model, st, plan)
    noise = {"seed": st.seed} if generator is None else {"generator": generator}
    for i in reversed(range(st.t.shape[0])):
        model_step(model, st, plan, i, st.t[i], noise)
        if bar is not None:
            bar.update(1)
