"""CUDA graphs for ddpm_fast.sample: the whole reverse loop in one graph, or one step's graph replayed.

"whole": x_T (Philox from the static seed and offset tensors, or a copy of the caller's x_T from a static buffer)
    and every step (model + the fused step: p_step, or solver_step with the solver's history in static buffers;
    each node baking its own step index and coefficients) captured once; a chunk writes its seed, element offset
    (and x_T, its class labels and the guidance scale) into the static tensors and replays: one launch for the
    entire chain.
"step": one step (timesteps gathered by a static step-index tensor, model, the fused step reading the step index
    from device memory) captured once and replayed ``steps`` times after writing the index; x_T is drawn eagerly.
The kernels read the chunk's element offset from device memory and take only its residue mod 4 as a launch
argument, so ONE graph serves every chunk of a plan (a plan fixes the chunk's batch size) whose offset has the
same residue: chunk k starts at k * B*C*H*W, a multiple of 4 whenever H and W are even (every real image size),
so a 50,000-image run captures once per chunk size (at most 4 times for other sizes).

Cache: up to MAX_PLANS (model, SamplePlan) entries, least recently used evicted; each holds the static buffers,
one memory pool shared by its graphs (they never run concurrently and their outputs are the static buffers), and
up to MAX_GRAPHS_PER_PLAN graphs keyed by (kind, offset % 4). An entry is dropped when its model is garbage
collected and recaptured when the model's parameters or buffers moved (different data pointers, e.g. after .to()).
In-place weight updates (training, load_state_dict) are seen by cached graphs: they read the same memory.
"""
import contextlib
import itertools
import logging
import time
import warnings
import weakref
from collections import OrderedDict

import torch

from ..ops import device as _device
from ..ops.solver_step import SolverState
from .loop import (Statics, call_model, check_model_output, fused_step, init_x, load_labels, load_x_T,
                   model_input, model_step, refresh_time_proj, run_loop)

log = logging.getLogger("ddpm_fast")

WHOLE_GRAPH_MAX = 2 ** 16   # "auto" captures the whole loop only while steps * batch <= this (see below; batch:
                            # the model's, 2B with classifier-free guidance)
# Why steps * batch: the whole-loop graph removes per-launch CPU overhead, which matters when the GPU work per
# step is small (small batch); its capture costs time and graph memory roughly proportional to steps (~hundreds
# of nodes per step). At large steps * batch the GPU is busy anyway and a one-step graph gets nearly all of the
# speed-up with a capture that is `steps` times cheaper. 2**16 covers 1000 steps at batch 64 and 100 steps at
# batch 655. The number of chunks does not matter: one graph serves them all. The GPU suite measures capture
# time and graph memory at 100 and 1000 steps (benchmarks/gpu_suite.sh), the data to revisit this bound with.
MAX_PLANS = 4
MAX_GRAPHS_PER_PLAN = 8     # (kind, offset % 4): 2 kinds x 4 residues, the most one plan can need
WARMUP_ITERS = 3            # eager iterations on a side stream before capture (Triton JIT, cuDNN/cuBLAS init)

_CACHE = OrderedDict()      # (id(model), SamplePlan) -> _Entry
_DEAD = set()               # ids of collected models whose entries are still to be dropped


class _Entry:
    def __init__(self, model, plan, schedule):
        self.model_ref = weakref.ref(model)
        self.fingerprint = _fingerprint(model)
        self.statics = Statics(plan, schedule)
        self.pool = BACKEND.pool()
        self.graphs = OrderedDict()   # (kind, offset % 4) -> torch.cuda.CUDAGraph


def _fingerprint(model):
    """Data pointers of the model's parameters and buffers: a captured graph reads exactly these addresses."""
    if not isinstance(model, torch.nn.Module):
        return ()
    return tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers()))


def clear_graph_cache():
    """Drops every cached graph and its buffers (their memory returns to PyTorch's caching allocator)."""
    _CACHE.clear()


def _drop_model(model_id):
    """Finalizer of a model with cached graphs. It may run inside a garbage collection triggered anywhere, even
    while this module iterates _CACHE: so it only records the id, then purges if the cache is not in use."""
    _DEAD.add(model_id)
    _purge()


def _purge():
    try:
        dead = [k for k, e in list(_CACHE.items()) if k[0] in _DEAD and e.model_ref() is None]
    except (RuntimeError, KeyError):  # _CACHE changed under us: the next _entry() call purges
        return
    for key in dead:
        _CACHE.pop(key, None)
    _DEAD.difference_update({k[0] for k in dead})


def _entry(model, plan, schedule):
    _purge()
    key = (id(model), plan)
    entry = _CACHE.get(key)
    if entry is not None and (entry.model_ref() is not model or entry.fingerprint != _fingerprint(model)):
        log.debug("ddpm_fast.sample: the model's tensors moved since capture; recapturing")
        del _CACHE[key]
        entry = None
    if entry is None:
        entry = _CACHE[key] = _Entry(model, plan, schedule)
        weakref.finalize(model, _drop_model, id(model))
        while len(_CACHE) > MAX_PLANS:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return entry


def _kinds(job, plan):
    """The graph kinds to try, in order."""
    if job.graph == "whole":
        return ["whole", "step"]
    if job.graph == "step":
        return ["step"]
    whole_ok = job.schedule.num_steps * plan.model_batch <= WHOLE_GRAPH_MAX
    return ["whole", "step"] if whole_ok else ["step"]


def run_chunk_graph(job, model, plan, offset, bar, info, start=0):
    """Runs one chunk (element ``offset``; ``start``: its first row of the call's x_T, if any) of ``model``
    (job.model or its channels_last twin) from a cached or new graph -> (mode, x), or (None, None) to run it
    eagerly."""
    try:
        weakref.ref(model)
    except TypeError:
        return _refuse(job, "the model cannot be weak-referenced, so its graphs cannot be cached")
    entry = _entry(model, plan, job.schedule)
    st, errors = entry.statics, []
    st.set_seed(job.seed)
    st.set_offset(offset)  # before a capture too: warm-up and capture run with this chunk's offset
    load_x_T(st, job.x_T, start)
    load_labels(st, job, start)
    for kind in _kinds(job, plan):
        key = (kind, st.offset_mod4)
        graph = entry.graphs.get(key)
        if graph is not None:
            entry.graphs.move_to_end(key)
            info["cache_hits"] += 1
        else:
            graph, err = _capture(model, entry, plan, kind, info)
            if graph is None:
                errors.append(f"{kind}: {err}")
                continue
        _replay(graph, model, st, plan, kind, bar)
        return f"graph-{kind}", st.x
    return _refuse(job, "; ".join(errors))


def _refuse(job, why):
    if job.cuda_graph is True:
        raise RuntimeError(f"cuda_graph=True but no CUDA graph could be captured: {why}")
    warnings.warn(f"ddpm_fast.sample: CUDA graph capture failed, sampling eagerly (slower): {why}",
                  RuntimeWarning, stacklevel=5)
    return None, None


def _replay(graph, model, st, plan, kind, bar):
    """Replays a graph for the chunk whose seed and offset are in st (written by the caller; a capture's warm-up
    overwrote st.x and st.step, never those)."""
    if kind == "whole":
        graph.replay()
        bar.update(st.t.shape[0])
        return
    init_x(st)
    refresh_time_proj(model, st, plan)
    for i in reversed(range(st.t.shape[0])):
        st.step.fill_(i)  # a device-side fill on the current stream: no sync
        graph.replay()
        bar.update(1)


def _step_body(model, st, plan):
    torch.index_select(st.t, 0, st.step, out=st.t_step.view(1, -1))
    model_step(model, st, plan, st.step, st.t_step, {"seed": st.seed})


def _warm_up(model, st, plan, kind):
    """Compiles the Triton kernels and initialises cuDNN/cuBLAS on a side stream, with the exact kernels the
    capture will record (step baked vs read from memory); also checks the model's output shape before capture."""
    with BACKEND.side_stream(st.x.device):
        init_x(st)
        refresh_time_proj(model, st, plan)
        last = st.t.shape[0] - 1
        for it in range(WARMUP_ITERS):
            if kind == "whole":
                model_step(model, st, plan, last if it % 2 == 0 else 0, st.t[last], {"seed": st.seed})
            else:
                st.step.fill_(last if it % 2 == 0 else 0)
                _step_body(model, st, plan)
        if kind == "whole":
            _warm_up_baked_steps(model, st, plan)


def _warm_up_baked_steps(model, st, plan):
    """Triton specialises integer arguments (== 1, divisible by 16): a graph that bakes every step index into its
    fused-step nodes needs each variant compiled BEFORE capture. Running the step once per step index on a scratch
    copy (of x and of a solver's history) costs ~steps tiny launches and covers whatever rule the installed Triton
    applies."""
    scratch = st.x.clone()
    state = None if st.state is None else SolverState(*(None if t is None else t.clone() for t in (
        st.state.h1, st.state.h2, st.state.last)))
    out = check_model_output(call_model(model, st, plan, model_input(st, scratch), 0, st.t[0]), plan)
    for i in range(st.t.shape[0]):
        fused_step(st, plan, out, i, {"seed": st.seed}, x=scratch, state=state)


def _capture(model, entry, plan, kind, info):
    """(graph, None) or (None, error text) for the offset residue in entry.statics. Records capture time and the
    device memory it took."""
    st = entry.statics
    _warm_up(model, st, plan, kind)  # errors here (a wrong model output) are the caller's, not capture's
    dev = st.x.device
    BACKEND.synchronize(dev)
    (free0, pool0), t0 = BACKEND.memory(dev), time.perf_counter()
    body = (lambda: run_loop(model, st, plan)) if kind == "whole" else (lambda: _step_body(model, st, plan))
    try:
        graph = BACKEND.capture(body, entry.pool, kind, dev)
    except Exception as err:  # noqa: BLE001 -- any capture failure falls back to the next kind
        log.debug("ddpm_fast.sample: %s-loop capture failed: %r", kind, err)
        BACKEND.synchronize(dev)
        return None, f"{type(err).__name__}: {err}"
    seconds = time.perf_counter() - t0
    free1, pool1 = BACKEND.memory(dev)
    record = {"mode": kind, "batch": plan.batch, "steps": st.t.shape[0], "offset_mod4": st.offset_mod4,
              "capture_s": seconds, "graph_bytes": free0 - free1, "pool_bytes": pool1 - pool0}
    info["captures"].append(record)
    log.debug("ddpm_fast.sample: captured a %s graph (batch %d, %d steps, offset %% 4 = %d) in %.3f s, %.1f MiB",
              kind, plan.batch, st.t.shape[0], st.offset_mod4, seconds, record["graph_bytes"] / 2 ** 20)
    entry.graphs[(kind, st.offset_mod4)] = graph
    while len(entry.graphs) > MAX_GRAPHS_PER_PLAN:
        entry.graphs.popitem(last=False)
    return graph, None


class CudaGraphBackend:
    """Every CUDA call this module makes, in one place. The CPU test suite swaps in a stand-in whose "graph"
    replays by re-running the captured body, to exercise caching, fallbacks and replay semantics without a GPU."""

    def available(self, device):
        return device.type == "cuda"

    def pool(self):
        return torch.cuda.graph_pool_handle()

    @contextlib.contextmanager
    def side_stream(self, device):
        with _device.on_device(device):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                yield
            torch.cuda.current_stream(device).wait_stream(side)

    def synchronize(self, device):
        torch.cuda.synchronize(device)

    def memory(self, device):
        """(free device bytes as the driver sees them, bytes reserved by PyTorch's allocator)."""
        return torch.cuda.mem_get_info(device)[0], torch.cuda.memory_reserved(device)

    def capture(self, body, pool, kind, device):
        """A torch.cuda.CUDAGraph of body() on ``device`` in the shared memory pool; raises if capture fails."""
        return _device.capture_graph(body, device, pool)


BACKEND = CudaGraphBackend()
