// One SIMD vector type for the GroupNorm+SiLU kernels of group_norm_silu_cpu_simd_*.inc: struct V, W fp32 lanes,
// with loads and stores of fp32 and bf16 (whole and partial vectors), arithmetic, z / d, 2^n from a rounding
// constant's bits, and widening fp64 sums. Included by group_norm_silu_cpu_avx2.cpp (GNS_VEC_AVX2, W = 8) and
// group_norm_silu_cpu_avx512.cpp (GNS_VEC_AVX512, W = 16) inside their namespace, after `#pragma GCC target`,
// so every function here is compiled for that ISA only; no include guard on purpose.
namespace {

#define GNS_VI static inline __attribute__((always_inline))

#if defined(GNS_VEC_AVX512)
struct V {
  using F = __m512;
  using D = __m512d;
  static constexpr int64_t W = 16;
  GNS_VI F set1(float v) { return _mm512_set1_ps(v); }
  GNS_VI F zero() { return _mm512_setzero_ps(); }
  GNS_VI F add(F a, F b) { return _mm512_add_ps(a, b); }
  GNS_VI F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  GNS_VI F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  GNS_VI F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }    // a * b + c
  GNS_VI F fnma(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
  GNS_VI F max(F a, F b) { return _mm512_max_ps(a, b); }  // NaN in a -> b
  GNS_VI F min(F a, F b) { return _mm512_min_ps(a, b); }
  // z / d as z times a 14-bit reciprocal estimate refined by one Newton step (relative error ~2^-28 before the
  // two roundings): a zmm division is split in two on the divider and would bound the loops.
  GNS_VI F recip(F d) {
    const F r = _mm512_rcp14_ps(d);
    return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, set1(1.0f)), r);
  }
  GNS_VI F ratio(F z, F d) { return _mm512_mul_ps(z, recip(d)); }
  // 2^n from s = magic + n (the bits of s are 0x4B400000 + n; shifting them by 23 drops the magic's)
  GNS_VI F pow2(F s) {
    const __m512i e = _mm512_add_epi32(_mm512_castps_si512(s), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
  GNS_VI F ld(const float* p) { return _mm512_loadu_ps(p); }
  GNS_VI F ld(const bf16* p) { return from_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  GNS_VI void st(float* p, F v) { _mm512_storeu_ps(p, v); }
  GNS_VI void st(bf16* p, F v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(v)); }
  GNS_VI __mmask16 first(int64_t n) { return __mmask16((1u << n) - 1u); }
  GNS_VI F ld_part(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first(n), p); }
  GNS_VI F ld_part(const bf16* p, int64_t n) { return from_bf16(_mm256_maskz_loadu_epi16(first(n), p)); }
  GNS_VI void st_part(float* p, F v, int64_t n) { _mm512_mask_storeu_ps(p, first(n), v); }
  GNS_VI void st_part(bf16* p, F v, int64_t n) { _mm256_mask_storeu_epi16(p, first(n), to_bf16(v)); }
  GNS_VI F from_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  // Round to nearest even, NaN kept quiet: the scalar store(bf16*) of group_norm_silu_cpu_math.h, 16 lanes.
  GNS_VI __m256i to_bf16(F v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
    const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                                                  _mm512_set1_epi32(0x7F800000));
    const __m512i out = _mm512_mask_blend_epi32(nan, rounded, _mm512_or_si512(u, _mm512_set1_epi32(0x00400000)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(out, 16));
  }
  GNS_VI D dzero() { return _mm512_setzero_pd(); }
  GNS_VI D lo(F v) { return _mm512_cvtps_pd(_mm512_castps512_ps256(v)); }
  GNS_VI D hi(F v) { return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))); }
  GNS_VI D widen_add(D acc, F v) { return _mm512_add_pd(_mm512_add_pd(acc, lo(v)), hi(v)); }
  GNS_VI double hsum(D v) { return _mm512_reduce_add_pd(v); }
  // p[0 .. W) += the lanes of v, in fp64
  GNS_VI void add_to(double* p, F v) {
    _mm512_storeu_pd(p, _mm512_add_pd(_mm512_loadu_pd(p), lo(v)));
    _mm512_storeu_pd(p + 8, _mm512_add_pd(_mm512_loadu_pd(p + 8), hi(v)));
  }
};
#else  // GNS_VEC_AVX2
struct V {
  using F = __m256;
  using D = __m256d;
  static constexpr int64_t W = 8;
  GNS_VI F set1(float v) { return _mm256_set1_ps(v); }
  GNS_VI F zero() { return _mm256_setzero_ps(); }
  GNS_VI F add(F a, F b) { return _mm256_add_ps(a, b); }
  GNS_VI F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  GNS_VI F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  GNS_VI F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  GNS_VI F fnma(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  GNS_VI F max(F a, F b) { return _mm256_max_ps(a, b); }
  GNS_VI F min(F a, F b) { return _mm256_min_ps(a, b); }
  // A correctly rounded division: on the AVX2 CPUs measured it issues beside the FMAs, and a reciprocal
  // estimate plus a Newton step (3 more FMA-port operations) made the loops slower.
  GNS_VI F recip(F d) { return _mm256_div_ps(set1(1.0f), d); }
  GNS_VI F ratio(F z, F d) { return _mm256_div_ps(z, d); }
  GNS_VI F pow2(F s) {
    const __m256i e = _mm256_add_epi32(_mm256_castps_si256(s), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
  GNS_VI F ld(const float* p) { return _mm256_loadu_ps(p); }
  GNS_VI F ld(const bf16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  GNS_VI void st(float* p, F v) { _mm256_storeu_ps(p, v); }
  // Round to nearest even, NaN kept quiet: the scalar store(bf16*) of group_norm_silu_cpu_math.h, 8 lanes.
  GNS_VI void st(bf16* p, F v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)),
                                           _mm256_set1_epi32(0x7F800000));
    const __m256i quiet = _mm256_or_si256(u, _mm256_set1_epi32(0x00400000));
    const __m256i h = _mm256_srli_epi32(_mm256_blendv_epi8(rounded, quiet, nan), 16);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
  }
  // The first n < W elements, through a zero-padded buffer (AVX2 has no masked 16-bit loads).
  template <typename T> GNS_VI F ld_part(const T* p, int64_t n) {
    T buf[W];
    std::memset(buf, 0, sizeof buf);
    std::memcpy(buf, p, size_t(n) * sizeof(T));
    return ld(buf);
  }
  template <typename T> GNS_VI void st_part(T* p, F v, int64_t n) {
    T buf[W];
    st(buf, v);
    std::memcpy(p, buf, size_t(n) * sizeof(T));
  }
  GNS_VI D dzero() { return _mm256_setzero_pd(); }
  GNS_VI D lo(F v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
  GNS_VI D hi(F v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }
  GNS_VI D widen_add(D acc, F v) { return _mm256_add_pd(_mm256_add_pd(acc, lo(v)), hi(v)); }
  GNS_VI double hsum(D v) {
    const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
  }
  GNS_VI void add_to(double* p, F v) {
    _mm256_storeu_pd(p, _mm256_add_pd(_mm256_loadu_pd(p), lo(v)));
    _mm256_storeu_pd(p + 4, _mm256_add_pd(_mm256_loadu_pd(p + 4), hi(v)));
  }
};
#endif

// A whole vector, or (kPart) the first n lanes.
template <bool kPart, typename T> GNS_VI V::F ldv(const T* p, int64_t n) {
  return kPart ? V::ld_part(p, n) : V::ld(p);
}
template <bool kPart, typename T> GNS_VI void stv(T* p, V::F v, int64_t n) {
  if (kPart) V::st_part(p, v, n);
  else V::st(p, v);
}

GNS_VI int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// fp32 partial sums run over at most this many additions per lane before they are flushed into fp64: their
// rounding then stays near fp32 round-off of a 16-term sum (what PyTorch's cascade sums also reach).
constexpr int64_t kFlush = 16;

// 1 + exp(-z): exp_f of group_norm_silu_cpu_math.h at x = -z, the negation folded into the constants (r' = -r,
// odd coefficients negated), 2^n from the rounding constant's bits (V::pow2), the last step one FMA.
GNS_VI V::F one_plus_exp_neg(V::F z) {
  const V::F zc = V::min(V::max(z, V::set1(-88.0f)), V::set1(87.0f));  // NaN -> -88: silu(NaN) stays NaN
  const V::F magic = V::set1(12582912.0f);
  const V::F s = V::fma(zc, V::set1(-1.44269504088896341f), magic);
  const V::F n = V::sub(s, magic);
  V::F r = V::fma(n, V::set1(0.693359375f), zc);
  r = V::fnma(n, V::set1(2.12194440e-4f), r);
  V::F p = V::set1(-0.008290315046906471f);
  p = V::fma(p, r, V::set1(0.04189793020486832f));
  p = V::fma(p, r, V::set1(-0.1666763573884964f));
  p = V::fma(p, r, V::set1(0.4999915063381195f));
  p = V::fma(p, r, V::set1(-0.9999997019767761f));
  p = V::fma(p, r, V::set1(1.0f));
  return V::fma(p, V::pow2(s), V::set1(1.0f));
}
GNS_VI V::F silu(V::F z) { return V::ratio(z, one_plus_exp_neg(z)); }
// dy * d silu(z) / dz = dy * s * (1 + z * (1 - s)), s = sigmoid(z): silu_grad of group_norm_silu_cpu_math.h.
GNS_VI V::F silu_grad(V::F z, V::F dy) {
  const V::F one = V::set1(1.0f), s = V::recip(one_plus_exp_neg(z));
  return V::mul(V::mul(dy, s), V::fma(z, V::sub(one, s), one));
}

}  // namespace
