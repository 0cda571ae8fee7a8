// The AVX2+FMA build of the CPU GroupNorm+SiLU SIMD kernels (group_norm_silu_cpu_simd_{fwd,bwd}.inc over
// group_norm_silu_cpu_vec.h), compiled for that ISA by `#pragma GCC target` while the rest of the library keeps
// the baseline one; group_norm_silu_cpu.cpp calls them only on CPUs that have it (gns_cpu_isa_active).
#include <cstdint>
#include <cstring>

#include "group_norm_silu.h"
#include "group_norm_silu_cpu_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define GNS_VEC_AVX2 1
namespace ddpm_fast {
namespace gns_avx2 {
#include "group_norm_silu_cpu_vec.h"
#include "group_norm_silu_cpu_simd_fwd.inc"
#include "group_norm_silu_cpu_simd_bwd.inc"
#include "group_norm_silu_cpu_simd_instances.inc"

}  // namespace gns_avx2
}  // namespace ddpm_fast
#pragma GCC pop_options
#endif
