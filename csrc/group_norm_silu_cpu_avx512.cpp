// The AVX-512 (F, BW, DQ, VL) build of the CPU GroupNorm+SiLU SIMD kernels (group_norm_silu_cpu_simd_{fwd,bwd}.inc over
// group_norm_silu_cpu_vec.h), compiled for that ISA by `#pragma GCC target` while the rest of the library keeps
// the baseline one; group_norm_silu_cpu.cpp calls them only on CPUs that have it (gns_cpu_isa_active).
#include <cstdint>
#include <cstring>

#include "group_norm_silu.h"
#include "group_norm_silu_cpu_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
#define GNS_VEC_AVX512 1
namespace ddpm_fast {
namespace gns_avx512 {
#include "group_norm_silu_cpu_vec.h"
#include "group_norm_silu_cpu_simd_fwd.inc"
#include "group_norm_silu_cpu_simd_bwd.inc"

#define GNS_SIMD_INSTANTIATE(T)                                                                                 \
  template void fwd_nchw<T>(const GroupNormSiLUParams&, int64_t, int64_t);                                      \
  template void col_sums<T>(const T*, int64_t, int64_t, const float*, double*, double*);                         \
  template void fwd_rows<T>(const T*, T*, int64_t, int64_t, const float*, const float*, const float*);          \
  template void bwd_group<T>(const T*, const T*, T*, const float*, const float*, int64_t, int64_t, float, float, \
                             float*, double*, double*);                                                         \
  template void nhwc_bwd_sums<T>(const T*, const T*, T*, int64_t, int64_t, const float*, const float*,           \
                                 const float*, const float*, double*, double*);                                 \
  template void nhwc_bwd_dx<T>(const T*, const T*, T*, int64_t, int64_t, const float*, const float*,             \
                               const float*, const float*, const float*, const float*, const float*);
GNS_SIMD_INSTANTIATE(float)
GNS_SIMD_INSTANTIATE(bf16)

}  // namespace gns_avx512
}  // namespace ddpm_fast
#pragma GCC pop_options
#endif
