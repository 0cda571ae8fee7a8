"""GroupNorm+SiLU under torch.compile without gradients on the CPU: the inference op
``ddpm_fast::group_norm_silu_inference_out`` (y into an ``out`` that inductor allocates) against the float64
specification under the error rule, every dtype and layout (the fast path and the general one), its registration
(opcheck), and the module tracing to it as one node (with gradients wanted, the differentiable op instead)."""
import pytest
import torch

from ddpm_fast.ops import group_norm_silu as gns
from ddpm_fast.ops.group_norm_silu import GroupNormSiLU, group_norm_silu
from group_norm_silu_rule import ATOL, assert_rule, make_x, naive, ref64

OP = torch.ops.ddpm_fast.group_norm_silu_inference_out.default
# odd shapes, the U-Net's group sizes, a multi-thread size (> 16384 elements per thread), non-4-D
SHAPES = [((3, 96, 7, 9), 8), ((2, 64, 4, 4), 32), ((16, 16, 8, 8), 8), ((2, 128, 16, 17), 32), ((2, 12, 5), 3)]


@pytest.mark.parametrize("shape,G", SHAPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16])
@pytest.mark.parametrize("out_like", ["x", "other"])
def test_inference_out_op_follows_the_rule(seed, shape, G, layout, dtype, out_like):
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last is 4-D")
    x = make_x(shape, layout, dtype)
    w, b = (torch.randn(shape[1]) * 0.5 + 1), torch.randn(shape[1]) * 0.5
    out = torch.empty_like(x) if out_like == "x" else torch.empty(shape, dtype=dtype).transpose(0, -1).contiguous(
    ).transpose(0, -1)  # strides unlike x's: the general path, copied into out
    OP(x, w, b, G, 1e-5, out)
    assert_rule(out, ref64(x, G, w, b), naive(x, G, w, b), ATOL[dtype])
    OP(x, None, None, G, 1e-5, out)
    assert_rule(out, ref64(x, G, None, None), naive(x, G, None, None), ATOL[dtype])


def test_inference_out_op_checks_and_opcheck(seed):
    x = torch.randn(2, 8, 5, 3)
    w, b = torch.randn(8), torch.randn(8)
    for out in (torch.empty_like(x), torch.empty_like(x, memory_format=torch.channels_last)):
        torch.library.opcheck(OP, (x, w, b, 4, 1e-5, out))
    with pytest.raises(ValueError, match="out must be like x"):
        OP(x, w, b, 4, 1e-5, torch.empty(2, 8, 5, 4))
    with pytest.raises(ValueError, match="divisible by num_groups"):
        OP(x, w, b, 3, 1e-5, torch.empty_like(x))


def _graph_ops(fn, *args):
    """The ATen-level ops of fn's compiled graph (functionalized: a mutating op appears inside its wrapper)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)
    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=keep))(*args)
    targets = [n.args[0] if n.args and isinstance(n.args[0], torch._ops.OpOverload) else n.target
               for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    return out, targets


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_compiled_module_calls_one_node_per_site(seed, layout, monkeypatch):
    monkeypatch.setattr(gns, "COMPILED_CPU_INFERENCE", "op")
    norm = GroupNormSiLU(4, 16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = make_x((3, 16, 6, 5), layout, torch.float32)
    with torch.no_grad():
        y, ops = _graph_ops(norm, x)
    assert ops.count(OP) == 1 and torch.ops.aten.native_group_norm.default not in ops
    assert y.stride() == x.stride()
    assert_rule(y, ref64(x, 4, norm.weight, norm.bias, 1e-6), naive(x, 4, norm.weight, norm.bias, 1e-6), ATOL[x.dtype])
    # gradients wanted: the differentiable op (and its backward op), not the inference one
    _, ops = _graph_ops(lambda x: group_norm_silu(x, 4, norm.weight, norm.bias).sum(), x.requires_grad_())
    assert OP not in ops and torch.ops.ddpm_fast.group_norm_silu.default in ops


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_inference_left_to_inductor(seed, layout, dtype, monkeypatch):
    """COMPILED_CPU_INFERENCE = "inductor": a compiled graph without gradients holds the plain group_norm and silu
    (inductor fuses them into its own loop), in fp32 math with y in x's dtype, within the error rule; with
    gradients wanted, still the differentiable op."""
    monkeypatch.setattr(gns, "COMPILED_CPU_INFERENCE", "inductor")
    norm = GroupNormSiLU(4, 16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = make_x((3, 16, 6, 5), layout, dtype)
    with torch.no_grad():
        y, ops = _graph_ops(norm, x)
    assert OP not in ops and torch.ops.ddpm_fast.group_norm_silu.default not in ops
    assert torch.ops.aten.native_group_norm.default in ops and torch.ops.aten.silu.default in ops
    assert y.dtype == dtype and y.shape == x.shape
    assert_rule(y, ref64(x, 4, norm.weight, norm.bias, 1e-6), naive(x, 4, norm.weight, norm.bias, 1e-6), ATOL[dtype])
    _, ops = _graph_ops(lambda x: group_norm_silu(x, 4, norm.weight, norm.bias).sum(), x.requires_grad_())
    assert torch.ops.ddpm_fast.group_norm_silu.default in ops
