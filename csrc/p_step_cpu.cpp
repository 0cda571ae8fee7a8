// CPU kernels of the diffusion ops: the in-kernel Philox noise stream of ops/triton/philox.py, and the fused
// reverse step  out = a * clip(p * x + q * m) + b * x + sigma * z  in one pass over memory.
//
// Noise: element e (global memory-order index = element_offset + local index) at (seed, step, stream) is
// normal number (e % 4) of Philox4x32-10 with key = seed and counter = (e/4 low, step, stream, e/4 high),
// Box-Muller as triton.language.pair_uniform_to_normal. CPU and GPU therefore draw the same stream, equal up
// to float rounding of log/sin/cos. Counter-based, so tiles run on any number of threads with the same result.
// An AVX2+FMA path is chosen at run time (the build targets the baseline ISA); the scalar path is the fallback.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "cpu_kernels.h"
#include "data_prediction.h"

namespace ddpm_fast {
namespace {

constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u, kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
constexpr float kTwoPi = 6.283185307179586f;

// uint32 -> [0, 1) exactly as triton's uint_to_uniform_float: as int32, negatives folded by bitwise not.
inline float to_uniform(uint32_t r) {
  int32_t v = static_cast<int32_t>(r);
  if (v < 0) v = ~v;
  return static_cast<float>(v) * 4.6566127342e-10f;
}

void randn_groups_scalar(float* dst, uint64_t g0, int64_t ng, uint64_t seed, uint32_t step, uint32_t stream) {
  for (int64_t i = 0; i < ng; ++i) {
    uint64_t g = g0 + static_cast<uint64_t>(i);
    uint32_t c0 = static_cast<uint32_t>(g), c1 = step, c2 = stream, c3 = static_cast<uint32_t>(g >> 32);
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      uint64_t p0 = static_cast<uint64_t>(kRoundB) * c2, p1 = static_cast<uint64_t>(kRoundA) * c0;
      c0 = static_cast<uint32_t>(p0 >> 32) ^ c1 ^ k0;
      c2 = static_cast<uint32_t>(p1 >> 32) ^ c3 ^ k1;
      c1 = static_cast<uint32_t>(p0);
      c3 = static_cast<uint32_t>(p1);
      k0 += kKeyA, k1 += kKeyB;
    }
    const uint32_t out[4] = {c0, c1, c2, c3};
    for (int pair = 0; pair < 2; ++pair) {
      float u1 = std::max(1.0e-7f, to_uniform(out[2 * pair])), th = kTwoPi * to_uniform(out[2 * pair + 1]);
      float rad = std::sqrt(-2.0f * std::log(u1));
      dst[4 * i + 2 * pair] = rad * std::cos(th);
      dst[4 * i + 2 * pair + 1] = rad * std::sin(th);
    }
  }
}

#ifdef DDPM_FAST_X86
AVX2 inline void mulhilo(__m256i a, __m256i m, __m256i* hi, __m256i* lo) {
  __m256i even = _mm256_mul_epu32(a, m);                        // 64-bit products of lanes 0, 2, 4, 6
  __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // and of lanes 1, 3, 5, 7
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

AVX2 inline __m256 uniform8(__m256i r) {
  __m256i folded = _mm256_xor_si256(r, _mm256_srai_epi32(r, 31));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(folded), _mm256_set1_ps(4.6566127342e-10f));
}

// Natural log for x in (0, 1]: x = m 2^e, m in [sqrt(1/2), sqrt(2)); Cephes logf's polynomial for log(1 + f).
AVX2 inline __m256 log8(__m256 x) {
  __m256i xi = _mm256_castps_si256(x);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(xi, 23), _mm256_set1_epi32(126)));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(xi, _mm256_set1_epi32(0x007FFFFF)),
                                                 _mm256_set1_epi32(0x3F000000)));  // m in [0.5, 1)
  __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(small, _mm256_set1_ps(1.0f)));
  __m256 f = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(small, m)), _mm256_set1_ps(1.0f));
  const float c[9] = {7.0376836292e-2f, -1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f,
                      1.4249322787e-1f, -1.6668057665e-1f, 2.0000714765e-1f, -2.4999993993e-1f,
                      3.3333331174e-1f};
  __m256 y = _mm256_set1_ps(c[0]);
  for (int i = 1; i < 9; ++i) y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(c[i]));
  __m256 z = _mm256_mul_ps(f, f);
  y = _mm256_mul_ps(_mm256_mul_ps(y, f), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(f, y));
}

// cos and sin of 2 pi u for u in [0, 1): reduce in turns to |phi| <= pi/4, Cephes sinf/cosf polynomials,
// then rotate by the quadrant.
AVX2 inline void sincos_turns8(__m256 u, __m256* c_out, __m256* s_out) {
  __m256 k = _mm256_round_ps(_mm256_mul_ps(u, _mm256_set1_ps(4.0f)), _MM_FROUND_TO_NEAREST_INT);
  __m256 phi = _mm256_mul_ps(_mm256_fnmadd_ps(k, _mm256_set1_ps(0.25f), u), _mm256_set1_ps(kTwoPi));
  __m256 z = _mm256_mul_ps(phi, phi);
  __m256 s = _mm256_fmadd_ps(_mm256_set1_ps(-1.9515295891e-4f), z, _mm256_set1_ps(8.3321608736e-3f));
  s = _mm256_fmadd_ps(s, z, _mm256_set1_ps(-1.6666654611e-1f));
  s = _mm256_fmadd_ps(_mm256_mul_ps(s, z), phi, phi);
  __m256 c = _mm256_fmadd_ps(_mm256_set1_ps(2.443315711809948e-5f), z, _mm256_set1_ps(-1.388731625493765e-3f));
  c = _mm256_fmadd_ps(c, z, _mm256_set1_ps(4.166664568298827e-2f));
  c = _mm256_fmadd_ps(_mm256_mul_ps(c, z), z, _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), _mm256_set1_ps(1.0f)));
  __m256i q = _mm256_cvtps_epi32(k);
  __m256 swap = _mm256_castsi256_ps(_mm256_slli_epi32(q, 31));  // odd quadrant: exchange sin and cos
  __m256 cc = _mm256_blendv_ps(c, s, swap), ss = _mm256_blendv_ps(s, c, swap);
  __m256i cos_neg = _mm256_slli_epi32(_mm256_srli_epi32(_mm256_add_epi32(q, _mm256_set1_epi32(1)), 1), 31);
  __m256i sin_neg = _mm256_slli_epi32(_mm256_srli_epi32(q, 1), 31);
  *c_out = _mm256_xor_ps(cc, _mm256_castsi256_ps(cos_neg));
  *s_out = _mm256_xor_ps(ss, _mm256_castsi256_ps(sin_neg));
}

// dst[4 j + k] = n[k][j] for the 8 groups j: a 4 x 8 transpose in registers.
AVX2 inline void store_groups8(float* dst, const __m256* n) {
  __m256 t0 = _mm256_unpacklo_ps(n[0], n[1]), t1 = _mm256_unpackhi_ps(n[0], n[1]);
  __m256 t2 = _mm256_unpacklo_ps(n[2], n[3]), t3 = _mm256_unpackhi_ps(n[2], n[3]);
  __m256 g04 = _mm256_shuffle_ps(t0, t2, 0x44), g15 = _mm256_shuffle_ps(t0, t2, 0xEE);  // groups 0|4, 1|5
  __m256 g26 = _mm256_shuffle_ps(t1, t3, 0x44), g37 = _mm256_shuffle_ps(t1, t3, 0xEE);  // groups 2|6, 3|7
  _mm256_storeu_ps(dst, _mm256_permute2f128_ps(g04, g15, 0x20));
  _mm256_storeu_ps(dst + 8, _mm256_permute2f128_ps(g26, g37, 0x20));
  _mm256_storeu_ps(dst + 16, _mm256_permute2f128_ps(g04, g15, 0x31));
  _mm256_storeu_ps(dst + 24, _mm256_permute2f128_ps(g26, g37, 0x31));
}

AVX2 void randn_groups_avx2(float* dst, uint64_t g0, int64_t ng, uint64_t seed, uint32_t step, uint32_t stream) {
  const __m256i ma = _mm256_set1_epi32(static_cast<int>(kRoundA));
  const __m256i mb = _mm256_set1_epi32(static_cast<int>(kRoundB));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t i = 0; i < ng; i += 8) {
    uint64_t g = g0 + static_cast<uint64_t>(i);
    // 8 consecutive groups; the high counter word is shared unless the low word wraps inside the batch
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g))), lane);
    __m256i c3 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g >> 32)));
    if (static_cast<uint32_t>(g) > 0xFFFFFFF8u) {
      alignas(32) uint32_t hi[8];
      for (int j = 0; j < 8; ++j) hi[j] = static_cast<uint32_t>((g + j) >> 32);
      c3 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
    }
    __m256i c1 = _mm256_set1_epi32(static_cast<int>(step)), c2 = _mm256_set1_epi32(static_cast<int>(stream));
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo(c2, mb, &hi0, &lo0);
      mulhilo(c0, ma, &hi1, &lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi0, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi1, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c1 = lo0, c3 = lo1;
      k0 += kKeyA, k1 += kKeyB;
    }
    __m256 n[4];
    const __m256i outs[4] = {c0, c1, c2, c3};
    for (int pair = 0; pair < 2; ++pair) {
      __m256 u1 = _mm256_max_ps(_mm256_set1_ps(1.0e-7f), uniform8(outs[2 * pair]));
      __m256 rad = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), log8(u1)));
      __m256 c, s;
      sincos_turns8(uniform8(outs[2 * pair + 1]), &c, &s);
      n[2 * pair] = _mm256_mul_ps(rad, c);
      n[2 * pair + 1] = _mm256_mul_ps(rad, s);
    }
    store_groups8(dst + 4 * i, n);
  }
}

// The common step (model output laid out like x, no learned variance):
// o = a * clip(p x + q m) + b x + sigma z, 8 lanes at a time; z may be null (no noise).
AVX2 void step_run_avx2(const float* x, const float* m, const float* z, float* o, int64_t len,
                        const DataPrediction& dp, float a, float b, float sigma, bool clip) {
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
  const __m256 vs = _mm256_set1_ps(sigma), lo = _mm256_set1_ps(clip ? -1.0f : -INFINITY);
  const __m256 hi = _mm256_set1_ps(clip ? 1.0f : INFINITY);
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    __m256 xv = _mm256_loadu_ps(x + i);
    __m256 x0 = data_prediction8(dp, xv, m + i);
    x0 = _mm256_min_ps(hi, _mm256_max_ps(lo, x0));  // operand order keeps NaN (max/min return the 2nd)
    __m256 r = _mm256_fmadd_ps(va, x0, _mm256_mul_ps(vb, xv));
    if (z) r = _mm256_fmadd_ps(vs, _mm256_loadu_ps(z + i), r);
    _mm256_storeu_ps(o + i, r);
  }
  for (; i < len; ++i) {  // the same fused roundings as the vector lanes: a tail element equals its vector twin
    float x0 = data_prediction(dp, x[i], m + i);
    if (clip) x0 = x0 < -1.0f ? -1.0f : (x0 > 1.0f ? 1.0f : x0);
    float r = std::fma(a, x0, b * x[i]);
    o[i] = z ? std::fma(sigma, z[i], r) : r;
  }
}

// exp(x) for |x| < 80 (learned_range's sigma): Cephes expf polynomial after x = k ln2 + r.
AVX2 void exp_inplace_avx2(float* v, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 x = _mm256_loadu_ps(v + i);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    const float c[5] = {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
    for (float ci : c) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(ci));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    _mm256_storeu_ps(v + i, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
  }
  for (; i < n; ++i) v[i] = std::exp(v[i]);
}
#endif  // DDPM_FAST_X86

void randn_groups(float* dst, int64_t g_lo, int64_t ng, uint64_t seed, uint32_t step, uint32_t stream) {
#ifdef DDPM_FAST_X86
  if (use_avx2()) return randn_groups_avx2(dst, static_cast<uint64_t>(g_lo), ng, seed, step, stream);
#endif
  randn_groups_scalar(dst, static_cast<uint64_t>(g_lo), ng, seed, step, stream);
}

// Normals of global elements [e0, e1) into dst[0 .. e1 - e0).
void randn_range(float* dst, int64_t e0, int64_t e1, uint64_t seed, uint32_t step, uint32_t stream) {
  const int64_t batch = use_avx2() ? 8 : 1;  // groups per generator call
  int64_t g_lo = e0 / 4, g_hi = (e1 + 3) / 4;
  int64_t g_mid = e0 % 4 ? g_lo + batch : g_lo;  // a leading partial group goes through the buffer
  int64_t g_full = g_mid + std::max<int64_t>(0, (e1 / 4 - g_mid) / batch * batch);
  if (g_full > g_mid) randn_groups(dst + (4 * g_mid - e0), g_mid, g_full - g_mid, seed, step, stream);
  auto partial = [&](int64_t g) {  // one batch through a buffer, keeping the part inside [e0, e1)
    float buf[32];
    randn_groups(buf, g, batch, seed, step, stream);
    for (int64_t e = std::max(e0, 4 * g); e < std::min(e1, 4 * (g + batch)); ++e) dst[e - e0] = buf[e - 4 * g];
  };
  if (g_mid != g_lo) partial(g_lo);
  if (g_full < g_hi) partial(g_full);
}

void exp_inplace(float* v, int64_t n) {
#ifdef DDPM_FAST_X86
  if (use_avx2()) return exp_inplace_avx2(v, n);
#endif
  for (int64_t i = 0; i < n; ++i) v[i] = std::exp(v[i]);
}

}  // namespace

bool use_avx2() {
#ifdef DDPM_FAST_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

void philox_randn_range(float* dst, int64_t e0, int64_t e1, uint64_t seed, uint32_t step, uint32_t stream) {
  randn_range(dst, e0, e1, seed, step, stream);
}

void philox_randn_cpu(float* out, int64_t n, uint64_t seed, uint32_t step, uint32_t stream, int64_t element_offset,
                      int threads) {
  if (n < 0 || element_offset < 0 || (n > 0 && out == nullptr))
    throw std::invalid_argument("philox_randn_cpu: bad size, offset or pointer");
  parallel_tiles(n, threads, [&](int64_t l0, int64_t l1) {
    randn_range(out + l0, element_offset + l0, element_offset + l1, seed, step, stream);
  });
}

struct PStepCpuArgs {
  const float *x, *mo, *noise;  // noise: nullptr = Philox (when sigma is used)
  float* out;
  int64_t N, C, S, mo_sn, mo_sc, mo_ss, var_off, element_offset;
  bool channels_last, clip, learned, add_noise;
  DataPrediction dp;  // x0 = dp.p * x + dp.q * m (m: the guided combine when dp.guided)
  float a, b, sigma, lv_lo, lv_hi;  // learned sigma = exp(lv_lo + lv_hi * v)
  uint64_t seed;
  uint32_t step, stream;
};

namespace {
// One run of consecutive x elements [l, l + len) whose model output sits at mo[base + i * st].
void apply_run(const PStepCpuArgs& A, int64_t l, int64_t len, int64_t base, int64_t st, const float* z,
               float* scratch) {
  const float* x = A.x + l;
  const float* m = A.mo + base;
  float* o = A.out + l;
#ifdef DDPM_FAST_X86
  if (st == 1 && !A.learned && use_avx2()) {
    step_run_avx2(x, m, A.add_noise ? z : nullptr, o, len, A.dp, A.a, A.b, A.sigma, A.clip);
    return;
  }
#endif
  for (int64_t i = 0; i < len; ++i) {
    float x0 = data_prediction(A.dp, x[i], m + i * st);
    if (A.clip) x0 = x0 < -1.0f ? -1.0f : (x0 > 1.0f ? 1.0f : x0);
    o[i] = A.a * x0 + A.b * x[i];
  }
  if (!A.add_noise) return;
  if (A.learned) {
    const float* v = m + A.var_off;
    for (int64_t i = 0; i < len; ++i) scratch[i] = A.lv_lo + A.lv_hi * v[i * st];
    exp_inplace(scratch, len);
    for (int64_t i = 0; i < len; ++i) o[i] += scratch[i] * z[i];
  } else {
    for (int64_t i = 0; i < len; ++i) o[i] += A.sigma * z[i];
  }
}
}  // namespace

void p_step_cpu(const PStepCpuArgs& A, int threads) {
  if (A.N < 0 || A.C < 1 || A.S < 1 || A.element_offset < 0 || !A.x || !A.mo || !A.out)
    throw std::invalid_argument("p_step_cpu: bad sizes or pointers");
  const int64_t n = A.N * A.C * A.S;
  const ModelOutputRuns runs(A.channels_last, A.N, A.C, A.S, A.mo_sn, A.mo_sc, A.mo_ss);
  parallel_tiles(n, threads, [&](int64_t l0, int64_t l1) {
    alignas(32) float z[kTile], scratch[kTile];  // a tile is at most kTile elements: no heap per tile
    const bool draw = A.add_noise && !A.noise;
    if (draw) randn_range(z, A.element_offset + l0, A.element_offset + l1, A.seed, A.step, A.stream);
    runs.for_each(l0, l1, [&](int64_t l, int64_t len, int64_t base) {
      const float* zp = A.noise ? A.noise + l : (draw ? z + (l - l0) : nullptr);
      apply_run(A, l, len, base, runs.in_st, zp, scratch);
    });
  });
}

// Flat entry point for the pybind11 binding: pointers as integers (0 = absent), sizes, coefficients.
void p_step_fused_cpu(uintptr_t x, uintptr_t mo, uintptr_t noise, uintptr_t out, int64_t N, int64_t C, int64_t S,
                      bool channels_last, int64_t mo_sn, int64_t mo_sc, int64_t mo_ss, int64_t var_off, double p,
                      double q, double a, double b, double sigma, double lv_lo, double lv_hi, bool clip,
                      bool learned, bool add_noise, uint64_t seed, uint32_t step, uint32_t stream,
                      int64_t element_offset, bool guided, double w, int64_t mo_un, int threads) {
  PStepCpuArgs A;
  A.x = reinterpret_cast<const float*>(x), A.mo = reinterpret_cast<const float*>(mo);
  A.noise = reinterpret_cast<const float*>(noise), A.out = reinterpret_cast<float*>(out);
  A.N = N, A.C = C, A.S = S, A.mo_sn = mo_sn, A.mo_sc = mo_sc, A.mo_ss = mo_ss, A.var_off = var_off;
  A.element_offset = element_offset, A.channels_last = channels_last, A.clip = clip, A.learned = learned;
  A.add_noise = add_noise, A.seed = seed, A.step = step, A.stream = stream;
  A.dp = DataPrediction{static_cast<float>(p), static_cast<float>(q), guided, static_cast<float>(w), mo_un};
  A.a = static_cast<float>(a);
  A.b = static_cast<float>(b), A.sigma = static_cast<float>(sigma);
  A.lv_lo = static_cast<float>(lv_lo), A.lv_hi = static_cast<float>(lv_hi);
  p_step_cpu(A, threads);
}

void philox_randn_fill_cpu(uintptr_t out, int64_t n, uint64_t seed, uint32_t step, uint32_t stream,
                           int64_t element_offset, int threads) {
  philox_randn_cpu(reinterpret_cast<float*>(out), n, seed, step, stream, element_offset, threads);
}

}  // namespace ddpm_fast
