"""Solver histories for the fused-step tests (tests/ops/test_solver_step.py, tests/ops/test_guidance.py): a
random one (never zero, so a step that ignores a buffer is caught) and a copy of one, optionally in another dtype."""
import torch

from ddpm_fast.ops.solver_step import SolverState


def random_state(sampler, x, gen):
    """A history for ``sampler`` shaped like x (float32, like x's), filled with standard normals from ``gen``."""
    st = SolverState.zeros_like(x, sampler)
    for t in state_tensors(st):
        if t is not None:
            t.copy_(torch.randn(t.shape, generator=gen))
    return st


def clone_state(st, dtype=None):
    return SolverState(*(None if t is None else t.clone().to(dtype or t.dtype) for t in state_tensors(st)))


def state_tensors(st):
    return st.h1, st.h2, st.last
