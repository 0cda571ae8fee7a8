"""sample(compile=...): the model the loop calls, through torch.compile, compiled before the first chunk runs.

``compiled_for(job, model, info)`` wraps the module ``model_to_run`` chose (a UNet's channels_last twin, or the
model) in its cached ``compiler.CompiledModel`` and runs one warm-up model step per chunk size not compiled yet,
exactly as the loop calls the model (same input buffer layout, dtype, autocast, precomputed time projections), so
dynamo compiles there and never inside the loop or a CUDA-graph capture; the warm-up's time is the call's
``compile_s`` (it includes one forward). The fused step stays ddpm_fast's. On CUDA the compiled model runs inside
the whole-loop graph like any other model (inductor's own CUDA graphs are off).

A model that cannot be compiled (a graph break, an op inductor cannot lower, no C++ compiler for inductor's CPU
code) is an error when compile was asked for explicitly (True or a mode); with compile="auto" the call falls back
to the uncompiled model with one warning naming the reason, and later calls skip compiling that model.
"""
import time
import warnings

import torch

from .. import compiler
from .loop import Statics, init_x, model_step, refresh_time_proj


def _input_key(plan):
    """What the compiled forward's guards see of a plan: device, the model's batch (2B when guided), how it is
    called (conditioning), image shape, dtype, autocast, memory format."""
    return plan.device, plan.model_batch, plan.conditioning, plan.shape, plan.dtype, plan.autocast, plan.channels_last


def compiled_for(job, model, info):
    """The model to run: ``model`` itself when job.compile is None or compiling failed under "auto", else its
    CompiledModel, compiled for every chunk size of the job. Appends one record per warm-up to
    info["compiles"] (batch, compile_s, new_graphs: graphs dynamo compiled; 0 = one compiled before was reused)."""
    if job.compile is None:
        return model
    try:
        handle = compiler.compiled_model(model, job.compile)
    except TypeError as err:  # a callable that cannot be weakly referenced (the handle cache holds models weakly)
        return _cannot_compile(job, model, None, err, info)
    if handle.failed:
        if job.compile_explicit:  # an earlier compile="auto" call found it cannot be compiled: still an error
            raise RuntimeError(f"the model cannot be compiled with torch.compile (mode {job.compile!r}, as one "
                               f"graph): {handle.failed}; sample it with compile=False")
        info["compile_error"] = handle.failed
        return model
    for b in sorted({b for _, b in job.chunks}, reverse=True):
        plan = job.plan.with_batch(b)
        if _input_key(plan) in handle.ready:
            continue
        try:
            record = _warm_up(handle, plan, job.schedule)
        except Exception as err:  # noqa: BLE001 -- whatever compiling raised: reported or re-raised below
            return _cannot_compile(job, model, handle, err, info)
        handle.ready.add(_input_key(plan))
        info["compiles"].append(record)
    return handle


def _warm_up(handle, plan, schedule):
    """One model step of ``plan`` on scratch buffers through the compiled model -> the compile record."""
    st = Statics(plan, schedule)
    st.set_seed(0)
    st.set_offset(0)
    init_x(st)
    graphs, t0 = compiler.unique_graphs(), time.perf_counter()
    refresh_time_proj(handle, st, plan)
    last = st.t.shape[0] - 1
    model_step(handle, st, plan, last, st.t[last], {"seed": st.seed})
    if plan.device.type == "cuda":
        torch.cuda.synchronize(plan.device)
    return {"mode": handle.mode, "batch": plan.batch, "model_batch": plan.model_batch, "compile_s": time.perf_counter() - t0,
            "new_graphs": compiler.unique_graphs() - graphs}


def _cannot_compile(job, model, handle, err, info):
    reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    if job.compile_explicit:
        raise RuntimeError(f"the model cannot be compiled with torch.compile (mode {job.compile!r}, as one graph): "
                           f"{reason}; sample it with compile=False") from err
    if handle is not None:
        handle.failed = reason
    info["compile_error"] = reason
    warnings.warn(f"ddpm_fast.sample: compile='auto' could not compile the model, sampling it uncompiled: "
                  f"{reason}", RuntimeWarning, stacklevel=4)
    return model
