// The SIMD kernels of the CPU GroupNorm+SiLU (AVX2+FMA and AVX-512), fp32 and bf16 storage with fp32 math, and
// the run-time choice among them and the portable kernels. Each kernel has the contract of the portable kernel of
// the same role in group_norm_silu_cpu_portable.h. They are compiled once per ISA from the same source
// (group_norm_silu_cpu_simd_{fwd,bwd}.inc, through group_norm_silu_cpu_avx2.cpp / ..._avx512.cpp, each under its
// `#pragma GCC target`), while the rest of the build targets the baseline x86-64 ISA: the library runs on any
// x86-64 CPU and uses what the CPU has. Declarations only; this header is not included by the ISA files.
#pragma once

#include <cstdint>

#include "group_norm_silu.h"

// GCC on x86-64 (the ISA files need #pragma GCC target); elsewhere only the portable kernels are built.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GNS_HAVE_SIMD 1
#endif

namespace ddpm_fast {

struct bf16;

enum class GnsIsa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// The kernels in use: the best the CPU has (AVX-512 F/BW/DQ/VL, else AVX2+FMA, else portable), capped by the
// last gns_cpu_isa request.
GnsIsa gns_cpu_isa_active();
// request: "auto" (the best), "avx512", "avx2" or "portable" (at most that one), or "" (only ask). Returns the
// name of the kernels now in use. std::invalid_argument for any other name.
const char* gns_cpu_isa(const char* request);

#define GNS_SIMD_DECLARE(NS)                                                                                    \
  namespace NS {                                                                                                \
  template <typename T> void fwd_nchw(const GroupNormSiLUParams& p, int64_t t0, int64_t t1);                   \
  template <typename T>                                                                                         \
  void col_sums(const T* x, int64_t rows, int64_t C, const float* shift, double* s, double* q);                 \
  template <typename T>                                                                                         \
  void fwd_rows(const T* x, T* y, int64_t rows, int64_t C, const float* mu, const float* a, const float* c0);   \
  template <typename T>                                                                                         \
  void bwd_group(const T* x, const T* dy, T* dx, const float* w, const float* b, int64_t D, int64_t HW,         \
                 float mu, float r, float* scratch, double* dwp, double* db);                                   \
  template <typename T>                                                                                         \
  void nhwc_bwd_sums(const T* x, const T* dy, T* dz, int64_t rows, int64_t C, const float* mu, const float* rs, \
                     const float* w, const float* b, double* dwp, double* db);                                  \
  template <typename T>                                                                                         \
  void nhwc_bwd_dx(const T* x, const T* dy, T* dx, int64_t rows, int64_t C, const float* mu, const float* rs,   \
                   const float* w, const float* b, const float* alpha, const float* a2, const float* b2);       \
  }
GNS_SIMD_DECLARE(gns_avx2)
GNS_SIMD_DECLARE(gns_avx512)

}  // namespace ddpm_fast
