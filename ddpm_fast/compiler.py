"""torch.compile of a model's forward, the way sampling and training use it: the modes ddpm_fast accepts, and one
compiled forward shared by every module.

Modes: "default" and "max-autotune-no-cudagraphs" (inductor without its own CUDA graphs). "reduce-overhead" and
"max-autotune" add inductor's CUDA graphs, which would clash with ddpm_fast's own (the whole sampling loop or the
whole training step in one graph), so they are refused; inductor's CUDA graphs are switched off in the options
passed, whatever the global inductor config says. ddpm_fast's fused ops are ``torch.library`` custom ops with fake
kernels, so inductor can keep each as one node of its graph (and call the same kernel eager code calls); on the
CPU, a graph without gradients gets GroupNorm+SiLU as plain ops that inductor fuses itself, which measured faster
(ops/group_norm_silu.py: COMPILED_CPU_INFERENCE).

Sampling compiles ``forward(module, x, t, **kw) = module(x, t, **kw)`` once per mode, with the module as an
ARGUMENT: dynamo lifts the parameters to graph inputs, so every module of the same architecture, input shape,
dtype and memory format shares one compiled graph (a second model, or the channels_last twin rebuilt after
``.to()``, costs no compile), in-place weight updates are seen, and nothing here keeps a module alive.
``CompiledModel`` is the module-shaped handle the sampling loop and its graph cache call. ``fullgraph=True``: a
model that breaks the graph is reported as one that cannot be compiled (the caller falls back or raises).
"""
import inspect
import weakref

import torch
from torch import nn

MODES = ("default", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
BACKEND = "inductor"     # tests swap in a stand-in (e.g. a counting "eager" backend): see tests/sampling
RECOMPILE_LIMIT = 64     # per compiled forward: every (architecture, batch, dtype, layout) is one entry

_FORWARDS = {}           # (mode, backend) -> the compiled forward


def check_mode(value, name="compile"):
    """The torch.compile mode of a ``compile=`` argument: False / None -> None, True -> "default", a mode of
    MODES -> itself. CUDA-graph modes and anything else raise ValueError (TypeError for a non-bool non-str)."""
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if not isinstance(value, str):
        raise TypeError(f"{name} must be True, False or a torch.compile mode {MODES}, got {value!r}")
    if value in CUDA_GRAPH_MODES:
        raise ValueError(f"{name}={value!r} adds inductor's own CUDA graphs, which would clash with ddpm_fast's "
                         f"(the whole loop or step is captured as one graph already); use {name}=True or "
                         f"{name}='max-autotune-no-cudagraphs'")
    if value not in MODES:
        raise ValueError(f"{name} must be True, False or one of {MODES}, got {value!r}")
    return value


def inductor_options(mode):
    """inductor's options of ``mode`` with its CUDA graphs off (a global ``triton.cudagraphs=True`` included)."""
    import torch._inductor
    return {**torch._inductor.list_mode_options(mode), "triton.cudagraphs": False}


def compile_kwargs(mode, backend=None):
    """torch.compile's keyword arguments for ``mode``: static shapes, and inductor's options without CUDA
    graphs (other backends take no options)."""
    backend = BACKEND if backend is None else backend
    kw = {"dynamic": False, "backend": backend}
    if backend == "inductor":
        kw["options"] = inductor_options(mode)
    return kw


def _forward(module, x, t, *args, **kw):
    return module(x, t, *args, **kw)


def compiled_forward(mode):
    """The compiled ``forward(module, x, t, *args, **kw)`` of ``mode`` (one per mode and backend, made on first
    use)."""
    key = (mode, BACKEND if isinstance(BACKEND, str) else id(BACKEND))
    if key not in _FORWARDS:
        kw = compile_kwargs(mode)
        if "recompile_limit" in inspect.signature(torch.compile).parameters:  # torch >= 2.13
            kw.update(recompile_limit=RECOMPILE_LIMIT, isolate_recompiles=True)
        else:  # older torch: dynamo's global limit (default 8) would make the 9th input a hard failure
            _raise_global_recompile_limit()
        _FORWARDS[key] = torch.compile(_forward, fullgraph=True, **kw)
    return _FORWARDS[key]


def _raise_global_recompile_limit():
    import torch._dynamo
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name) and getattr(torch._dynamo.config, name) < RECOMPILE_LIMIT:
            setattr(torch._dynamo.config, name, RECOMPILE_LIMIT)


class CompiledModel(nn.Module):
    """``module`` called through the compiled forward of ``mode``. Its parameters() and buffers() are the
    module's (a graph cache fingerprints them); ``_orig_mod`` is the module, as in torch.compile's own wrapper,
    so code that looks for a ddpm_fast UNet finds it. Holds the module weakly: ``compiled_model`` caches this
    handle per module, and the cache must not keep the module alive."""

    def __init__(self, module, mode):
        super().__init__()
        object.__setattr__(self, "_module", weakref.ref(module))
        self.mode = mode
        self.ready = set()  # the input keys compiled (or found compiled) for this module: see sampling
        self.failed = None  # why compiling failed, once it has (sampling's compile="auto" then skips it)

    @property
    def _orig_mod(self):
        return self._module()

    def parameters(self, recurse=True):
        module = self._orig_mod
        return module.parameters(recurse) if isinstance(module, nn.Module) else iter(())

    def buffers(self, recurse=True):
        module = self._orig_mod
        return module.buffers(recurse) if isinstance(module, nn.Module) else iter(())

    def forward(self, x, t, *args, **kw):  # *args: a conditional model's labels (sampling/loop.call_model)
        return compiled_forward(self.mode)(self._orig_mod, x, t, *args, **kw)


_HANDLES = weakref.WeakKeyDictionary()  # module -> {(mode, backend): CompiledModel}


def compiled_model(module, mode):
    """The (cached) CompiledModel of ``module`` in ``mode``: the same object on every call, so graphs captured
    on it are found again."""
    backend = BACKEND if isinstance(BACKEND, str) else id(BACKEND)
    handles = _HANDLES.setdefault(module, {})
    if (mode, backend) not in handles:
        handles[(mode, backend)] = CompiledModel(module, mode)
    return handles[(mode, backend)]


def unique_graphs():
    """How many graphs dynamo has compiled in this process (its own counter; 0 where it has none)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover -- torch without dynamo
        return 0
    return int(counters["stats"].get("unique_graphs", 0))
