"""Triton kernels for y = silu(group_norm(x)): forward and backward, one program per (n, group).

The fallback on CUDA when ddpm_fast._C was built without CUDA kernels, and a comparison point in the
benchmarks. Tests run it on CPU tensors under TRITON_INTERPRET=1. Layout-agnostic: a group is addressed as
a (D channels) x (HW positions) tile through the strides of x, so NCHW and NHWC need no copy. fp32 math and
statistics; x/y/dy/dx in float32, float16 or bfloat16. Written for triton >= 3.0 (no newer APIs).

The loops over a group's spatial tiles are `while` loops: Triton 3.6's interpreter turns a runtime loop bound
into a 1-element array and NumPy >= 2.5 refuses to convert that to an int, so `for start in range(0, HW, ...)`
fails in the interpreter there (the GPU machine's stack); a `while` compiles to the same kind of loop.
"""
import math

import torch
import triton
import triton.language as tl

from .. import device as _device
from ..common import NCHW, prepare_layout, to_layout

_MAX_TILE = 8192  # elements per program tile: the whole group stays in registers when it fits
_MAX_BLOCK_D = 1024  # channels per group the kernels accept (a tile holds at least one position of each)


def supported(channels_per_group):
    """True when the kernels handle groups of this many channels."""
    return triton.next_power_of_2(channels_per_group) <= _MAX_BLOCK_D


@triton.jit
def _silu_pre(x, mean, rstd, w, b):
    """xhat and z = xhat * w + b for a (BLOCK_D, BLOCK_HW) fp32 tile; w, b: (BLOCK_D, 1)."""
    xhat = (x - mean) * rstd
    return xhat, xhat * w + b


@triton.jit
def _affine(W, B, c, dmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """weight and bias of channels c as (BLOCK_D, 1) fp32 columns (1 and 0 when absent)."""
    if HAS_W:
        w = tl.load(W + c, mask=dmask, other=1.0).to(tl.float32)[:, None]
    else:
        w = tl.full((c.shape[0], 1), 1.0, tl.float32)
    if HAS_B:
        b = tl.load(B + c, mask=dmask, other=0.0).to(tl.float32)[:, None]
    else:
        b = tl.zeros((c.shape[0], 1), tl.float32)
    return w, b


@triton.jit
def _group_norm_silu_fwd_kernel(
    X, Y,  # x and y: (N, C, HW) addressed through the strides below (same strides for both)
    W, B,  # weight, bias: (C,) fp32 (dummies when HAS_W / HAS_B is false)
    Mean, Rstd,  # (N * G,) fp32 outputs
    stride_n, stride_c, stride_hw,  # element strides of x / y
    HW, G, D, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HW: tl.constexpr,
    ONE_TILE: tl.constexpr,  # the whole group fits one tile: x is read once
):
    pid = tl.program_id(0)
    n, g = pid // G, pid % G
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    c = g * D + d
    base = n.to(tl.int64) * stride_n + c.to(tl.int64)[:, None] * stride_c
    hw = tl.arange(0, BLOCK_HW)
    count = D * HW
    if ONE_TILE:
        mask = dmask[:, None] & (hw < HW)[None, :]
        xt = tl.load(X + base + hw[None, :] * stride_hw, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(tl.sum(xt, axis=1), axis=0) / count
        xc = tl.where(mask, xt - mean, 0.0)
        var = tl.sum(tl.sum(xc * xc, axis=1), axis=0) / count
    else:
        # Exact two passes (mean, then centred squares): fp32 sum-of-squares tricks lose ~10 ulp here.
        s = tl.zeros((BLOCK_D, BLOCK_HW), dtype=tl.float32)
        start = 0
        while start < HW:  # not `for start in range(0, HW, BLOCK_HW)`: see the module doc
            mask = dmask[:, None] & (start + hw < HW)[None, :]
            s += tl.load(X + base + (start + hw)[None, :] * stride_hw, mask=mask, other=0.0).to(tl.float32)
            start += BLOCK_HW
        mean = tl.sum(tl.sum(s, axis=1), axis=0) / count
        q = tl.zeros((BLOCK_D, BLOCK_HW), dtype=tl.float32)
        start = 0
        while start < HW:  # not `for start in range(0, HW, BLOCK_HW)`: see the module doc
            mask = dmask[:, None] & (start + hw < HW)[None, :]
            xs = tl.load(X + base + (start + hw)[None, :] * stride_hw, mask=mask, other=0.0).to(tl.float32)
            v = tl.where(mask, xs - mean, 0.0)
            q += v * v
            start += BLOCK_HW
        var = tl.sum(tl.sum(q, axis=1), axis=0) / count
    rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))  # once per group: correctly rounded (tl.sqrt is approximate)
    tl.store(Mean + pid, mean)
    tl.store(Rstd + pid, rstd)
    w, b = _affine(W, B, c, dmask, HAS_W, HAS_B)
    start = 0
    while start < HW:  # not `for start in range(0, HW, BLOCK_HW)`: see the module doc
        mask = dmask[:, None] & (start + hw < HW)[None, :]
        offs = base + (start + hw)[None, :] * stride_hw
        if ONE_TILE:  # constexpr: only one branch is compiled
            x = xt
        else:
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        _, z = _silu_pre(x, mean, rstd, w, b)
        y = z / (1.0 + tl.exp(-z))
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
        start += BLOCK_HW


@triton.jit
def _group_norm_silu_bwd_kernel(
    DY, X, DX,  # (N, C, HW) through the strides below (same for all three)
    W, B,  # (C,) fp32 or dummies
    Mean, Rstd,  # (N * G,) fp32 from the forward
    DWp, DBp,  # (N, C) fp32 outputs: per-sample sums of dz * xhat and of dz (reduced over N by the caller)
    stride_n, stride_c, stride_hw,
    C, HW, G, D,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    pid = tl.program_id(0)
    n, g = pid // G, pid % G
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    c = g * D + d
    base = n.to(tl.int64) * stride_n + c.to(tl.int64)[:, None] * stride_c
    hw = tl.arange(0, BLOCK_HW)
    mean = tl.load(Mean + pid)
    rstd = tl.load(Rstd + pid)
    w, b = _affine(W, B, c, dmask, HAS_W, HAS_B)
    # Pass 1: per-channel sums of dz * xhat and dz, dz = dy * silu'(z).
    sw = tl.zeros((BLOCK_D, BLOCK_HW), dtype=tl.float32)
    sb = tl.zeros((BLOCK_D, BLOCK_HW), dtype=tl.float32)
    start = 0
    while start < HW:  # not `for start in range(0, HW, BLOCK_HW)`: see the module doc
        mask = dmask[:, None] & (start + hw < HW)[None, :]
        offs = base + (start + hw)[None, :] * stride_hw
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        xhat, z = _silu_pre(x, mean, rstd, w, b)
        s = 1.0 / (1.0 + tl.exp(-z))
        dz = tl.where(mask, dy * s * (1.0 + z * (1.0 - s)), 0.0)
        sw += dz * xhat
        sb += dz
        start += BLOCK_HW
    dwc = tl.sum(sw, axis=1)
    dbc = tl.sum(sb, axis=1)
    tl.store(DWp + n * C + c, dwc, mask=dmask)
    tl.store(DBp + n * C + c, dbc, mask=dmask)
    count = D * HW
    s1 = tl.sum(tl.sum(w * dbc[:, None], axis=1), axis=0) / count  # padded channels have dbc = dwc = 0
    s2 = tl.sum(tl.sum(w * dwc[:, None], axis=1), axis=0) / count
    # Pass 2: dx = rstd * (w * dz - s1 - xhat * s2), dz recomputed (the tile is cached from pass 1).
    start = 0
    while start < HW:  # not `for start in range(0, HW, BLOCK_HW)`: see the module doc
        mask = dmask[:, None] & (start + hw < HW)[None, :]
        offs = base + (start + hw)[None, :] * stride_hw
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        xhat, z = _silu_pre(x, mean, rstd, w, b)
        s = 1.0 / (1.0 + tl.exp(-z))
        dz = dy * s * (1.0 + z * (1.0 - s))
        dx = rstd * (w * dz - s1 - xhat * s2)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        start += BLOCK_HW


def _tiles(D, HW):
    block_d = triton.next_power_of_2(D)
    if block_d > _MAX_BLOCK_D:
        raise ValueError(f"group_norm_silu (Triton): {D} channels per group exceed {_MAX_BLOCK_D}")
    block_hw = min(triton.next_power_of_2(max(HW, 1)), max(1, _MAX_TILE // block_d))
    return block_d, block_hw


def _strides(layout, C, HW):
    """Element strides (n, c, hw) of an NCHW- or NHWC-dense (N, C, *) tensor (spatial dims flattened)."""
    return (C * HW, HW, 1) if layout == NCHW else (C * HW, 1, C)


def _group_norm_silu_fwd(x, weight, bias, num_groups, eps):
    """Forward launcher. x: (N, C, *) NCHW- or NHWC-dense (see ops/common.prepare_layout), fp32/fp16/bf16;
    weight, bias: (C,) or None. Returns y (like x), mean and rstd ((N, G) fp32)."""
    x, layout = prepare_layout(x)
    N, C, HW, G = x.shape[0], x.shape[1], math.prod(x.shape[2:]), num_groups
    y = torch.empty_like(x)
    mean = torch.zeros((N, G), dtype=torch.float32, device=x.device)
    rstd = torch.zeros((N, G), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return y, mean, rstd
    D = C // G
    w = mean if weight is None else weight.detach().float().contiguous()
    b = mean if bias is None else bias.detach().float().contiguous()
    block_d, block_hw = _tiles(D, HW)
    with _device.on_device(x.device):
        _group_norm_silu_fwd_kernel[(N * G,)](
            x, y, w, b, mean, rstd, *_strides(layout, C, HW), HW, G, D, float(eps),
            HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_D=block_d, BLOCK_HW=block_hw,
            ONE_TILE=block_hw >= HW, num_warps=8 if block_d * block_hw >= 4096 else 4)
    return y, mean, rstd


def _group_norm_silu_bwd(dy, x, weight, bias, mean, rstd, num_groups):
    """Backward launcher. Returns dx (like x), dweight and dbias ((C,) fp32)."""
    x, layout = prepare_layout(x)
    dy = to_layout(dy.to(x.dtype), x, layout)
    N, C, HW, G = x.shape[0], x.shape[1], math.prod(x.shape[2:]), num_groups
    dx = torch.empty_like(x)
    dwp = torch.zeros((N, C), dtype=torch.float32, device=x.device)
    dbp = torch.zeros((N, C), dtype=torch.float32, device=x.device)
    if x.numel() > 0:
        D = C // G
        w = dwp if weight is None else weight.detach().float().contiguous()
        b = dwp if bias is None else bias.detach().float().contiguous()
        block_d, block_hw = _tiles(D, HW)
        mean, rstd = mean.float().contiguous(), rstd.float().contiguous()
        with _device.on_device(x.device):
            _group_norm_silu_bwd_kernel[(N * G,)](
                dy, x, dx, w, b, mean, rstd, dwp, dbp, *_strides(layout, C, HW), C, HW, G, D,
                HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_D=block_d, BLOCK_HW=block_hw,
                num_warps=8 if block_d * block_hw >= 4096 else 4)
    return dx, dwp.sum(0), dbp.sum(0)
