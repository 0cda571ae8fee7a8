"""What every GroupNorm+SiLU test shares: random inputs in each memory layout (never zeros, exact in their dtype),
the float64 specification, PyTorch's own op in the low precision, and the error rule comparing them.

Error rule (STYLE.md): |out - ref| <= 2 * |naive - ref| + atol, where naive is F.silu(F.group_norm(...)) run
by PyTorch in the output's own dtype and ref is the specification evaluated in float64.
"""
import math

import torch
import torch.nn.functional as F

from ddpm_fast.ops.group_norm_silu import group_norm_silu_ref

ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def make_x(shape, layout, dtype, device="cpu", scale=2.0, offset=0.5):
    """Random x (never zeros) in the requested memory layout; values are exact in dtype. The values are made
    in dtype BEFORE the layout view is taken: an elementwise op on a sliced view would return a dense copy."""
    N, C, *sp = shape

    def rand(*size):
        return (torch.randn(*size, device=device) * scale + offset).to(dtype)

    if layout in ("channels_last", "sliced_channels_last") and sp:
        base = rand(N, *sp, C * (2 if layout.startswith("sliced") else 1))
        perm = (0, len(sp) + 1, *range(1, len(sp) + 1))
        x = base.permute(perm)
        x = x[:, ::2] if layout.startswith("sliced") else x
    elif layout.startswith("sliced"):
        x = rand(N, C, *[s + 3 for s in sp])[(slice(None), slice(None), *[slice(1, s + 1) for s in sp])]
        if not sp:
            x = rand(N, 2 * C)[:, ::2]
    elif layout == "misaligned":  # NCHW-contiguous, but data_ptr one element past a 16-byte boundary
        x = torch.empty(math.prod(shape) + 1, dtype=dtype, device=device)[1:].view(shape).copy_(rand(*shape))
    else:
        x = rand(*shape)
    assert tuple(x.shape) == tuple(shape)
    if layout.startswith("sliced"):
        assert not x.is_contiguous() and not (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
    return x


def affine(C, dtype=torch.float32, device="cpu"):
    return (torch.randn(C, device=device).to(dtype) * 0.5 + 1).requires_grad_(), \
        (torch.randn(C, device=device).to(dtype) * 0.5).requires_grad_()


def ref64(x, G, w, b, eps=1e-5):
    return group_norm_silu_ref(x.double(), G, None if w is None else w.double(), None if b is None else b.double(), eps)


def naive(x, G, w, b, eps=1e-5):
    """PyTorch's own GN->SiLU in x's dtype (the low-precision yardstick of the error rule)."""
    w = None if w is None else w.to(x.dtype)
    b = None if b is None else b.to(x.dtype)
    if x.dtype == torch.float16 and x.device.type == "cpu":
        return F.silu(F.group_norm(x.float(), G, None if w is None else w.float(),
                                   None if b is None else b.float(), eps)).half()
    return F.silu(F.group_norm(x, G, w, b, eps))


def assert_rule(out, ref, low, atol):
    err = (out.double() - ref.double()).abs().max().item()
    bound = 2 * (low.double() - ref.double()).abs().max().item() + atol
    assert err <= bound, f"max error {err:.3e} > bound {bound:.3e}"


def check_grads(x, w, b, G, dy, dx, dw, db, name):
    """Grads against autograd of the float64 spec, with the rule's yardstick = autograd of naive in x.dtype."""
    x64 = x.detach().double().requires_grad_()
    w64, b64 = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    refs = torch.autograd.grad(group_norm_silu_ref(x64, G, w64, b64), (x64, w64, b64), dy.double())
    xl = x.detach().requires_grad_()
    wl, bl = w.detach().to(x.dtype).requires_grad_(), b.detach().to(x.dtype).requires_grad_()
    lows = torch.autograd.grad(naive(xl, G, wl, bl), (xl, wl, bl), dy)
    # dweight/dbias sum N*HW terms per channel and come out in the stats dtype (fp32 for every low-precision x):
    # the kernels' own error is fp32 accumulation of that many terms, so atol = fp32's ATOL scaled by the terms'
    # magnitude; bf16/fp16 rounding enters only through the naive yardstick (PyTorch's grads in x.dtype).
    scale = dy.double().abs().sum().item() / x.shape[1] + 1
    acc_atol = ATOL[torch.float64 if x.dtype == torch.float64 else torch.float32] * scale
    for out, ref, low, atol in zip((dx, dw, db), refs, lows, (ATOL[x.dtype], acc_atol, acc_atol)):
        assert out.shape == ref.shape, name
        assert_rule(out, ref, low, atol)
