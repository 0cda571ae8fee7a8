"""Every Triton kernel of the package compiles for the GPU (sm_90 PTX and cubin), without a GPU.

The interpreter (what the other tests run on CPU tensors) neither type-checks like the compiler nor lowers
sqrt, division or the int specialisations the way a GPU build does, so each kernel is built here with the
compiler itself, in every specialisation class the code launches: each constexpr flag value at least once, every
data dtype, integer arguments as i32 and i64. The PTX is also checked for the approximate sqrt / division the
noise and DDIM paths must not use (docs/gpu.md: error bounds). In a subprocess, because this process runs Triton interpreted.
"""
import os
import subprocess
import sys

import pytest

from ddpm_fast.ops import _ext

SCRIPT = r'''
import itertools, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ddpm_fast.ops.triton import group_norm_silu as gn, p_step as ps, philox, q_sample as qs

target = GPUTarget("cuda", 90, 32)
built = []


def build(kernel, args, constexprs, name):
    sig = {**args, **{k: "constexpr" for k in constexprs}}
    out = triton.compile(ASTSource(kernel, sig, constexprs), target=target)
    assert "ptx" in out.asm and "cubin" in out.asm, name
    built.append(name)
    return out.asm["ptx"]


def p_step_args(dt, mo_dt, int_t):
    return {"x_ptr": dt, "mo_ptr": mo_dt, "noise_ptr": dt, "out_ptr": dt, "tab_ptr": "*fp32",
            "step_ptr": "*i64", "seed_ptr": "*i64", "offset_ptr": "*i64", "w_ptr": "*fp32", "step_arg": "i32",
            "offset_arg": int_t, **{k: "i32" for k in ("n_elements", "C", "S", "mo_sn", "mo_sc", "mo_ss", "var_off",
                                                      "mo_un", "num_steps", "lead")}, "eta": "fp32"}


# (PRED, VAR, CLIP, DDIM, NOISE, STEP_FROM_PTR, OFFSET_FROM_PTR, CHANNELS_LAST, MO_LIKE_X, GUIDED): every value of
# every flag at least once, the sampler's whole-loop node (baked step, offset from memory) and one-step node first,
# then the guided whole-loop and one-step nodes (classifier-free guidance)
F, T = False, True
P_STEP = [(0, 0, T, F, 2, F, T, F, T, F), (0, 1, T, F, 2, T, T, T, T, F), (1, 1, F, F, 1, T, F, T, F, F),
          (2, 2, T, F, 2, F, T, F, F, F), (0, 0, T, T, 0, T, F, F, T, F), (2, 0, F, T, 2, T, T, T, F, F),
          (0, 1, T, F, 2, F, T, F, T, T), (1, 2, T, F, 2, T, T, T, F, T)]
NAMES = ("PRED", "VAR", "CLIP", "DDIM", "NOISE", "STREAM", "STEP_FROM_PTR", "OFFSET_FROM_PTR", "CHANNELS_LAST",
         "MO_LIKE_X", "GUIDED", "BLOCK")
for k, flags in enumerate(P_STEP):
    values = dict(zip(NAMES, (*flags[:5], 0, *flags[5:], 1024)))
    dt = ("*fp32", "*bf16", "*fp16")[k % 3]
    ptx = build(ps._p_step_kernel, p_step_args(dt, dt if k % 2 else "*fp32", "i64" if k % 2 else "i32"), values,
                f"p_step {flags} {dt}")
    if values["NOISE"] == 2:  # Box-Muller's sqrt must be the correctly rounded one
        assert "sqrt.approx" not in ptx, "p_step noise uses an approximate sqrt"
    if values["DDIM"]:
        assert "sqrt.approx" not in ptx and "div.full" not in ptx, "DDIM coefficients are approximate"

for from_ptr, dt in itertools.product((True, False), ("*fp32", "*bf16")):
    args = {"out_ptr": dt, "seed_ptr": "*i64", "offset_ptr": "*i64", "offset_arg": "i64", "n_elements": "i32",
            "lead": "i32"}
    ptx = build(philox._seeded_randn_kernel, args, {"STREAM": 1, "OFFSET_FROM_PTR": from_ptr, "BLOCK": 1024},
                f"seeded_randn {from_ptr} {dt}")
    assert "sqrt.approx" not in ptx

for injected, dt in itertools.product((True, False), ("*fp32", "*fp16")):
    args = {"x_ptr": dt, "t_ptr": "*i64", "noise_ptr": dt, "xt_ptr": dt, "eps_ptr": dt, "tab_ptr": "*fp32",
            "seed_ptr": "*i64", "n_elements": "i32", "per_sample": "i32", "num_steps": "i32", "offset_arg": "i32",
            "lead": "i32"}
    build(qs._q_sample_kernel, args, {"INJECTED": injected, "STREAM": 2, "BLOCK": 1024}, f"q_sample {injected}")

stats = {"W": "*fp32", "B": "*fp32", "Mean": "*fp32", "Rstd": "*fp32"}
strides = {"stride_n": "i32", "stride_c": "i32", "stride_hw": "i32"}
for k, (dt, one_tile) in enumerate(itertools.product(("*fp32", "*bf16", "*fp16"), (True, False))):
    flags = {"HAS_W": k % 2 == 0, "HAS_B": k % 3 != 0, "BLOCK_D": 16, "BLOCK_HW": 64}
    fwd = {"X": dt, "Y": dt, **stats, **strides, "HW": "i32", "G": "i32", "D": "i32", "eps": "fp32"}
    build(gn._group_norm_silu_fwd_kernel, fwd, {**flags, "ONE_TILE": one_tile}, f"gn fwd {dt} {one_tile}")
    if one_tile:
        bwd = {"DY": dt, "X": dt, "DX": dt, **stats, "DWp": "*fp32", "DBp": "*fp32", **strides, "C": "i32",
               "HW": "i32", "G": "i32", "D": "i32"}
        build(gn._group_norm_silu_bwd_kernel, bwd, flags, f"gn bwd {dt}")
print("compiled", len(built))
'''


@pytest.mark.slow
@pytest.mark.skipif(not _ext.has_triton(), reason="triton not installed")
def test_every_triton_kernel_compiles_for_sm90():
    pytest.importorskip("triton.backends.compiler")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["compiled", str(8 + 4 + 4 + 9)], out.stdout
