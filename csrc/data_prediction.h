// How every CPU sampler kernel turns the model output into the data prediction x_0: ONE definition, shared by the
// DDPM/DDIM step (p_step_cpu.cpp) and the few-step solvers (solver_step_cpu.cpp), scalar and 8-lane AVX2 with
// the same rounding (fused multiply-adds), so a vector lane equals its scalar twin bit for bit.
//   x_0 = p x + q m,   m the model's prediction read at `m`; (p, q) from the prediction type and the step:
//   eps: (1 / sqrt(abar), -sqrt(1 / abar - 1));  x0: (0, 1);  v: (sqrt(abar), -sqrt(1 - abar)).
// Classifier-free guidance (`guided`): the model ran on 2N samples, the conditional outputs first; `m` points at an
// element's conditional value c and m[un] is its unconditional value u (un = N * the output's sample stride), and
//   m = u + w (c - u)      (w = 1: c, w = 0: u, exactly: the combine is skipped)
// is the prediction the step uses, before it becomes x_0 (diffusion.guided_model_output is the specification).
#pragma once
#include <cmath>
#include <cstdint>

#include "cpu_kernels.h"

namespace ddpm_fast {

struct DataPrediction {
  float p, q;
  bool guided = false;  // m[0] conditional, m[un] unconditional
  float w = 1.0f;       // the guidance scale
  int64_t un = 0;
};

// The model's prediction of one element: the guided combine, or the output itself.
inline float model_prediction(const DataPrediction& d, const float* m) {
  if (!d.guided || d.w == 1.0f) return *m;
  const float u = m[d.un];
  return d.w == 0.0f ? u : std::fma(d.w, *m - u, u);
}

inline float data_prediction(const DataPrediction& d, float x, const float* m) {
  return std::fma(d.q, model_prediction(d, m), d.p * x);
}

#ifdef DDPM_FAST_X86
AVX2 inline __m256 model_prediction8(const DataPrediction& d, const float* m) {
  const __m256 c = _mm256_loadu_ps(m);
  if (!d.guided || d.w == 1.0f) return c;
  const __m256 u = _mm256_loadu_ps(m + d.un);
  return d.w == 0.0f ? u : _mm256_fmadd_ps(_mm256_set1_ps(d.w), _mm256_sub_ps(c, u), u);
}

AVX2 inline __m256 data_prediction8(const DataPrediction& d, __m256 x, const float* m) {
  return _mm256_fmadd_ps(_mm256_set1_ps(d.q), model_prediction8(d, m), _mm256_mul_ps(_mm256_set1_ps(d.p), x));
}
#endif

}  // namespace ddpm_fast
