// AVX2+FMA building blocks of the CPU GroupNorm+SiLU kernels (group_norm_silu_cpu_avx2*.cpp): 8-lane loads
// and stores of fp32 and bf16 (with zero-padded partial vectors for tails), silu and its gradient, and fp64
// widening sums. Every function carries target("avx2,fma") and is inlined into its caller, which carries it
// too; all of it lives in an anonymous namespace, so each including file has its own copy.
#pragma once

#include <cstdint>
#include <cstring>

#include "group_norm_silu_cpu_avx2.h"
#include "group_norm_silu_cpu_math.h"

#ifdef GNS_HAVE_AVX2
#include <immintrin.h>

namespace ddpm_fast {
namespace gns_avx2 {
namespace {

// fp32 partial sums run over at most this many additions per lane before they are flushed into fp64:
// their rounding then stays near fp32 round-off of a 16-term sum (what PyTorch's cascade sums also reach).
constexpr int64_t kFlush = 16;

#define AVX2 __attribute__((target("avx2,fma"), always_inline)) inline

GNS_INLINE int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
AVX2 __m256 set1(float v) { return _mm256_set1_ps(v); }
AVX2 __m256 ld(const float* p) { return _mm256_loadu_ps(p); }
AVX2 __m256 ld(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
AVX2 void st(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
// Round to nearest even, NaN kept quiet: the scalar store(bf16*) of group_norm_silu_cpu_math.h, 8 lanes.
AVX2 void st(bf16* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)),
                                         _mm256_set1_epi32(0x7F800000));
  const __m256i quiet = _mm256_or_si256(u, _mm256_set1_epi32(0x00400000));
  const __m256i hi = _mm256_srli_epi32(_mm256_blendv_epi8(rounded, quiet, nan), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
// The first n < 8 elements, through a zero-padded buffer (tails of rows and channels).
template <typename T> AVX2 __m256 ld_part(const T* p, int64_t n) {
  T buf[8];
  std::memset(buf, 0, sizeof buf);
  std::memcpy(buf, p, size_t(n) * sizeof(T));
  return ld(buf);
}
template <typename T> AVX2 void st_part(T* p, __m256 v, int64_t n) {
  T buf[8];
  st(buf, v);
  std::memcpy(p, buf, size_t(n) * sizeof(T));
}
// A whole vector, or (kPart) the first n.
template <bool kPart, typename T> AVX2 __m256 ldv(const T* p, int64_t n) { return kPart ? ld_part(p, n) : ld(p); }
template <bool kPart, typename T> AVX2 void stv(T* p, __m256 v, int64_t n) {
  if (kPart) st_part(p, v, n);
  else st(p, v);
}

// 1 + exp(-z), for silu(z) = z / (1 + exp(-z)): exp_f of group_norm_silu_cpu_math.h evaluated at x = -z with the negation
// folded into the constants (r' = -r, odd coefficients negated), and 2^n read off the rounding constant's
// low bits: magic + n has bits 0x4B400000 + n, so (bits + 127) << 23 is 2^n (the magic's bits shift out).
AVX2 __m256 one_plus_exp_neg8(__m256 z) {
  const __m256 zc = _mm256_min_ps(_mm256_max_ps(z, set1(-88.0f)), set1(87.0f));  // NaN -> -88; y stays NaN
  const __m256 magic = set1(12582912.0f);
  const __m256 s = _mm256_fmadd_ps(zc, set1(-1.44269504088896341f), magic);
  const __m256 n = _mm256_sub_ps(s, magic);
  __m256 r = _mm256_fmadd_ps(n, set1(0.693359375f), zc);
  r = _mm256_fnmadd_ps(n, set1(2.12194440e-4f), r);
  __m256 p = set1(-0.008290315046906471f);
  p = _mm256_fmadd_ps(p, r, set1(0.04189793020486832f));
  p = _mm256_fmadd_ps(p, r, set1(-0.1666763573884964f));
  p = _mm256_fmadd_ps(p, r, set1(0.4999915063381195f));
  p = _mm256_fmadd_ps(p, r, set1(-0.9999997019767761f));
  p = _mm256_fmadd_ps(p, r, set1(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(s), _mm256_set1_epi32(127)), 23);
  return _mm256_fmadd_ps(p, _mm256_castsi256_ps(bits), set1(1.0f));
}
AVX2 __m256 silu8(__m256 z) { return _mm256_div_ps(z, one_plus_exp_neg8(z)); }
// dy * d silu(z) / dz = dy * s * (1 + z * (1 - s)), s = sigmoid(z): silu_grad of group_norm_silu_cpu_math.h.
AVX2 __m256 silu_grad8(__m256 z, __m256 dy) {
  const __m256 s = _mm256_div_ps(set1(1.0f), one_plus_exp_neg8(z));
  return _mm256_mul_ps(_mm256_mul_ps(dy, s), _mm256_fmadd_ps(z, _mm256_sub_ps(set1(1.0f), s), set1(1.0f)));
}

// Adds the 8 lanes of v, widened to fp64, into acc (4 lanes).
AVX2 __m256d widen_add(__m256d acc, __m256 v) {
  acc = _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
  return _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}
AVX2 double hsum(__m256d v) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

}  // namespace
}  // namespace gns_avx2
}  // namespace ddpm_fast
#endif  // GNS_HAVE_AVX2
