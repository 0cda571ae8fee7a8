"""The plain PyTorch DDPM baseline of the benchmarks: what a user would write without ddpm_fast.

The code lives in ``ddpm_fast/baseline.py`` so that the installed ``ddpm-fast bench`` command can import it
without this folder on the path; this module re-exports it under the benchmarks/ name:

    PlainDiffusion     the posterior math as separate torch ops, tables derived from the betas
                       (improved-diffusion's formulas and respacing), independent of ddpm_fast's code
    plain_sample       the eager sampling loop (torch.randn per step; or diffusers' DDPMScheduler.step)
    plain_train_step   one eager training step (unfused q_sample, autograd, AdamW, EMA)

tests/test_baseline.py checks it against the exact moments of the Gaussian oracle.
"""
from ddpm_fast.baseline import PlainDiffusion, plain_sample, plain_train_step

__all__ = ["PlainDiffusion", "plain_sample", "plain_train_step"]
