// The AVX2+FMA kernels of the CPU GroupNorm+SiLU (group_norm_silu_cpu_avx2.cpp), for fp32 and bf16 storage
// (fp32 math). group_norm_silu_cpu.cpp calls them instead of its portable kernels when cpu_simd() says so;
// each has the signature of the portable kernel it replaces. Layouts and arguments as in group_norm_silu.h.
#pragma once

#include <cstdint>

#include "group_norm_silu.h"

// The AVX2 kernels exist on x86-64 with GCC or Clang (target attributes); elsewhere only the portable ones.
// Declarations carry the target too: in C++ a definition with another target than its declaration would be a
// second version of the function (GCC's function multiversioning), not the same function.
#if defined(__x86_64__) && defined(__GNUC__)
#define GNS_HAVE_AVX2 1
#define GNS_AVX2_FN __attribute__((target("avx2,fma")))
#else
#define GNS_AVX2_FN
#endif

namespace ddpm_fast {

struct bf16;

// True when the AVX2 kernels are built, the CPU has AVX2 and FMA, and no one forced the portable path.
bool gns_cpu_simd();
// Selects the kernels: "auto" (AVX2 where available) or "portable"; "" only asks. Returns the active set:
// "avx2" or "portable".
const char* gns_cpu_isa(const char* request);

namespace gns_avx2 {

// NCHW: groups [t0, t1) of p (group t = n*G + g: D*HW contiguous elements from t*D*HW) -> y, mean, rstd.
template <typename T> GNS_AVX2_FN void fwd_nchw(const GroupNormSiLUParams& p, int64_t t0, int64_t t1);
// NHWC: column sums of (x - shift[c]) and of their squares over `rows` rows of C channels, added into s, q.
template <typename T>
GNS_AVX2_FN void col_sums(const T* x, int64_t rows, int64_t C, const float* shift, double* s, double* q);
// NHWC: y = silu((x - mu[c]) * a[c] + c0[c]) over `rows` rows of C channels.
template <typename T>
GNS_AVX2_FN void fwd_rows(const T* x, T* y, int64_t rows, int64_t C, const float* mu, const float* a,
                          const float* c0);

// Backward kernels, each with the contract of the portable kernel of the same role in group_norm_silu_cpu.cpp:
// NCHW, one group (scratch: D*HW floats); NHWC pass 1 (sums into dwp, db; dz parked in dz for fp32) and pass 2.
template <typename T>
GNS_AVX2_FN void bwd_group(const T* x, const T* dy, T* dx, const float* w, const float* b, int64_t D, int64_t HW,
                           float mu, float r, float* scratch, double* dwp, double* db);
template <typename T>
GNS_AVX2_FN void nhwc_bwd_sums(const T* x, const T* dy, T* dz, int64_t rows, int64_t C, const float* mu,
                               const float* rs, const float* w, const float* b, double* dwp, double* db);
template <typename T>
GNS_AVX2_FN void nhwc_bwd_dx(const T* x, const T* dy, T* dx, int64_t rows, int64_t C, const float* mu,
                             const float* rs, const float* w, const float* b, const float* alpha, const float* a2,
                             const float* b2);

}  // namespace gns_avx2
}  // namespace ddpm_fast
