"""ddpm_fast.sample: images from a DDPM with the fused reverse step, in chunks, as CUDA graphs on a GPU.

One chunk of B samples whose first element is element ``offset`` of the whole (n, C, H, W) batch:
    x = seeded_randn(seed, element_offset=offset)               x_T (Philox stream STREAM_INIT)
    for i = steps-1 .. 0:                                        step indices of the (respaced) schedule
        m = model(x, t[i])                                       t[i]: (B,) ORIGINAL training timesteps
        p_step(tables, m, x, i, seed=seed, element_offset=offset, out=x)     in place, noise Philox(seed, i, e)
Tables, the (steps, B) timestep batches, the seed and the chunk's offset live on the device before the loop
starts (the kernels read seed and offset from device memory): no host sync, no Python branch on a tensor value,
nothing allocated by the loop itself, and one captured graph serves every chunk of the same size. On CUDA the loop is captured as a CUDA
graph (graphs.py); on the CPU it runs eagerly with the fused C++ step.

Reproducibility: the noise of element e (sample index * C*H*W + its index in NCHW order) at step i is a pure
function of (seed, i, e). The chain x is always float32 in NCHW memory order, whatever memory format or dtype the
model runs in, so the seed alone fixes the NOISE: it is the same for any batch_size, graph or eager, and on the CPU
and CUDA (to ops.noise.NOISE_ERROR_BOUND). The IMAGES are bitwise equal for the same seed, device and batch_size
(graph == eager included); across batch sizes only for a model whose per-sample output does not depend on the
batch (elementwise models); a U-Net's convolutions round differently per batch size (cuDNN/cuBLAS choose their
algorithms by shape on a GPU, oneDNN blocks by shape on a CPU), so its images agree to that rounding, which a long
chain amplifies; likewise between CPU and CUDA.
"""
import contextlib
import json
import logging
import time

import torch
from torch import nn

from . import graphs
from .args import resolve
from .compiled import compiled_for
from ..threads import using_threads
from .loop import Statics, load_labels, load_x_T, model_to_run, run_loop

log = logging.getLogger("ddpm_fast")

_LAST_INFO = {}


# ---- the public API ---------------------------------------------------------------------------------------

def sample(model, n, steps=None, *, shape=None, schedule=None, prediction=None, variance=None, sampler=None,
           eta=None, clip=None, seed=None, device=None, dtype=None, batch_size=None, cuda_graph="auto",
           progress=True, spacing=None, graph="auto", memory_format="auto", generator=None, start=0,
           threads="auto", x_T=None, labels=None, guidance_scale=None, compile=False):
    """Draws ``n`` images from a diffusion model: returns (n, C, H, W) float32 on ``device``, in [-1, 1] when
    ``clip`` (the final x_0 is clipped); with clip=False the raw final x_0.

    :param model: ``model(x_t, t) -> output``, t an int64 (B,) tensor of ORIGINAL training timesteps; output
        (B, C, H, W), or (B, 2C, H, W) with a learned variance (the second half is ignored by fixed variances);
        an object carrying that tensor as ``.sample`` (diffusers' UNet2DOutput) or as a tuple's first element
        is unwrapped. A ddpm_fast UNet (or a loaded checkpoint) supplies shape, schedule, prediction, variance
        and clip from ``model.diffusion``; any other module needs ``shape`` and ``schedule``, and prediction /
        variance / clip default to "eps" / "fixed_small" / True. A diffusers DDPMPipeline, DDIMPipeline (or a
        pipeline with a DPMSolverMultistep / UniPCMultistep scheduler) supplies its unet, its scheduler's
        schedule, prediction, variance and clip, and the sampler its scheduler implies, with the scheduler's
        timestep spacing and steps_offset (``sampling/pipelines.py``). The model runs in eval mode (restored
        afterwards).
    :param steps: None = the sampler's default (diffusion.config.DEFAULT_STEPS: all T steps for "ddpm"); fewer
        than T respace the schedule (``schedule.respace(steps, spacing)``; "logsnr" may merge a few near t = 0).
    :param spacing: None = the sampler's default (DEFAULT_SPACING; a pipeline's: its scheduler's), or
        "linspace", "leading", "trailing", "logsnr" (see ``NoiseSchedule.respace``).
    :param schedule: the TRAINING ``NoiseSchedule`` (a respaced one, e.g. ``respace(timesteps=[...])``, is used
        as is when steps is None).
    :param sampler: None = "ddpm" (or a pipeline's), "ddpm" (ancestral), "ddim" (with ``eta`` >= 0, default 0;
        eta = 1 has DDPM's posterior variance), or a few-step solver: "dpmpp_2m", "dpmpp_3m" (DPM-Solver++
        multistep, orders 2 and 3), "dpmpp_2m_sde" (its stochastic variant, noise from the seed's Philox stream),
        "unipc" (UniPC bh2 with its corrector). The solvers step on the unclipped data prediction; ``clip`` then
        only clamps the final images.
    :param x_T: optional (n, C, H, W) starting noise (any float dtype and device) instead of drawing it from the
        seed: to reproduce another tool's run, interpolate between noises, or (with a schedule whose first
        timestep is below T) start from a partly noised image. Chunks take their rows.
    :param seed: int in [0, 2**64): the same seed gives the same noise for any batch_size, with or without
        graphs, on any device, and bitwise the same images for the same device, thread count and batch_size;
        other batch sizes give a U-Net's images up to its convolutions' batch-dependent rounding (see the module
        doc). None draws one from torch's global RNG (so ``torch.manual_seed`` makes the call reproducible).
    :param device, dtype: default to the model's. dtype is the MODEL's compute dtype: its own dtype runs as is,
        float16/bfloat16 with float32 weights runs under torch.autocast; the chain stays float32 throughout.
    :param batch_size: samples per chunk (default min(n, 256)); chunk k starts at element k*batch_size*C*H*W.
    :param cuda_graph: "auto" (graphs on CUDA when no generator is given), True (must capture), False.
    :param graph: "auto" | "whole" (the whole loop in one graph) | "step" (one step's graph replayed).
        "auto" captures the whole loop when steps * batch <= graphs.WHOLE_GRAPH_MAX (one graph then serves
        every chunk of that size), one step otherwise, and falls back to the next kind (then eager) when a
        capture fails.
    :param memory_format: the model input's: "auto" (see ``choose_channels_last``), "contiguous", "channels_last".
    :param generator: a torch.Generator on ``device`` instead of ``seed``: diffusers' noise convention (x_T and
        each step's noise drawn with torch.randn), for parity with DDPMPipeline; eager only, and chunks continue
        one stream (so chunked != unchunked).
    :param progress: a tqdm bar over steps of all chunks; False silences it.
    :param start: index of this call's first image in a longer run with the same seed: image i of the call is
        image start + i of that run (element offset (start + i) * C*H*W). So the chunks of one run can be drawn
        by separate calls, processes or machines: ``sample(m, 10, batch_size=4, seed=s)`` equals
        ``sample(m, 4, start=0, batch_size=4, seed=s)``, ``sample(m, 4, start=4, ...)`` and
        ``sample(m, 2, start=8, ...)`` concatenated, bitwise on one device and thread count (each chunk keeps the
        batch size, so the model rounds the same way). Not with ``generator``. ``ddpm_fast.sample_to_dir``
        draws a long run this way.
    :param threads: CPU threads during the call: "auto" (one thread for a small model -- parameters x pixels x
        batch below ``ddpm_fast.threads.SMALL_WORK``, such as the bundled digits model --, else torch's
        setting), an int, or None (torch's setting). torch's setting is restored afterwards. Images of a seed
        are reproducible for a given thread count.
    :param labels: class labels of a class-conditional model (a ddpm_fast UNet with ``num_classes`` K, or a module
        with an int ``null_label`` called as ``model(x_t, t, y)``): an int (every image of that class), a
        sequence or tensor of n ints 0..K-1 (K, the null label: that image unconditional), or None
        (unconditional). Chunks take their rows.
    :param guidance_scale: classifier-free guidance's w with ``labels`` (default
        ``conditioning.DEFAULT_GUIDANCE_SCALE``): each step uses u + w (c - u) of the conditional and unconditional
        predictions. w = 0 is the unconditional model and w = 1 the conditional one, with no guidance work; this
        w is Ho & Salimans' w + 1. Any other w runs both as ONE model call on 2B samples and combines them inside
        the fused step kernel, w read from device memory (one CUDA graph serves every w and every labels).
    :param compile: False (default); True or a torch.compile mode ("default", "max-autotune-no-cudagraphs") runs
        the model's forward compiled by torch.compile (inductor; on the CPU inductor fuses GroupNorm+SiLU
        itself, measured faster than a call of ddpm_fast's op per site: docs/compile.md; the fused step stays
        ddpm_fast's, and on CUDA the compiled model runs inside the whole-loop graph). Compiled once per architecture, batch size, dtype and memory format, before the first chunk,
        and cached across calls (``last_run_info()["compiles"]``: what this call compiled, with the time).
        Modes with inductor's own CUDA graphs ("reduce-overhead", "max-autotune") are refused. A model that
        cannot be compiled (e.g. a graph break) raises RuntimeError. "auto": compile where it measured to pay
        off (``sampling.args.choose_compile``); a model that cannot be compiled then falls back with one warning.
    """
    t_start = time.perf_counter()
    job = resolve(model, n, steps, shape=shape, schedule=schedule, prediction=prediction, variance=variance,
                  sampler=sampler, eta=eta, clip=clip, seed=seed, device=device, dtype=dtype,
                  batch_size=batch_size, cuda_graph=cuda_graph, progress=progress, spacing=spacing, graph=graph,
                  memory_format=memory_format, generator=generator, start=start, threads=threads, x_T=x_T,
                  labels=labels, guidance_scale=guidance_scale, compile=compile)
    info = {"device": str(job.plan.device), "n": job.n, "start": job.start, "batch_size": job.plan.batch,
            "chunks": len(job.chunks),
            "steps": job.schedule.num_steps, "sampler": job.plan.sampler, "seed": job.seed,
            "dtype": str(job.plan.dtype), "autocast": job.plan.autocast, "channels_last": job.plan.channels_last,
            "conditioning": job.plan.conditioning, "guidance_scale": job.guidance_scale,
            "modes": [], "captures": [], "cache_hits": 0, "compile": job.compile, "compiles": [],
            "compile_error": None}
    C, H, W = job.plan.shape
    result = torch.empty((job.n, C, H, W), device=job.plan.device)  # a normal tensor, not an inference tensor
    with _eval_mode(job.model), torch.inference_mode(), using_threads(job.threads):
        info["threads"] = torch.get_num_threads()
        _run(job, result, info)
    if job.plan.device.type == "cuda":
        torch.cuda.synchronize(job.plan.device)
    info["wall_s"] = time.perf_counter() - t_start
    info["compile_s"] = sum(c["compile_s"] for c in info["compiles"])
    _LAST_INFO.clear()
    _LAST_INFO.update(info)
    return result


def last_run_info():
    """What the last ``sample`` call did (a copy): device, n, start, batch_size, chunks, steps, seed, dtype,
    autocast, channels_last, conditioning ("none" | "labels" | "guided") and guidance_scale, modes (per chunk: "eager" | "graph-whole" | "graph-step"), captures (per capture:
    mode, batch, steps, offset_mod4, capture_s, graph_bytes = device memory the capture took, pool_bytes = its
    memory-pool growth),
    cache_hits (chunks that replayed a cached graph), compile (the torch.compile mode, or None), compiles (per
    batch size compiled in this call: mode, batch, compile_s = the warm-up model call that compiled, new_graphs =
    graphs dynamo compiled, 0 when one compiled before for the same architecture and input was reused),
    compile_s (their sum), compile_error (why compile="auto" fell back, else None), wall_s (the call,
    synchronized; compile_s included)."""
    return json.loads(json.dumps(_LAST_INFO, default=str))



def _run(job, result, info):
    """Every chunk (graph or eager) into result[start:start+b]; one finiteness check (one sync) at the end."""
    from tqdm.auto import tqdm
    plan, steps = job.plan, job.schedule.num_steps
    C, H, W = plan.shape
    use_graphs = job.generator is None and job.cuda_graph is not False and graphs.BACKEND.available(plan.device)
    model = compiled_for(job, model_to_run(job), info)
    finite, statics = [], {}
    with tqdm(total=len(job.chunks) * steps, disable=not job.progress, desc="ddpm_fast.sample", unit="step",
              dynamic_ncols=True) as bar:
        for k, (start, b) in enumerate(job.chunks):
            chunk_plan, offset = plan.with_batch(b), (job.start + start) * C * H * W
            mode, x = None, None
            if use_graphs:
                mode, x = graphs.run_chunk_graph(job, model, chunk_plan, offset, bar, info, start)
            if mode is None:
                st = statics.get(b) or statics.setdefault(b, Statics(chunk_plan, job.schedule))
                st.set_seed(job.seed or 0)
                st.set_offset(offset)
                load_x_T(st, job.x_T, start)
                load_labels(st, job, start)
                run_loop(model, st, chunk_plan, job.generator, bar)
                mode, x = "eager", st.x
            log.debug("ddpm_fast.sample: chunk %d/%d (samples %d..%d) ran %s", k + 1, len(job.chunks), start,
                      start + b - 1, mode)
            info["modes"].append(mode)
            finite.append(torch.isfinite(x).all())  # before the clamp, which would hide an inf
            out = result[start:start + b].copy_(x)
            if plan.clip:
                out.clamp_(-1.0, 1.0)  # x0 was clipped; this only removes the last coefficient's rounding
    _check_finite(torch.stack(finite).cpu(), job)


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
