"""Diffusion math without kernels: noise schedules and respacing (``schedule``), how a model was trained
(``config.DiffusionConfig``), the plain-PyTorch reference of every step and loss (``reference``) and of the
few-step solvers with their per-step coefficients (``solvers``): the specification the fused ops in
``ddpm_fast.ops`` are tested against. The bottom floor: imports nothing else of ddpm_fast."""
from . import solvers
from .config import (LOSSES, PREDICTIONS, SAMPLERS, SCHEDULES, STEP_SAMPLERS, VARIANCES, DiffusionConfig,
                     check_choice)
from .reference import (approx_standard_normal_cdf, ddim_step, ddpm_step, discretized_gaussian_log_likelihood,
                        extract, guided_model_output, mean_flat, min_snr_weight, normal_kl, p_mean_variance,
                        predict_eps_from_x0, predict_x0, q_posterior_mean_variance, q_sample, split_model_output,
                        training_losses, v_target, vb_terms_bpd)
from .schedule import NoiseSchedule, ScheduleTables
from .solvers import SOLVERS, SolverTables

__all__ = ["DiffusionConfig", "NoiseSchedule", "ScheduleTables", "SolverTables", "LOSSES", "PREDICTIONS",
           "SAMPLERS", "SCHEDULES", "SOLVERS", "STEP_SAMPLERS", "solvers",
           "VARIANCES", "approx_standard_normal_cdf", "check_choice", "ddim_step", "ddpm_step",
           "discretized_gaussian_log_likelihood", "extract", "guided_model_output", "mean_flat", "min_snr_weight",
           "normal_kl", "p_mean_variance", "predict_eps_from_x0", "predict_x0", "q_posterior_mean_variance",
           "q_sample", "split_model_output", "training_losses", "v_target", "vb_terms_bpd"]
