"""sample(compile=...): the model's forward through torch.compile, compiled once per architecture and input
(batch, dtype, memory format) and cached across calls, ddpm_fast's GroupNorm+SiLU kept as one graph node per site,
the fused step ddpm_fast's, CUDA-graph capture of the compiled model (CPU stand-in), fallbacks and errors.

Most tests compile with dynamo's counting "eager" backend in place of inductor (``compiler.BACKEND``): dynamo
traces, guards and recompiles exactly as for inductor, in seconds instead of tens of seconds, and its graphs
run the same kernels as the uncompiled model, so compiled and uncompiled images agree bitwise. One test compiles
with inductor itself (a micro U-Net, ~15 s on 2 cores) and checks every sampler against the uncompiled run.
"""
import warnings

import pytest
import torch
from torch import nn

import ddpm_fast
from ddpm_fast import NoiseSchedule, UNet, compiler
from ddpm_fast.diffusion import SAMPLERS
from ddpm_fast.sampling import args as sample_args
from ddpm_fast.sampling import graphs as sampler_graph
from ddpm_fast.sampling import last_run_info

from fake_graphs import ReplayBody

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
MICRO = dict(ch=8, ch_mult=(1,), num_groups=4)  # 1 level at 8x8: 5 ResBlocks, 4 attention blocks


def micro_unet(**overrides):
    torch.manual_seed(0)
    return UNet.preset("tiny", **{**MICRO, **overrides})


@pytest.fixture(scope="module")
def counter():
    """Dynamo's counting "eager" backend, one for the module (so its compiled graphs are shared by the tests)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    return CompileCounterWithBackend("eager")


@pytest.fixture
def counting(counter, monkeypatch):
    """compiler.BACKEND = the counting backend for the test; frame_count = graphs compiled. The compiled CPU
    graph keeps ddpm_fast's GroupNorm+SiLU op (COMPILED_CPU_INFERENCE = "op"): the eager backend then runs the
    uncompiled model's kernels, so images agree bitwise (the default, "inductor", has inductor fuse the plain
    ops: close, not bitwise; tested with inductor below)."""
    from ddpm_fast.ops import group_norm_silu as gns
    monkeypatch.setattr(compiler, "BACKEND", counter)
    monkeypatch.setattr(gns, "COMPILED_CPU_INFERENCE", "op")
    return counter


def _sample(model, n=3, steps=4, **kw):
    return ddpm_fast.sample(model, n, steps, progress=False, **kw)


# ---- arguments --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, error, match", [
    ("reduce-overhead", ValueError, "adds inductor's own CUDA graphs, which would clash"),
    ("max-autotune", ValueError, "adds inductor's own CUDA graphs, which would clash"),
    ("fast", ValueError, "compile must be True, False or one of"),
    (1, TypeError, "compile must be True, False or a torch.compile mode"),
])
def test_bad_compile_values_fail_before_any_work(value, error, match):
    model = micro_unet()
    with pytest.raises(error, match=match):
        _sample(model, compile=value)


def test_modes_and_inductor_options():
    assert compiler.check_mode(True) == "default" and compiler.check_mode(False) is None
    assert compiler.check_mode("max-autotune-no-cudagraphs") == "max-autotune-no-cudagraphs"
    for mode in compiler.MODES:
        options = compiler.compile_kwargs(mode, backend="inductor")["options"]
        assert options["triton.cudagraphs"] is False  # whatever the global inductor config says
    assert compiler.compile_kwargs("max-autotune-no-cudagraphs", backend="inductor")["options"]["max_autotune"]
    assert sample_args.resolve(micro_unet(), 2, 3, compile="auto").compile is None  # "auto": see choose_compile
    job = sample_args.resolve(micro_unet(), 2, 3, compile="max-autotune-no-cudagraphs")
    assert job.compile == "max-autotune-no-cudagraphs" and job.compile_explicit


# ---- the cache: one compile per architecture and input ----------------------------------------------------

def test_one_compile_for_repeated_calls_and_a_recompile_for_a_new_shape(seed, counting):
    model = micro_unet()
    before = counting.frame_count
    plain = _sample(model, seed=seed)
    first = _sample(model, seed=seed, compile=True)
    info = last_run_info()
    assert counting.frame_count == before + 1 and info["compile"] == "default"
    assert [(c["batch"], c["new_graphs"]) for c in info["compiles"]] == [(3, 1)] and info["compile_s"] > 0
    assert torch.equal(first, plain)  # the eager backend runs the same kernels: bitwise
    again = _sample(model, seed=seed + 1, compile=True, sampler="ddim")  # same input: no compile, no warm-up
    assert counting.frame_count == before + 1 and last_run_info()["compiles"] == []
    assert torch.equal(again, _sample(model, seed=seed + 1, sampler="ddim"))
    _sample(model, n=5, batch_size=2, seed=seed, compile=True)  # chunks of 2, 2, 1: two new batch sizes
    assert counting.frame_count == before + 3
    assert sorted(c["batch"] for c in last_run_info()["compiles"]) == [1, 2]
    _sample(model, seed=seed, compile=True, dtype=torch.bfloat16)  # autocast: a new input
    assert counting.frame_count == before + 4
    assert _sample(model, seed=seed).shape == (3, 1, 8, 8) and last_run_info()["compile"] is None


def test_models_of_one_architecture_share_the_graph_and_weights_are_read_live(seed, counting):
    a, b = micro_unet(), micro_unet()
    with torch.no_grad():
        b.conv_out.bias.add_(0.5)
    _sample(a, seed=seed, compile=True)
    before = counting.frame_count
    got = _sample(b, seed=seed, compile=True)
    assert counting.frame_count == before  # b's own warm-up, dynamo's graph of a
    assert [c["new_graphs"] for c in last_run_info()["compiles"]] == [0]
    assert torch.equal(got, _sample(b, seed=seed))
    with torch.no_grad():
        a.conv_out.weight.mul_(1.5)  # a training step: in place, seen by the compiled forward
    assert torch.equal(_sample(a, seed=seed, compile=True), _sample(a, seed=seed))
    assert counting.frame_count == before


def test_labels_and_guidance_compile_before_the_loop_once_per_way_of_calling(seed, counting):
    """Unconditional (w = 0), conditional (w = 1, B samples with labels) and guided (2B samples) calls of a
    class-conditional U-Net are three plans: each gets its warm-up, where dynamo compiles whatever it needs (a
    graph of the same input compiled before may serve: the class conditioning enters as precomputed
    projections), never inside the loop or a capture; each equals the uncompiled chain bitwise; other labels
    and another w reuse the guided graph."""
    model = micro_unet(num_classes=3)
    labels = torch.tensor([0, 2, 1])
    for w in (0, 1, 2.5):
        before = counting.frame_count
        got = _sample(model, seed=seed, compile=True, labels=labels, guidance_scale=w)
        compiles = last_run_info()["compiles"]
        assert [(c["batch"], c["model_batch"]) for c in compiles] == [(3, 6 if w == 2.5 else 3)], w
        assert counting.frame_count - before == compiles[0]["new_graphs"] <= 1, w  # all in the warm-up
        assert torch.equal(got, _sample(model, seed=seed, labels=labels, guidance_scale=w))
    before = counting.frame_count
    other = _sample(model, seed=seed, compile=True, labels=[1, 1, 0], guidance_scale=4.0)
    assert counting.frame_count == before and last_run_info()["compiles"] == []
    assert torch.equal(other, _sample(model, seed=seed, labels=[1, 1, 0], guidance_scale=4.0))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_compiled(seed, counting, sampler):
    model = micro_unet()
    assert torch.equal(_sample(model, seed=seed, compile=True, sampler=sampler),
                       _sample(model, seed=seed, sampler=sampler))


def test_a_foreign_model_and_the_generator_path(seed, counting):
    class Tanh(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.linspace(0.5, 1.5, 2).view(1, -1, 1, 1))

        def forward(self, x, t):
            return torch.tanh(x * self.w + t.view(-1, 1, 1, 1) * 1e-3)

    kw = dict(shape=(2, 4, 4), schedule=NoiseSchedule.linear(40))
    model = Tanh()
    assert torch.equal(_sample(model, seed=seed, compile=True, **kw), _sample(model, seed=seed, **kw))
    g = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
    assert torch.equal(_sample(model, generator=g(), compile=True, **kw), _sample(model, generator=g(), **kw))


def test_a_foreign_conditional_model_gets_its_labels_compiled(seed, counting):
    """A module with ``null_label`` is called model(x, t, y): the labels reach the compiled forward positionally,
    with and without guidance, and the images equal the uncompiled ones."""
    class Cond(nn.Module):
        null_label = 3

        def __init__(self):
            super().__init__()
            self.emb = nn.Parameter(torch.linspace(-1, 1, 8).view(4, 2))

        def forward(self, x, t, y=None):
            y = torch.full_like(t, self.null_label) if y is None else y
            return torch.tanh(x + self.emb[y].view(-1, 2, 1, 1) + t.view(-1, 1, 1, 1) * 1e-3)

    kw = dict(shape=(2, 4, 4), schedule=NoiseSchedule.linear(40), seed=seed, labels=[0, 2, 1])
    model = Cond()
    for w in (1, 2.5):
        assert torch.equal(_sample(model, compile=True, guidance_scale=w, **kw),
                           _sample(model, guidance_scale=w, **kw)), w
        assert [c["model_batch"] for c in last_run_info()["compiles"]] in ([], [3 if w == 1 else 6])


def test_a_plain_function_as_model_compiles_under_graphs(seed, counting, monkeypatch):
    """A function (no parameters) as the model, compiled, inside the (CPU stand-in) CUDA-graph path."""
    monkeypatch.setattr(sampler_graph, "BACKEND", ReplayBody())
    sampler_graph.clear_graph_cache()
    kw = dict(shape=(1, 4, 4), schedule=NoiseSchedule.linear(30), seed=seed)

    def model(x, t):
        return torch.tanh(x * 0.5 + t.view(-1, 1, 1, 1) * 1e-3)
    try:
        got = _sample(model, compile=True, **kw)
        assert last_run_info()["modes"] == ["graph-whole"]
        assert torch.equal(got, _sample(model, cuda_graph=False, **kw))
    finally:
        sampler_graph.clear_graph_cache()


# ---- what the compiled graph holds ------------------------------------------------------------------------

def _aten_graphs():
    """A backend that records the functionalized ATen graph of every compile (what inductor lowers)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    seen = []

    def keep(gm, example_inputs):
        seen.append(gm)
        return make_boxed_func(gm.forward)
    return aot_autograd(fw_compiler=keep), seen


def _calls(gm, op):
    """Nodes calling ``op`` directly or through the functionalization wrapper of a mutating op."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and
               (n.target is op or (n.args and n.args[0] is op)))


def test_group_norm_silu_stays_one_node_per_site(seed, monkeypatch):
    """With COMPILED_CPU_INFERENCE = "op": ddpm_fast's inference op, one node per GroupNorm+SiLU site."""
    from ddpm_fast.models.unet import AttentionBlock
    from ddpm_fast.ops import group_norm_silu as gns
    from ddpm_fast.ops.group_norm_silu import GroupNormSiLU
    monkeypatch.setattr(gns, "COMPILED_CPU_INFERENCE", "op")
    backend, seen = _aten_graphs()
    monkeypatch.setattr(compiler, "BACKEND", backend)
    model = micro_unet()
    got = _sample(model, seed=seed, compile=True)
    assert len(seen) == 1
    aten, fused = torch.ops.aten, torch.ops.ddpm_fast.group_norm_silu_inference_out.default
    sites = sum(isinstance(m, GroupNormSiLU) for m in model.modules())
    attention = sum(isinstance(m, AttentionBlock) for m in model.modules())
    assert sites == 11 and attention == 4  # 5 ResBlocks x 2 and the output's; attention after 3 + mid
    assert _calls(seen[0], fused) == sites
    assert _calls(seen[0], aten.native_group_norm.default) == attention  # attention's GroupNorm (no SiLU)
    assert _calls(seen[0], aten.silu.default) == 0  # no SiLU outside the fused op (time projections precomputed)
    torch.testing.assert_close(got, _sample(model, seed=seed), rtol=0, atol=1e-5)


def test_group_norm_silu_left_to_inductor(seed, monkeypatch):
    """With COMPILED_CPU_INFERENCE = "inductor": every GroupNorm of the graph is the plain one (inductor's to
    fuse), none of ddpm_fast's ops, and the chain agrees with the uncompiled one within rounding."""
    from ddpm_fast.ops import group_norm_silu as gns
    from ddpm_fast.ops.group_norm_silu import GroupNormSiLU
    monkeypatch.setattr(gns, "COMPILED_CPU_INFERENCE", "inductor")
    backend, seen = _aten_graphs()
    monkeypatch.setattr(compiler, "BACKEND", backend)
    model = micro_unet()
    got = _sample(model, seed=seed, compile=True)
    assert len(seen) == 1
    sites = sum(isinstance(m, GroupNormSiLU) for m in model.modules())
    aten = torch.ops.aten
    assert _calls(seen[0], torch.ops.ddpm_fast.group_norm_silu_inference_out.default) == 0
    assert _calls(seen[0], aten.native_group_norm.default) == sites + 4  # and the 4 attention blocks'
    assert _calls(seen[0], aten.silu.default) == sites
    torch.testing.assert_close(got, _sample(model, seed=seed), rtol=0, atol=1e-5)


# ---- models that cannot be compiled -----------------------------------------------------------------------

class Breaks(nn.Module):
    """A model dynamo cannot trace as one graph."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x, t):
        torch._dynamo.graph_break()
        return torch.tanh(x * self.w)


def test_a_model_that_cannot_be_compiled(seed, counting, monkeypatch):
    kw = dict(shape=(2, 4, 4), schedule=NoiseSchedule.linear(40), seed=seed)
    model = Breaks()
    with pytest.raises(RuntimeError, match="cannot be compiled with torch.compile.*graph_break.*compile=False"):
        _sample(model, compile=True, **kw)
    monkeypatch.setattr(sample_args, "choose_compile", lambda unet, device, work: True)
    with pytest.warns(RuntimeWarning, match="compile='auto' could not compile the model.*graph_break") as caught:
        got = _sample(model, compile="auto", **kw)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert "graph_break" in last_run_info()["compile_error"] and last_run_info()["compiles"] == []
    assert torch.equal(got, _sample(model, **kw)) and last_run_info()["compile_error"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the failure is remembered: no second try, no second warning
        assert torch.equal(_sample(model, compile="auto", **kw), got)
    assert "graph_break" in last_run_info()["compile_error"]
    with pytest.raises(RuntimeError, match="cannot be compiled.*graph_break"):  # asked for: still an error
        _sample(model, compile=True, **kw)


# ---- inside the whole-loop graph (CPU stand-in for CUDA graphs) ---------------------------------------------

class ReplayGraphs(ReplayBody):
    """CUDA graphs' contract on the CPU (tests/fake_graphs.py); records how many graphs dynamo had compiled at
    each capture, and runs the body once while capturing (as a real capture records it)."""

    def __init__(self, counter):
        super().__init__()
        self.counter, self.at_capture = counter, []

    def capture(self, body, pool, kind, device):
        self.at_capture.append(self.counter.frame_count)
        body()
        return super().capture(body, pool, kind, device)


def test_the_compiled_model_is_captured_in_the_whole_loop_graph(seed, counting, monkeypatch):
    backend = ReplayGraphs(counting)
    monkeypatch.setattr(sampler_graph, "BACKEND", backend)
    sampler_graph.clear_graph_cache()
    try:
        model = micro_unet()
        eager = _sample(model, seed=seed, cuda_graph=False, compile=True)
        compiled_before = counting.frame_count
        graphed = _sample(model, seed=seed, compile=True)
        assert last_run_info()["modes"] == ["graph-whole"] and len(last_run_info()["captures"]) == 1
        again = _sample(model, seed=seed, compile=True)
        assert last_run_info()["cache_hits"] == 1  # the same compiled handle: its graph is found again
        assert torch.equal(graphed, eager) and torch.equal(again, eager)
        assert backend.at_capture == [compiled_before] == [counting.frame_count]  # compiled before, never inside
        (key, entry), = sampler_graph._CACHE.items()
        assert isinstance(entry.model_ref(), compiler.CompiledModel)
    finally:
        sampler_graph.clear_graph_cache()


# ---- inductor itself --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_inductor_compiled_sampling_matches_uncompiled_for_every_sampler(seed):
    """One inductor compile of the micro U-Net (~15 s here); every sampler's images agree with the uncompiled run
    to the model's float rounding (inductor reorders sums: ~1e-6 per forward, grown by the chain)."""
    model = micro_unet()
    for sampler in SAMPLERS:
        got = _sample(model, n=4, steps=6, seed=seed, compile=True, sampler=sampler)
        info = last_run_info()
        assert info["compile"] == "default" and len(info["compiles"]) == (sampler == SAMPLERS[0])
        torch.testing.assert_close(got, _sample(model, n=4, steps=6, seed=seed, sampler=sampler), rtol=0,
                                   atol=1e-4, msg=sampler)


# ---- CUDA ---------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_compiled_model_inside_the_whole_loop_graph(seed):
    """Inductor's CUDA code (its own CUDA graphs off) captured in ddpm_fast's whole-loop graph: the replay equals
    the compiled eager run bitwise (float32 and bf16 autocast) and, in float32, the uncompiled run to rounding."""
    model = micro_unet().cuda()
    for kw in (dict(), dict(dtype=torch.bfloat16)):
        eager = _sample(model, n=4, steps=10, seed=seed, cuda_graph=False, compile=True, **kw)
        graphed = _sample(model, n=4, steps=10, seed=seed, compile=True, **kw)
        assert last_run_info()["modes"] == ["graph-whole"] and last_run_info()["compiles"] == []
        assert torch.equal(graphed, eager), kw
        if not kw:  # float32: the uncompiled run to rounding
            plain = _sample(model, n=4, steps=10, seed=seed)
            torch.testing.assert_close(graphed, plain, rtol=0, atol=1e-4)
