// AVX2+FMA kernels of the CPU GroupNorm+SiLU forward (fp32 and bf16 storage, fp32 math), chosen at run time:
// the build targets the baseline x86-64 ISA, every function here carries target("avx2,fma"), and the driver
// (group_norm_silu_cpu.cpp) calls them only when the CPU has both (gns_cpu_simd).
//
// What they change against the portable kernels (measured in docs/ops.md):
//   statistics: 4+4 independent fp32 accumulators (8 lanes each) flushed into fp64 every 16 additions per
//     lane, instead of one fp64 chain whose add latency bounded the pass (4 cycles per 8 elements);
//   silu: the exp's negation folded into its constants, 2^n built from the rounding constant's bits (no
//     float->int conversion), one correctly rounded division (on the CPUs measured it issues beside the FMAs
//     and was faster than a reciprocal estimate plus a Newton step);
//   NHWC statistics: blocks of 32 channels kept in registers across rows, not a read-modify-write per element.
#include "group_norm_silu_cpu_avx2.h"

#include <atomic>
#include <cstring>
#include <string>

#include "group_norm_silu.h"
#include "group_norm_silu_cpu_avx2_math.h"

namespace ddpm_fast {

namespace {
std::atomic<bool> g_force_portable{false};

bool cpu_has_avx2() {
#ifdef GNS_HAVE_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}
}  // namespace

bool gns_cpu_simd() { return cpu_has_avx2() && !g_force_portable.load(std::memory_order_relaxed); }

const char* gns_cpu_isa(const char* request) {
  const std::string r(request);
  gns_require(r.empty() || r == "auto" || r == "portable",
              "isa must be 'auto', 'portable' or '' (query), got '" + r + "'");
  if (!r.empty()) g_force_portable.store(r == "portable");
  return gns_cpu_simd() ? "avx2" : "portable";
}

#ifdef GNS_HAVE_AVX2
namespace gns_avx2 {
namespace {

// Sums of (x[i] - shift) and of their squares over n contiguous elements.
template <typename T> AVX2 void shifted_sums(const T* x, int64_t n, float shift, double* s_out, double* q_out) {
  const __m256 sh = set1(shift);
  __m256d S = _mm256_setzero_pd(), Q = _mm256_setzero_pd();
  int64_t i = 0;
  while (i + 32 <= n) {
    const int64_t end = i + imin(32 * kFlush, (n - i) / 32 * 32);
    __m256 s[4], q[4];
    for (int k = 0; k < 4; ++k) s[k] = q[k] = _mm256_setzero_ps();
    for (; i < end; i += 32)
      for (int k = 0; k < 4; ++k) {
        const __m256 v = _mm256_sub_ps(ld(x + i + 8 * k), sh);
        s[k] = _mm256_add_ps(s[k], v);
        q[k] = _mm256_fmadd_ps(v, v, q[k]);
      }
    S = widen_add(S, _mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3])));
    Q = widen_add(Q, _mm256_add_ps(_mm256_add_ps(q[0], q[1]), _mm256_add_ps(q[2], q[3])));
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_sub_ps(ld(x + i), sh);
    S = widen_add(S, v);
    Q = widen_add(Q, _mm256_mul_ps(v, v));
  }
  double s = hsum(S), q = hsum(Q);
  for (; i < n; ++i) {
    const float v = load(x + i) - shift;
    s += double(v);
    q += double(v * v);
  }
  *s_out = s;
  *q_out = q;
}

// y[i] = silu((x[i] - mu) * a + c) over n contiguous elements.
template <typename T> AVX2 void norm_silu(const T* x, T* y, int64_t n, __m256 mu, __m256 a, __m256 c) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) st(y + i, silu8(_mm256_fmadd_ps(_mm256_sub_ps(ld(x + i), mu), a, c)));
  if (i < n) st_part(y + i, silu8(_mm256_fmadd_ps(_mm256_sub_ps(ld_part(x + i, n - i), mu), a, c)), n - i);
}

// NHWC statistics of NV*8 channels (from x[0]) over `rows` rows: fp32 accumulators in registers, flushed
// into s, q every kFlush rows.
template <typename T, int NV>
AVX2 void col_block(const T* x, int64_t rows, int64_t C, const float* shift, double* s, double* q) {
  __m256 sh[NV];
  for (int k = 0; k < NV; ++k) sh[k] = ld(shift + 8 * k);
  for (int64_t r0 = 0; r0 < rows; r0 += kFlush) {
    const int64_t r1 = imin(rows, r0 + kFlush);
    __m256 as[NV], aq[NV];
    for (int k = 0; k < NV; ++k) as[k] = aq[k] = _mm256_setzero_ps();
    for (int64_t r = r0; r < r1; ++r)
      for (int k = 0; k < NV; ++k) {
        const __m256 v = _mm256_sub_ps(ld(x + r * C + 8 * k), sh[k]);
        as[k] = _mm256_add_ps(as[k], v);
        aq[k] = _mm256_fmadd_ps(v, v, aq[k]);
      }
    for (int k = 0; k < NV; ++k)
      for (int h = 0; h < 2; ++h) {
        double* sp = s + 8 * k + 4 * h;
        double* qp = q + 8 * k + 4 * h;
        const __m128 sv = h ? _mm256_extractf128_ps(as[k], 1) : _mm256_castps256_ps128(as[k]);
        const __m128 qv = h ? _mm256_extractf128_ps(aq[k], 1) : _mm256_castps256_ps128(aq[k]);
        _mm256_storeu_pd(sp, _mm256_add_pd(_mm256_loadu_pd(sp), _mm256_cvtps_pd(sv)));
        _mm256_storeu_pd(qp, _mm256_add_pd(_mm256_loadu_pd(qp), _mm256_cvtps_pd(qv)));
      }
  }
}

}  // namespace

// Groups are handled in blocks of about kBlockBytes: first the statistics of every group of the block, then
// their normalization while the block is still in cache. Small groups (the U-Net's 4x4 and 8x8 sites) would
// otherwise wait, group after group, on the latency of one short sum and of finish_stats' sqrt and divisions.
constexpr int64_t kBlockBytes = 64 * 1024;

// Walks channel after channel through groups [t, ...) of an NCHW tensor: the (mu, a, c) of each channel.
struct ChannelWalk {
  const float *w, *b, *mean, *rstd;
  int64_t G, D, t, g, d = 0;
  __m256 mu, a, c;
  AVX2 void load() {
    const float r = rstd[t];
    mu = set1(mean[t]);
    a = set1(w ? r * w[g * D + d] : r);
    c = set1(b ? b[g * D + d] : 0.0f);
  }
  AVX2 void next() {
    if (++d == D) d = 0, ++t, g = g + 1 == G ? 0 : g + 1;
    load();
  }
};

// y over groups [t0, t1) once their statistics are in mean/rstd. When HW % 8 == 0 every vector lies in one
// channel, and one flat loop over the vectors keeps exp's constants in registers: a loop per channel made GCC
// reload them for every channel (about as many instructions as the 2 vectors of a 4x4 channel).
// While it works it prefetches x `ahead` elements on (the next block), so that block's statistics pass reads
// from cache and the memory traffic overlaps the exp and division of this one.
template <typename T>
AVX2 void normalize(const T* x, T* y, const GroupNormSiLUParams& p, int64_t t0, int64_t t1, const float* mean,
                    const float* rstd, int64_t ahead) {
  const int64_t HW = p.HW, M = p.D() * HW;
  ChannelWalk cw{static_cast<const float*>(p.weight), static_cast<const float*>(p.bias), mean, rstd, p.G, p.D(),
                 t0, t0 % p.G};
  cw.load();
  if (HW % 8 == 0) {
    const int64_t per_channel = HW / 8;
    int64_t left = per_channel;
    for (int64_t i = t0 * M; i < t1 * M; i += 8) {
      _mm_prefetch(reinterpret_cast<const char*>(x + i + ahead), _MM_HINT_T0);
      st(y + i, silu8(_mm256_fmadd_ps(_mm256_sub_ps(ld(x + i), cw.mu), cw.a, cw.c)));
      if (--left == 0 && i + 8 < t1 * M) left = per_channel, cw.next();
    }
    return;
  }
  for (int64_t off = t0 * M; off < t1 * M; off += HW) {
    norm_silu(x + off, y + off, HW, cw.mu, cw.a, cw.c);
    if (off + HW < t1 * M) cw.next();
  }
}

template <typename T> GNS_AVX2_FN void fwd_nchw(const GroupNormSiLUParams& p, int64_t t0, int64_t t1) {
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  float* mean = static_cast<float*>(p.mean);
  float* rstd = static_cast<float*>(p.rstd);
  const int64_t M = p.group_size(), per_block = 1 + kBlockBytes / int64_t(M * sizeof(T));
  for (int64_t b0 = t0; b0 < t1; b0 += per_block) {
    const int64_t b1 = imin(t1, b0 + per_block);
    for (int64_t t = b0; t < b1; ++t) {
      double s, q;
      const float shift = load(x + t * M);
      shifted_sums(x + t * M, M, shift, &s, &q);
      finish_stats(double(M), double(shift), s, q, p.eps, mean + t, rstd + t);
    }
    normalize(x, y, p, b0, b1, mean, rstd, b1 < t1 ? (b1 - b0) * M : 0);
  }
}

template <typename T>
GNS_AVX2_FN void col_sums(const T* x, int64_t rows, int64_t C, const float* shift, double* s, double* q) {
  int64_t c = 0;
  for (; c + 32 <= C; c += 32) col_block<T, 4>(x + c, rows, C, shift + c, s + c, q + c);
  for (; c + 8 <= C; c += 8) col_block<T, 1>(x + c, rows, C, shift + c, s + c, q + c);
  for (; c < C; ++c)  // the last C % 8 channels
    for (int64_t r = 0; r < rows; ++r) {
      const float v = load(x + r * C + c) - shift[c];
      s[c] += double(v);
      q[c] += double(v * v);
    }
}

template <typename T>
GNS_AVX2_FN void fwd_rows(const T* x, T* y, int64_t rows, int64_t C, const float* mu, const float* a,
                      const float* c0) {
  for (int64_t rr = 0; rr < rows; ++rr) {
    const T* xr = x + rr * C;
    T* yr = y + rr * C;
    int64_t c = 0;
    for (; c + 8 <= C; c += 8) {
      const __m256 z = _mm256_fmadd_ps(_mm256_sub_ps(ld(xr + c), ld(mu + c)), ld(a + c), ld(c0 + c));
      st(yr + c, silu8(z));
    }
    if (c < C) {
      const int64_t n = C - c;
      const __m256 z = _mm256_fmadd_ps(_mm256_sub_ps(ld_part(xr + c, n), ld_part(mu + c, n)), ld_part(a + c, n),
                                       ld_part(c0 + c, n));
      st_part(yr + c, silu8(z), n);
    }
  }
}

#define GNS_AVX2_INSTANTIATE(T)                                                                               \
  template void fwd_nchw<T>(const GroupNormSiLUParams&, int64_t, int64_t);                                  \
  template void col_sums<T>(const T*, int64_t, int64_t, const float*, double*, double*);                     \
  template void fwd_rows<T>(const T*, T*, int64_t, int64_t, const float*, const float*, const float*);
GNS_AVX2_INSTANTIATE(float)
GNS_AVX2_INSTANTIATE(bf16)

}  // namespace gns_avx2
#endif  // GNS_HAVE_AVX2

}  // namespace ddpm_fast
