// How every CPU sampler kernel turns the model output into the data prediction x_0: ONE definition, shared by the
// DDPM/DDIM step (p_step_cpu.cpp) and the few-step solvers (solver_step_cpu.cpp), scalar and 8-lane AVX2 with
// the same rounding (one fused multiply-add), so a vector lane equals its scalar twin bit for bit.
//   x_0 = p x + q m,   m the model's prediction read at `m`; (p, q) from the prediction type and the step:
//   eps: (1 / sqrt(abar), -sqrt(1 / abar - 1));  x0: (0, 1);  v: (sqrt(abar), -sqrt(1 - abar)).
// Whatever later changes how a model output becomes x_0 (e.g. guidance combining two halves of a batch) changes
// it here, for every sampler at once.
#pragma once
#include <cmath>

#include "cpu_kernels.h"

namespace ddpm_fast {

struct DataPrediction {
  float p, q;
};

inline float data_prediction(const DataPrediction& d, float x, const float* m) { return std::fma(d.q, *m, d.p * x); }

#ifdef DDPM_FAST_X86
AVX2 inline __m256 data_prediction8(const DataPrediction& d, __m256 x, const float* m) {
  return _mm256_fmadd_ps(_mm256_set1_ps(d.q), _mm256_loadu_ps(m), _mm256_mul_ps(_mm256_set1_ps(d.p), x));
}
#endif

}  // namespace ddpm_fast
