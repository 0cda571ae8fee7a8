// CPU kernel of the few-step solvers' fused step (DPM-Solver++ 2M/3M/SDE-2M, UniPC; diffusion/solvers.py):
// one pass reads x, the model output and the solver's history and writes x and the history:
//   m    = data_prediction(x, model output)                    (data_prediction.h: shared by every sampler)
//   xc   = cx x + cl last + c0 m + c1 h1 + c2 h2               (UniPC's corrector; xc = x otherwise)
//   out  = a xc + b0 m + b1 h1 + b2 h2 + s z                   (z: Philox, or injected noise)
//   last = xc;  h2 = h1;  h1 = m
// The coefficients are one step's column of the solver table, computed in float64 on the host. Every element is
// computed by the same sequence of fused multiply-adds in the AVX2 lanes and in the scalar path, so results do
// not depend on tiling, chunking or thread count. out may alias x (each element is read before it is written).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>

#include "cpu_kernels.h"
#include "data_prediction.h"

namespace ddpm_fast {

struct SolverStepCpuArgs {
  const float *x, *mo, *noise;  // noise: nullptr = Philox (when add_noise)
  float *out, *h1, *h2, *last;  // h2 / last: nullptr when the solver keeps none (hist < 2 / no corrector)
  int64_t N, C, S, mo_sn, mo_sc, mo_ss, element_offset;
  bool channels_last, add_noise;
  DataPrediction dp;
  float cx, cl, c0, c1, c2, a, b0, b1, b2, s;
  uint64_t seed;
  uint32_t step, stream;
};

namespace {

// One element; the scalar twin of the AVX2 lanes below (same operations, same order).
inline void solver_element(const SolverStepCpuArgs& A, int64_t l, const float* m_ptr, const float* z) {
  const float x = A.x[l];
  const float m = data_prediction(A.dp, x, m_ptr);
  const float h1 = A.h1[l], h2 = A.h2 ? A.h2[l] : 0.0f;
  float xc = x;
  if (A.last) {
    xc = A.cx * x;
    xc = std::fma(A.cl, A.last[l], xc);
    xc = std::fma(A.c0, m, xc);
    xc = std::fma(A.c1, h1, xc);
    xc = std::fma(A.c2, h2, xc);
    A.last[l] = xc;
  }
  float r = std::fma(A.b0, m, A.a * xc);
  r = std::fma(A.b1, h1, r);
  if (A.h2) {
    r = std::fma(A.b2, h2, r);
    A.h2[l] = h1;
  }
  if (z) r = std::fma(A.s, *z, r);
  A.h1[l] = m;
  A.out[l] = r;
}

#ifdef DDPM_FAST_X86
// Elements [l, l + len) with the model output laid out like x (m_ptr[i] belongs to element l + i).
AVX2 void solver_run_avx2(const SolverStepCpuArgs& A, int64_t l, int64_t len, const float* m_ptr, const float* z) {
  const __m256 cx = _mm256_set1_ps(A.cx), cl = _mm256_set1_ps(A.cl), c0 = _mm256_set1_ps(A.c0);
  const __m256 c1 = _mm256_set1_ps(A.c1), c2 = _mm256_set1_ps(A.c2), a = _mm256_set1_ps(A.a);
  const __m256 b0 = _mm256_set1_ps(A.b0), b1 = _mm256_set1_ps(A.b1), b2 = _mm256_set1_ps(A.b2);
  const __m256 s = _mm256_set1_ps(A.s);
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const int64_t e = l + i;
    const __m256 x = _mm256_loadu_ps(A.x + e);
    const __m256 m = data_prediction8(A.dp, x, m_ptr + i);
    const __m256 h1 = _mm256_loadu_ps(A.h1 + e);
    const __m256 h2 = A.h2 ? _mm256_loadu_ps(A.h2 + e) : _mm256_setzero_ps();
    __m256 xc = x;
    if (A.last) {
      xc = _mm256_mul_ps(cx, x);
      xc = _mm256_fmadd_ps(cl, _mm256_loadu_ps(A.last + e), xc);
      xc = _mm256_fmadd_ps(c0, m, xc);
      xc = _mm256_fmadd_ps(c1, h1, xc);
      xc = _mm256_fmadd_ps(c2, h2, xc);
      _mm256_storeu_ps(A.last + e, xc);
    }
    __m256 r = _mm256_fmadd_ps(b0, m, _mm256_mul_ps(a, xc));
    r = _mm256_fmadd_ps(b1, h1, r);
    if (A.h2) {
      r = _mm256_fmadd_ps(b2, h2, r);
      _mm256_storeu_ps(A.h2 + e, h1);
    }
    if (z) r = _mm256_fmadd_ps(s, _mm256_loadu_ps(z + i), r);
    _mm256_storeu_ps(A.h1 + e, m);
    _mm256_storeu_ps(A.out + e, r);
  }
  for (; i < len; ++i) solver_element(A, l + i, m_ptr + i, z ? z + i : nullptr);
}
#endif

// A run of consecutive x elements [l, l + len) whose model output sits at mo[base + i * st].
void solver_run(const SolverStepCpuArgs& A, int64_t l, int64_t len, int64_t base, int64_t st, const float* z) {
  const float* m = A.mo + base;
#ifdef DDPM_FAST_X86
  if (st == 1 && use_avx2()) return solver_run_avx2(A, l, len, m, z);
#endif
  for (int64_t i = 0; i < len; ++i) solver_element(A, l + i, m + i * st, z ? z + i : nullptr);
}

}  // namespace

void solver_step_cpu(const SolverStepCpuArgs& A, int threads) {
  if (A.N < 0 || A.C < 1 || A.S < 1 || A.element_offset < 0 || !A.x || !A.mo || !A.out || !A.h1)
    throw std::invalid_argument("solver_step_cpu: bad sizes or pointers");
  const int64_t n = A.N * A.C * A.S;
  const ModelOutputRuns runs(A.channels_last, A.N, A.C, A.S, A.mo_sn, A.mo_sc, A.mo_ss);
  parallel_tiles(n, threads, [&](int64_t l0, int64_t l1) {
    alignas(32) float z[kTile];
    const bool draw = A.add_noise && !A.noise;
    if (draw) philox_randn_range(z, A.element_offset + l0, A.element_offset + l1, A.seed, A.step, A.stream);
    runs.for_each(l0, l1, [&](int64_t l, int64_t len, int64_t base) {
      const float* zp = !A.add_noise ? nullptr : A.noise ? A.noise + l : z + (l - l0);
      solver_run(A, l, len, base, runs.in_st, zp);
    });
  });
}

// Flat entry point for the pybind11 binding: pointers as integers (0 = absent), sizes, coefficients
// (coefs: cx, cl, c0, c1, c2, a, b0, b1, b2, s in the order of diffusion/solvers.py's ROWS).
void solver_step_fused_cpu(uintptr_t x, uintptr_t mo, uintptr_t noise, uintptr_t out, uintptr_t h1, uintptr_t h2,
                           uintptr_t last, int64_t N, int64_t C, int64_t S, bool channels_last, int64_t mo_sn,
                           int64_t mo_sc, int64_t mo_ss, double p, double q, double cx, double cl, double c0,
                           double c1, double c2, double a, double b0, double b1, double b2, double s, bool add_noise,
                           uint64_t seed, uint32_t step, uint32_t stream, int64_t element_offset, bool guided,
                           double w, int64_t mo_un, int threads) {
  SolverStepCpuArgs A;
  A.x = reinterpret_cast<const float*>(x), A.mo = reinterpret_cast<const float*>(mo);
  A.noise = reinterpret_cast<const float*>(noise), A.out = reinterpret_cast<float*>(out);
  A.h1 = reinterpret_cast<float*>(h1), A.h2 = reinterpret_cast<float*>(h2), A.last = reinterpret_cast<float*>(last);
  A.N = N, A.C = C, A.S = S, A.mo_sn = mo_sn, A.mo_sc = mo_sc, A.mo_ss = mo_ss, A.element_offset = element_offset;
  A.channels_last = channels_last, A.add_noise = add_noise, A.seed = seed, A.step = step, A.stream = stream;
  A.dp = DataPrediction{static_cast<float>(p), static_cast<float>(q), guided, static_cast<float>(w), mo_un};
  A.cx = static_cast<float>(cx), A.cl = static_cast<float>(cl), A.c0 = static_cast<float>(c0);
  A.c1 = static_cast<float>(c1), A.c2 = static_cast<float>(c2), A.a = static_cast<float>(a);
  A.b0 = static_cast<float>(b0), A.b1 = static_cast<float>(b1), A.b2 = static_cast<float>(b2);
  A.s = static_cast<float>(s);
  solver_step_cpu(A, threads);
}

}  // namespace ddpm_fast
