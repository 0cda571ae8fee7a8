"""Few-step solvers of the reverse diffusion: DPM-Solver++ (2M, 3M, SDE-2M) and UniPC (bh2), as plain-PyTorch
update formulas (the ``*_ref`` functions: the specification), the order each step of a chain uses, and the
per-step coefficients the fused kernel reads, computed once in float64.

Notation (Lu et al. 2022, "DPM-Solver++"; Zhao et al. 2023, "UniPC"). A noise level is a ``Point``
(alpha, sigma) with x = alpha x_0 + sigma eps, alpha^2 + sigma^2 = 1, and lambda = log(alpha / sigma).
A chain visits points P_0, P_1, ..., P_{N-1} (noisiest first: sampling index k) and ends at P_N = (1, 0),
the data (lambda = +inf). m_k is the model's DATA prediction (x_0) at (x_k, P_k), never clipped (as in
diffusers and the papers). Step k takes x_k to x_{k+1}; h = lambda_{k+1} - lambda_k.

Orders, as diffusers' DPMSolverMultistepScheduler / UniPCMultistepScheduler with their defaults
(``lower_order_final=True``, ``final_sigmas_type="zero"``): the first step is first order (no history yet),
the last step (to sigma 0, where higher-order terms are undefined) first order; DPM-Solver++(3M) uses order 2
at its second step and, for chains shorter than 15 steps, at its second-to-last. UniPC's predictor uses
order min(2, k + 1, N - k); its corrector at step k > 0 refines x_k with the new model output, at the order of
the previous predictor.

The fused step (ops/solver_step.py) computes, with m = the data prediction of the model output at x, h1 = m_{k-1},
h2 = m_{k-2} and last = the previous corrected sample:
    xc   = cx x + cl last + c0 m + c1 h1 + c2 h2        (UniPC's corrector; xc = x otherwise)
    x'   = a xc + b0 m + b1 h1 + b2 h2 + s z            (z ~ N(0, 1): dpmpp_2m_sde only)
    last <- xc;  h2 <- h1;  h1 <- m
Every update is linear in (x, last, m, h1, h2, z), so the coefficients (``ROWS``) are obtained by evaluating
the reference formulas on unit vectors in float64: the table and the specification cannot disagree.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

SOLVERS = ("dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc")
ORDER = {"dpmpp_2m": 2, "dpmpp_3m": 3, "dpmpp_2m_sde": 2, "unipc": 2}
HISTORY = {"dpmpp_2m": 1, "dpmpp_3m": 2, "dpmpp_2m_sde": 1, "unipc": 2}  # previous data predictions kept
CORRECTOR = ("unipc",)      # keeps the previous sample too
STOCHASTIC = ("dpmpp_2m_sde",)

# Rows of SolverTables.packed, indexed by STEP INDEX i (= N - 1 - k) like the schedule's tables.
ROWS = ("cx", "cl", "c0", "c1", "c2", "a", "b0", "b1", "b2", "s")
ROW = {name: i for i, name in enumerate(ROWS)}


@dataclass(frozen=True)
class SolverTables:
    """One solver's coefficients for one chain on one device (``NoiseSchedule.solver_tables``).

    packed: (len(ROWS), num_steps) float32 (or float64), contiguous; row r of step index i at r * num_steps + i.
    """
    packed: torch.Tensor
    sampler: str

    def __getattr__(self, name):
        if name in ROW:
            return self.packed[ROW[name]]
        raise AttributeError(f"SolverTables has no row {name!r}; rows are {ROWS}")

    @property
    def device(self):
        return self.packed.device

    @property
    def num_steps(self):
        return self.packed.shape[1]


class Point(NamedTuple):
    """A noise level of the variance-preserving process: x = alpha x_0 + sigma eps (sigma = 0: the data)."""
    alpha: float
    sigma: float

    @classmethod
    def from_abar(cls, abar):
        return cls(math.sqrt(abar), math.sqrt(1.0 - abar))

    @property
    def lam(self):
        """log(alpha / sigma): the log signal-to-noise ratio over 2; +inf at the data."""
        return math.inf if self.sigma == 0 else math.log(self.alpha) - math.log(self.sigma)


DATA = Point(1.0, 0.0)


# ---- the update formulas (specification) -------------------------------------------------------------------
# x, m*: tensors (any float dtype, computed in it); points: Python floats. s0 = the current point, s1, s2 the
# previous ones, t = the next. Written as in the papers / diffusers, not in the fused kernel's linear form.

def dpmpp_1_ref(x, m0, s0, t, noise=None):
    """DPM-Solver++(1) (= DDIM with eta 0, in data-prediction form); with ``noise``: SDE-DPM-Solver++(1)."""
    if t.sigma == 0:
        return m0 * t.alpha + 0 * x
    h = t.lam - s0.lam
    if noise is None:
        return (t.sigma / s0.sigma) * x - (t.alpha * math.expm1(-h)) * m0
    return ((t.sigma / s0.sigma * math.exp(-h)) * x - (t.alpha * math.expm1(-2 * h)) * m0
            + (t.sigma * math.sqrt(-math.expm1(-2 * h))) * noise)


def dpmpp_2m_ref(x, m0, m1, s1, s0, t, noise=None):
    """Multistep DPM-Solver++(2M), midpoint form (Lu et al. 2022, alg. 2); with ``noise``: SDE-DPM-Solver++(2M)."""
    h, h0 = t.lam - s0.lam, s0.lam - s1.lam
    r0 = h0 / h
    d0, d1 = m0, (1.0 / r0) * (m0 - m1)
    if noise is None:
        return (t.sigma / s0.sigma) * x - (t.alpha * math.expm1(-h)) * (d0 + 0.5 * d1)
    return ((t.sigma / s0.sigma * math.exp(-h)) * x - (t.alpha * math.expm1(-2 * h)) * (d0 + 0.5 * d1)
            + (t.sigma * math.sqrt(-math.expm1(-2 * h))) * noise)


def dpmpp_3m_ref(x, m0, m1, m2, s2, s1, s0, t):
    """Multistep DPM-Solver++(3M) (diffusers' third-order update)."""
    h, h0, h1 = t.lam - s0.lam, s0.lam - s1.lam, s1.lam - s2.lam
    r0, r1 = h0 / h, h1 / h
    d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
    em1 = math.expm1(-h)
    return ((t.sigma / s0.sigma) * x - (t.alpha * em1) * m0 + (t.alpha * (em1 / h + 1.0)) * d1
            - (t.alpha * ((em1 + h) / h ** 2 - 0.5)) * d2)


def _unipc_b(h, order):
    """UniPC's b vector (bh2: B(h) = e^{-h} - 1) for orders 1..order, data prediction (hh = -h)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k, factorial, b = h_phi_1 / hh - 1.0, 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / h_phi_1)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return h_phi_1, b


def unipc_predictor_ref(x, m0, m1, s1, s0, t, order):
    """UniP-bh2 of order 1 or 2 from x at s0 to t (m1 at s1 is used for order 2)."""
    if t.sigma == 0:
        return m0 * t.alpha + 0 * x
    h = t.lam - s0.lam
    h_phi_1, _ = _unipc_b(h, 1)
    x_t = (t.sigma / s0.sigma) * x - (t.alpha * h_phi_1) * m0
    if order == 2:
        rk = (s1.lam - s0.lam) / h
        x_t = x_t - (t.alpha * h_phi_1 * 0.5) * ((m1 - m0) / rk)   # rhos_p = 0.5: the simplified order-2 form
    return x_t


def unipc_corrector_ref(last, m_new, m0, m1, s1, s0, t, order):
    """UniC-bh2 of order 1 or 2: re-does the step s0 -> t from ``last`` (the sample at s0) with the model's data
    prediction ``m_new`` at t (m0 at s0, m1 at s1 for order 2)."""
    h = t.lam - s0.lam
    h_phi_1, b = _unipc_b(h, order)
    x_t = (t.sigma / s0.sigma) * last - (t.alpha * h_phi_1) * m0
    if order == 1:
        return x_t - (t.alpha * h_phi_1 * 0.5) * (m_new - m0)
    rk = (s1.lam - s0.lam) / h
    rho = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), np.array(b))
    return x_t - (t.alpha * h_phi_1) * (float(rho[0]) * ((m1 - m0) / rk) + float(rho[1]) * (m_new - m0))


# ---- the orders of a chain -----------------------------------------------------------------------------------

def step_orders(sampler, n):
    """[(predictor order, corrector order or 0)] for sampling indices k = 0 .. n-1 of an n-step chain to sigma 0."""
    check_solver(sampler)
    if sampler == "unipc":
        pred = [min(2, k + 1, n - k) for k in range(n)]
        return [(p, pred[k - 1] if k > 0 else 0) for k, p in enumerate(pred)]
    orders = []
    for k in range(n):
        if k == 0 or k == n - 1:
            o = 1
        elif ORDER[sampler] == 2 or k == 1 or (k == n - 2 and n < 15):
            o = 2
        else:
            o = 3
        orders.append((o, 0))
    return orders


def check_solver(sampler):
    if sampler not in SOLVERS:
        raise ValueError(f"sampler must be one of {SOLVERS} here, got {sampler!r}")


# ---- one fused step, formula by formula (the specification of ops.solver_step) -----------------------------

def chain_points(alphas_cumprod):
    """Points P_0 .. P_N in sampling order from a chain's alphas_cumprod (ascending STEP INDEX order)."""
    return [Point.from_abar(float(a)) for a in np.asarray(alphas_cumprod, dtype=np.float64)[::-1]] + [DATA]


def solver_update_ref(sampler, points, k, x, m, h1, h2, last, noise=None, orders=None):
    """Step k of a chain over ``points`` (P_0 .. P_N) -> (x_{k+1}, the corrected x_k).

    m: the data prediction at (x, P_k); h1, h2: the data predictions at P_{k-1}, P_{k-2}; last: the corrected
    sample at P_{k-1} (UniPC). Unused history may be None. ``orders`` defaults to ``step_orders``.
    """
    order, corr = (orders or step_orders(sampler, len(points) - 1))[k]
    p = points
    if corr:
        x = unipc_corrector_ref(last, m, h1, h2, p[k - 2] if corr == 2 else None, p[k - 1], p[k], corr)
    if sampler == "unipc":
        return unipc_predictor_ref(x, m, h1, p[k - 1] if order == 2 else None, p[k], p[k + 1], order), x
    if sampler not in STOCHASTIC:
        noise = None
    if order == 1:
        return dpmpp_1_ref(x, m, p[k], p[k + 1], noise), x
    if order == 2:
        return dpmpp_2m_ref(x, m, h1, p[k - 1], p[k], p[k + 1], noise), x
    return dpmpp_3m_ref(x, m, h1, h2, p[k - 2], p[k - 1], p[k], p[k + 1]), x


# ---- coefficients --------------------------------------------------------------------------------------------

def solver_rows(alphas_cumprod, sampler):
    """dict ROWS name -> (N,) float64, indexed by STEP INDEX, for a chain with these alphas_cumprod (ascending
    step index order, as NoiseSchedule.alphas_cumprod). Obtained from ``solver_update_ref`` by linearity."""
    check_solver(sampler)
    points = chain_points(alphas_cumprod)
    n = len(points) - 1
    orders = step_orders(sampler, n)
    e = torch.eye(6, dtype=torch.float64)  # unit inputs: x, m, h1, h2, last, z
    rows = {name: np.zeros(n) for name in ROWS}
    for k in range(n):
        i = n - 1 - k
        x_next, xc = solver_update_ref(sampler, points, k, e[0], e[1], e[2], e[3], e[4], e[5], orders)
        if orders[k][1]:  # the corrector's xc over (x, last, m, h1, h2)
            for name, j in (("cx", 0), ("cl", 4), ("c0", 1), ("c1", 2), ("c2", 3)):
                rows[name][i] = float(xc[j])
        else:
            rows["cx"][i] = 1.0
        # the predictor over (xc, m, h1, h2, z): evaluated again with xc as a unit input of its own
        pred, _ = solver_update_ref(sampler, points, k, e[0], e[1], e[2], e[3], e[4], e[5],
                                    [(orders[k][0], 0)] * n)
        for name, j in (("a", 0), ("b0", 1), ("b1", 2), ("b2", 3), ("s", 5)):
            rows[name][i] = float(pred[j])
    return rows
