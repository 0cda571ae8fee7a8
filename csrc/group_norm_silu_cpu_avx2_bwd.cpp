// AVX2+FMA kernels of the CPU GroupNorm+SiLU backward (fp32 and bf16 storage, fp32 math), each with the
// signature and contract of the portable kernel it replaces in group_norm_silu_cpu.cpp (bwd_nchw_group,
// nhwc_bwd_sums, nhwc_bwd_dx). Pass 1 computes dz = dy * silu'(z) and the per-channel sums of dz * xhat and dz
// in fp32 accumulators flushed into fp64 every kFlush additions per lane (the portable kernels add every
// element into one fp64 chain, bounded by the add latency); pass 2 writes dx = alpha*dz + a2*(x - mu) + b2.
#include <vector>

#include "group_norm_silu_cpu_avx2_math.h"

#ifdef GNS_HAVE_AVX2
namespace ddpm_fast {
namespace gns_avx2 {
namespace {

// One NCHW channel of n elements: g[i] = dy * silu'((x - mu) * r * w + b). Sums of g * xhat and of g: lane
// partials left in pw, pb (fp32, at most kFlush additions each); earlier partials flushed into fw, fb.
template <typename T>
AVX2 void channel_grad(const T* x, const T* dy, float* g, int64_t n, __m256 mu, __m256 r, __m256 w, __m256 b,
                       float* pw, float* pb, double* fw, double* fb) {
  __m256 aw = _mm256_setzero_ps(), ab = _mm256_setzero_ps();
  *fw = *fb = 0.0;
  int64_t i = 0, k = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 xh = _mm256_mul_ps(_mm256_sub_ps(ld(x + i), mu), r);
    const __m256 gv = silu_grad8(_mm256_fmadd_ps(xh, w, b), ld(dy + i));
    st(g + i, gv);
    aw = _mm256_fmadd_ps(gv, xh, aw);
    ab = _mm256_add_ps(ab, gv);
    if (++k == kFlush) {
      *fw += hsum(widen_add(_mm256_setzero_pd(), aw)), *fb += hsum(widen_add(_mm256_setzero_pd(), ab));
      aw = ab = _mm256_setzero_ps(), k = 0;
    }
  }
  if (i < n) {  // zero-padded lanes have dy = 0, hence g = 0: they add nothing
    const __m256 xh = _mm256_mul_ps(_mm256_sub_ps(ld_part(x + i, n - i), mu), r);
    const __m256 gv = silu_grad8(_mm256_fmadd_ps(xh, w, b), ld_part(dy + i, n - i));
    st_part(g + i, gv, n - i);
    aw = _mm256_fmadd_ps(gv, xh, aw);
    ab = _mm256_add_ps(ab, gv);
  }
  _mm256_storeu_ps(pw, aw);
  _mm256_storeu_ps(pb, ab);
}

// Lane k of the result: the sum of the 8 lanes of v[k]. Eight horizontal sums for the price of about one each.
AVX2 __m256 transpose_sum8(const float (*v)[8]) {
  const __m256 h01 = _mm256_hadd_ps(ld(v[0]), ld(v[1])), h23 = _mm256_hadd_ps(ld(v[2]), ld(v[3]));
  const __m256 h45 = _mm256_hadd_ps(ld(v[4]), ld(v[5])), h67 = _mm256_hadd_ps(ld(v[6]), ld(v[7]));
  const __m256 lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67);  // lanes 0-3 | 4-7 of v[0..3], v[4..7]
  return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

// dx[i] = alpha * g[i] + a2 * (x[i] - mu) + b2 over one channel.
template <typename T>
AVX2 void channel_dx(const T* x, const float* g, T* dx, int64_t n, __m256 mu, __m256 alpha, __m256 a2, __m256 b2) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    st(dx + i, _mm256_fmadd_ps(alpha, ld(g + i), _mm256_fmadd_ps(a2, _mm256_sub_ps(ld(x + i), mu), b2)));
  if (i < n) {
    const __m256 xm = _mm256_sub_ps(ld_part(x + i, n - i), mu);
    st_part(dx + i, _mm256_fmadd_ps(alpha, ld_part(g + i, n - i), _mm256_fmadd_ps(a2, xm, b2)), n - i);
  }
}

// One NHWC vector of pass 1: channels [c, c + n) of one row (n == 8 unless kPart: the last C % 8 channels).
template <bool kPart, typename T>
AVX2 void row_grad(const T* xr, const T* gr, T* zr, int64_t c, int64_t n, const float* mu, const float* rs,
                   const float* w, const float* b, float* aw, float* ab) {
  const __m256 xh = _mm256_mul_ps(_mm256_sub_ps(ldv<kPart>(xr + c, n), ldv<kPart>(mu + c, n)), ldv<kPart>(rs + c, n));
  const __m256 g = silu_grad8(_mm256_fmadd_ps(xh, ldv<kPart>(w + c, n), ldv<kPart>(b + c, n)), ldv<kPart>(gr + c, n));
  if (kStashDz<T>) stv<kPart>(zr + c, g, n);
  stv<kPart>(aw + c, _mm256_fmadd_ps(g, xh, ldv<kPart>(aw + c, n)), n);
  stv<kPart>(ab + c, _mm256_add_ps(ldv<kPart>(ab + c, n), g), n);
}

// One NHWC vector of pass 2.
template <bool kPart, typename T>
AVX2 void row_dx(const T* xr, const T* gr, T* out, int64_t c, int64_t n, const float* mu, const float* rs,
                 const float* w, const float* b, const float* alpha, const float* a2, const float* b2) {
  const __m256 xm = _mm256_sub_ps(ldv<kPart>(xr + c, n), ldv<kPart>(mu + c, n));
  __m256 g;
  if (kStashDz<T>) g = ldv<kPart>(out + c, n);
  else g = silu_grad8(_mm256_fmadd_ps(_mm256_mul_ps(xm, ldv<kPart>(rs + c, n)), ldv<kPart>(w + c, n),
                                      ldv<kPart>(b + c, n)), ldv<kPart>(gr + c, n));
  const __m256 v = _mm256_fmadd_ps(ldv<kPart>(alpha + c, n), g,
                                   _mm256_fmadd_ps(ldv<kPart>(a2 + c, n), xm, ldv<kPart>(b2 + c, n)));
  stv<kPart>(out + c, v, n);
}

}  // namespace

// Channels go in batches of 8 whose lane partials are reduced together (transpose_sum8): a horizontal sum per
// channel cost as much as the channel's own work at 4x4.
template <typename T>
GNS_AVX2_FN void bwd_group(const T* x, const T* dy, T* dx, const float* w, const float* b, int64_t D, int64_t HW,
                           float mu, float r, float* scratch, double* dwp, double* db) {
  const __m256 vmu = set1(mu), vr = set1(r);
  double s1 = 0, s2 = 0;
  for (int64_t d0 = 0; d0 < D; d0 += 8) {
    const int64_t nb = imin(8, D - d0);
    float pw[8][8] = {}, pb[8][8] = {}, tw[8], tb[8];
    double fw[8], fb[8];
    for (int64_t k = 0; k < nb; ++k) {
      const int64_t d = d0 + k;
      channel_grad(x + d * HW, dy + d * HW, scratch + d * HW, HW, vmu, vr, set1(w ? w[d] : 1.0f),
                   set1(b ? b[d] : 0.0f), pw[k], pb[k], fw + k, fb + k);
    }
    st(tw, transpose_sum8(pw));
    st(tb, transpose_sum8(pb));
    for (int64_t k = 0; k < nb; ++k) {
      const double wd = w ? w[d0 + k] : 1.0;
      dwp[d0 + k] = fw[k] + double(tw[k]), db[d0 + k] = fb[k] + double(tb[k]);
      s1 += wd * db[d0 + k], s2 += wd * dwp[d0 + k];
    }
  }
  const double M = double(D * HW);
  const __m256 a2 = set1(float(-double(r) * double(r) * s2 / M)), b2 = set1(float(-double(r) * s1 / M));
  for (int64_t d = 0; d < D; ++d)
    channel_dx(x + d * HW, scratch + d * HW, dx + d * HW, HW, vmu, set1(w ? r * w[d] : r), a2, b2);
}

// NHWC pass 1 (contract of nhwc_bwd_sums): per-channel fp32 partials over up to kFlush rows, then into dwp, db.
template <typename T>
GNS_AVX2_FN void nhwc_bwd_sums(const T* x, const T* dy, T* dz, int64_t rows, int64_t C, const float* mu,
                               const float* rs, const float* w, const float* b, double* dwp, double* db) {
  thread_local std::vector<float> acc;  // this thread's partials: 2*C floats, reused across calls
  acc.assign(size_t(2 * C), 0.0f);
  float* aw = acc.data();
  float* ab = aw + C;
  const int64_t C8 = C / 8 * 8;
  for (int64_t r0 = 0; r0 < rows; r0 += kFlush) {
    for (int64_t rr = r0; rr < imin(rows, r0 + kFlush); ++rr) {
      const int64_t o = rr * C;
      for (int64_t c = 0; c < C8; c += 8) row_grad<false>(x + o, dy + o, dz + o, c, 8, mu, rs, w, b, aw, ab);
      if (C8 < C) row_grad<true>(x + o, dy + o, dz + o, C8, C - C8, mu, rs, w, b, aw, ab);
    }
    for (int64_t c = 0; c < C; ++c) dwp[c] += double(aw[c]), db[c] += double(ab[c]), aw[c] = ab[c] = 0.0f;
  }
}

// NHWC pass 2 (contract of nhwc_bwd_dx): dz read back from dx (kStashDz) or recomputed.
template <typename T>
GNS_AVX2_FN void nhwc_bwd_dx(const T* x, const T* dy, T* dx, int64_t rows, int64_t C, const float* mu,
                             const float* rs, const float* w, const float* b, const float* alpha, const float* a2,
                             const float* b2) {
  const int64_t C8 = C / 8 * 8;
  for (int64_t rr = 0; rr < rows; ++rr) {
    const int64_t o = rr * C;
    for (int64_t c = 0; c < C8; c += 8) row_dx<false>(x + o, dy + o, dx + o, c, 8, mu, rs, w, b, alpha, a2, b2);
    if (C8 < C) row_dx<true>(x + o, dy + o, dx + o, C8, C - C8, mu, rs, w, b, alpha, a2, b2);
  }
}

#define GNS_AVX2_BWD_INSTANTIATE(T)                                                                           \
  template void bwd_group<T>(const T*, const T*, T*, const float*, const float*, int64_t, int64_t, float,    \
                             float, float*, double*, double*);                                               \
  template void nhwc_bwd_sums<T>(const T*, const T*, T*, int64_t, int64_t, const float*, const float*,       \
                                 const float*, const float*, double*, double*);                              \
  template void nhwc_bwd_dx<T>(const T*, const T*, T*, int64_t, int64_t, const float*, const float*,         \
                               const float*, const float*, const float*, const float*, const float*);
GNS_AVX2_BWD_INSTANTIATE(float)
GNS_AVX2_BWD_INSTANTIATE(bf16)

}  // namespace gns_avx2
}  // namespace ddpm_fast
#endif  // GNS_HAVE_AVX2
