// CPU drivers of y = silu(group_norm(x)): forward and backward, NCHW and NHWC (no layout copy), fp32, bf16
// (fp32 math) and fp64. OpenMP over ranges of (n, group) for NCHW and over (n, row block) for NHWC; the per-task
// kernels are the SIMD ones of group_norm_silu_cpu_simd.h (AVX-512 or AVX2, chosen at run time by what the CPU
// has) for fp32 and bf16, else the portable ones of group_norm_silu_cpu_portable.h.
//
// Memory traffic: NCHW reads each group once from memory for the statistics and once more from cache to
// normalize (a group of the DDPM U-Net is <= 64 KB), and writes y once.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "group_norm_silu.h"
#include "group_norm_silu_cpu_math.h"
#include "group_norm_silu_cpu_portable.h"
#include "group_norm_silu_cpu_simd.h"

namespace ddpm_fast {

// See ExpRange (group_norm_silu_cpu_math.h).
volatile float gns_exp_lo = -87.0f, gns_exp_hi = 88.0f;

namespace {

// ---------------------------------------------------------------- which kernels

GnsIsa cpu_best_isa() {
#ifdef GNS_HAVE_SIMD
  static const GnsIsa best = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                     __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")
                                 ? GnsIsa::kAvx512
                             : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? GnsIsa::kAvx2
                                                                                                : GnsIsa::kPortable;
  return best;
#else
  return GnsIsa::kPortable;
#endif
}

std::atomic<int> g_isa_cap{int(GnsIsa::kAvx512)};  // the last gns_cpu_isa request ("auto": no cap)

const char* isa_name(GnsIsa isa) {
  return isa == GnsIsa::kAvx512 ? "avx512" : isa == GnsIsa::kAvx2 ? "avx2" : "portable";
}

}  // namespace

GnsIsa gns_cpu_isa_active() {
  return GnsIsa(std::min(int(cpu_best_isa()), g_isa_cap.load(std::memory_order_relaxed)));
}

const char* gns_cpu_isa(const char* request) {
  const std::string r(request);
  const GnsIsa cap = r == "portable" ? GnsIsa::kPortable : r == "avx2" ? GnsIsa::kAvx2 : GnsIsa::kAvx512;
  gns_require(r.empty() || r == "auto" || r == "avx512" || r == "avx2" || r == "portable",
              "isa must be 'auto', 'avx512', 'avx2', 'portable' or '' (query), got '" + r + "'");
  if (!r.empty()) g_isa_cap.store(int(cap));
  return isa_name(gns_cpu_isa_active());
}

namespace {

// ---------------------------------------------------------------- drivers

// The forward's per-task kernels for the active ISA (portable for fp64 and where nothing else is there).
template <typename T> struct FwdKernels {
  void (*nchw)(const GroupNormSiLUParams&, int64_t, int64_t);  // NCHW groups [t0, t1)
  void (*col_sums)(const T*, int64_t, int64_t, const Acc<T>*, double*, double*);
  void (*rows)(const T*, T*, int64_t, int64_t, const Acc<T>*, const Acc<T>*, const Acc<T>*);
};

template <typename T> FwdKernels<T> fwd_kernels() {
#ifdef GNS_HAVE_SIMD
  if constexpr (!std::is_same<T, double>::value) {
    const GnsIsa isa = gns_cpu_isa_active();
    if (isa == GnsIsa::kAvx512) return {&gns_avx512::fwd_nchw<T>, &gns_avx512::col_sums<T>, &gns_avx512::fwd_rows<T>};
    if (isa == GnsIsa::kAvx2) return {&gns_avx2::fwd_nchw<T>, &gns_avx2::col_sums<T>, &gns_avx2::fwd_rows<T>};
  }
#endif
  return {&fwd_nchw_range<T>, &nhwc_col_sums<T>, &nhwc_fwd_rows<T>};
}

// The backward's per-task kernels, chosen like the forward's.
template <typename T> struct BwdKernels {
  void (*nchw_group)(const T*, const T*, T*, const Acc<T>*, const Acc<T>*, int64_t, int64_t, Acc<T>, Acc<T>,
                     Acc<T>*, double*, double*);
  void (*nhwc_sums)(const T*, const T*, T*, int64_t, int64_t, const Acc<T>*, const Acc<T>*, const Acc<T>*,
                    const Acc<T>*, double*, double*);
  void (*nhwc_dx)(const T*, const T*, T*, int64_t, int64_t, const Acc<T>*, const Acc<T>*, const Acc<T>*,
                  const Acc<T>*, const Acc<T>*, const Acc<T>*, const Acc<T>*);
  bool simd;
};
template <typename T> BwdKernels<T> bwd_kernels() {
#ifdef GNS_HAVE_SIMD
  if constexpr (!std::is_same<T, double>::value) {
    const GnsIsa isa = gns_cpu_isa_active();
    if (isa == GnsIsa::kAvx512)
      return {&gns_avx512::bwd_group<T>, &gns_avx512::nhwc_bwd_sums<T>, &gns_avx512::nhwc_bwd_dx<T>, true};
    if (isa == GnsIsa::kAvx2)
      return {&gns_avx2::bwd_group<T>, &gns_avx2::nhwc_bwd_sums<T>, &gns_avx2::nhwc_bwd_dx<T>, true};
  }
#endif
  return {&bwd_nchw_group<T>, &nhwc_bwd_sums<T>, &nhwc_bwd_dx<T>, false};
}

// Threads actually used: at most one per task, and none for tiny tensors where waking one costs more.
int use_threads(int requested, int64_t tasks, int64_t numel) {
  const int64_t by_work = std::max<int64_t>(1, numel / 16384);
  return int(std::max<int64_t>(1, std::min<int64_t>({int64_t(requested), tasks, by_work})));
}

// Rows of sample n handled by NHWC task `blk` of `nb`.
struct RowBlock {
  int64_t r0, r1;
};
GNS_INLINE RowBlock row_block(int64_t HW, int64_t nb, int64_t blk) { return {HW * blk / nb, HW * (blk + 1) / nb}; }

// dweight[c] = sum_n dwp[n, c], dbias[c] = sum_n db[n, c] (fixed order: deterministic).
template <typename A>
void reduce_affine_grads(const GroupNormSiLUParams& p, const std::vector<double>& dwp,
                         const std::vector<double>& db) {
  if (p.dweight == nullptr) return;
  A* dw = static_cast<A*>(p.dweight);
  A* dbias = static_cast<A*>(p.dbias);
  for (int64_t c = 0; c < p.C; ++c) {
    double sw = 0, sb = 0;
    for (int64_t n = 0; n < p.N; ++n) sw += dwp[n * p.C + c], sb += db[n * p.C + c];
    dw[c] = A(sw);
    dbias[c] = A(sb);
  }
}

// One contiguous range of groups per thread (the AVX2 kernel blocks its range for the cache).
template <typename T> void fwd_nchw(const GroupNormSiLUParams& p, int nt) {
  const int64_t tasks = p.N * p.G;
  const FwdKernels<T> k = fwd_kernels<T>();
  const int nthr = use_threads(nt, tasks, p.numel());
#pragma omp parallel for num_threads(nthr) schedule(static, 1)
  for (int i = 0; i < nthr; ++i) k.nchw(p, tasks * i / nthr, tasks * (i + 1) / nthr);
}

template <typename T> void bwd_nchw(const GroupNormSiLUParams& p, int nt) {
  using A = Acc<T>;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.dx);
  const A* mean = static_cast<const A*>(p.mean);
  const A* rstd = static_cast<const A*>(p.rstd);
  const A* w = static_cast<const A*>(p.weight);
  const A* b = static_cast<const A*>(p.bias);
  const int64_t D = p.D(), M = p.group_size(), tasks = p.N * p.G;
  const BwdKernels<T> k = bwd_kernels<T>();
  std::vector<double> dwp(p.N * p.C), db(p.N * p.C);
#pragma omp parallel num_threads(use_threads(nt, tasks, p.numel()))
  {
    // dz of one group (+ the portable flat path's arrays), per thread
    std::vector<A> scratch(p.HW < kFlatHW && !k.simd ? 4 * M : M);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t c0 = (t % p.G) * D;
      k.nchw_group(x + t * M, dy + t * M, dx + t * M, w ? w + c0 : nullptr, b ? b + c0 : nullptr, D, p.HW,
                   mean[t], rstd[t], scratch.data(), dwp.data() + t * D, db.data() + t * D);
    }
  }
  reduce_affine_grads<A>(p, dwp, db);
}

// NHWC blocks per sample: enough tasks to balance the threads, each block at least 8 rows.
int64_t nhwc_blocks(const GroupNormSiLUParams& p, int nt) {
  const int64_t want = (4 * int64_t(nt) + p.N - 1) / p.N;
  return std::max<int64_t>(1, std::min<int64_t>(want, p.HW / 8));
}

// Sample n's statistics from its per-channel sums s, q over all rows (shifted by shift[c], near the group's
// mean: see group_shift): mean/rstd of each group, and each channel's mu, a = rstd * w, c0 = b.
template <typename A>
void nhwc_sample_stats(const GroupNormSiLUParams& p, int64_t n, const double* s, const double* q, const A* shift,
                       A* mu, A* a, A* c0) {
  const int64_t D = p.D();
  const double inv_n = 1.0 / double(D * p.HW);
  const A* w = static_cast<const A*>(p.weight);
  const A* b = static_cast<const A*>(p.bias);
  for (int64_t cg = 0; cg < p.C; cg += D) {
    double sg = 0, qg = 0;
    for (int64_t c = cg; c < cg + D; ++c) sg += s[c], qg += q[c];
    A m, r;
    finish_stats(inv_n, double(shift[cg]), sg, qg, p.eps, &m, &r);
    static_cast<A*>(p.mean)[n * p.G + cg / D] = m;
    static_cast<A*>(p.rstd)[n * p.G + cg / D] = r;
    for (int64_t c = cg; c < cg + D; ++c) mu[c] = m, a[c] = w ? r * w[c] : r, c0[c] = b ? b[c] : A(0);
  }
}

// Every channel of sample n's group is shifted by one value near the group's mean: the mean of its channels over
// the first rows, at least kShiftSample elements (see group_shift). The rows are summed along C (vectorizes).
template <typename T, typename A> void nhwc_shift(const GroupNormSiLUParams& p, const T* xn, A* shift) {
  const int64_t C = p.C, D = p.D(), rows = std::min(p.HW, (kShiftSample + D - 1) / D);
  std::fill(shift, shift + C, A(0));
  for (int64_t r = 0; r < rows; ++r)
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) shift[c] += load(xn + r * C + c);
  for (int64_t cg = 0; cg < C; cg += D) {
    A s = 0;
    for (int64_t c = cg; c < cg + D; ++c) s += shift[c];
    s /= A(rows * D);
    for (int64_t c = cg; c < cg + D; ++c) shift[c] = s;
  }
}

// One task per sample when the samples alone balance the threads (nhwc_blocks == 1; the U-Net's small maps):
// statistics, then normalization while the sample is in cache, with no cross-task reduction or barrier.
template <typename T> void fwd_nhwc_by_sample(const GroupNormSiLUParams& p, int nt) {
  using A = Acc<T>;
  const int64_t C = p.C, HW = p.HW;
  const FwdKernels<T> k = fwd_kernels<T>();
#pragma omp parallel num_threads(use_threads(nt, p.N, p.numel()))
  {
    std::vector<double> sq(2 * C);
    std::vector<A> par(4 * C);  // shift, mu, a, c0
    A *shift = par.data(), *mu = shift + C, *a = mu + C, *c0 = a + C;
#pragma omp for schedule(static)
    for (int64_t n = 0; n < p.N; ++n) {
      const T* xn = static_cast<const T*>(p.x) + n * HW * C;
      nhwc_shift(p, xn, shift);
      std::fill(sq.begin(), sq.end(), 0.0);
      k.col_sums(xn, HW, C, shift, sq.data(), sq.data() + C);
      nhwc_sample_stats(p, n, sq.data(), sq.data() + C, shift, mu, a, c0);
      k.rows(xn, static_cast<T*>(p.y) + n * HW * C, HW, C, mu, a, c0);
    }
  }
}

template <typename T> void fwd_nhwc(const GroupNormSiLUParams& p, int nt) {
  using A = Acc<T>;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const int64_t N = p.N, C = p.C, HW = p.HW, nb = nhwc_blocks(p, nt), tasks = N * nb;
  if (nb == 1) return fwd_nhwc_by_sample<T>(p, nt);
  const FwdKernels<T> k = fwd_kernels<T>();
  std::vector<A> shift(N * C), mu(N * C), a(N * C), c0(N * C);
  for (int64_t n = 0; n < N; ++n) nhwc_shift(p, x + n * HW * C, shift.data() + n * C);
  std::vector<double> ps(tasks * C), pq(tasks * C);
#pragma omp parallel num_threads(use_threads(nt, tasks, p.numel()))
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t n = t / nb;
      const RowBlock rb = row_block(HW, nb, t % nb);
      k.col_sums(x + (n * HW + rb.r0) * C, rb.r1 - rb.r0, C, shift.data() + n * C, ps.data() + t * C,
                 pq.data() + t * C);
    }
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {  // the blocks' sums into block 0's, in a fixed order
      double *s = ps.data() + n * nb * C, *q = pq.data() + n * nb * C;
      for (int64_t blk = 1; blk < nb; ++blk)
        for (int64_t c = 0; c < C; ++c) s[c] += s[blk * C + c], q[c] += q[blk * C + c];
      nhwc_sample_stats(p, n, s, q, shift.data() + n * C, mu.data() + n * C, a.data() + n * C, c0.data() + n * C);
    }
    // Same static schedule as the first loop: each thread normalizes the rows it summed (still cached).
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t n = t / nb;
      const RowBlock rb = row_block(HW, nb, t % nb);
      const int64_t off = (n * HW + rb.r0) * C;
      k.rows(x + off, y + off, rb.r1 - rb.r0, C, mu.data() + n * C, a.data() + n * C, c0.data() + n * C);
    }
  }
}

// Backward, sample n: from its per-channel sums sw = sum dz*xhat and sb = sum dz, its dwp/db (rows of N*C) and
// the per-channel alpha, a2, b2 of pass 2 (w: every channel's weight, 1 when there is none).
template <typename A>
void nhwc_sample_bwd(const GroupNormSiLUParams& p, int64_t n, const double* sw, const double* sb, const A* w,
                     double* dwp, double* db, A* alpha, A* a2, A* b2) {
  const int64_t D = p.D();
  const double M = double(D * p.HW);
  for (int64_t cg = 0; cg < p.C; cg += D) {
    double s1 = 0, s2 = 0;
    for (int64_t c = cg; c < cg + D; ++c) {
      dwp[n * p.C + c] = sw[c], db[n * p.C + c] = sb[c];
      s1 += double(w[c]) * sb[c], s2 += double(w[c]) * sw[c];
    }
    const double r = double(static_cast<const A*>(p.rstd)[n * p.G + cg / D]);
    for (int64_t c = cg; c < cg + D; ++c) alpha[c] = A(r) * w[c], a2[c] = A(-r * r * s2 / M), b2[c] = A(-r * s1 / M);
  }
}

template <typename T> void bwd_nhwc(const GroupNormSiLUParams& p, int nt) {
  using A = Acc<T>;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.dx);
  const int64_t N = p.N, C = p.C, HW = p.HW, D = p.D(), nb = nhwc_blocks(p, nt), tasks = N * nb;
  const BwdKernels<T> kern = bwd_kernels<T>();
  // Per-(n, c) broadcasts of the per-(n, g) values, so the row loops run along C without gathers.
  std::vector<A> mu(N * C), rs(N * C), w(C), b(C), alpha(N * C), a2(N * C), b2(N * C);
  for (int64_t c = 0; c < C; ++c) {
    w[c] = p.weight ? static_cast<const A*>(p.weight)[c] : A(1);
    b[c] = p.bias ? static_cast<const A*>(p.bias)[c] : A(0);
  }
  for (int64_t ng = 0; ng < N * p.G; ++ng)  // (n, g) -> its D channels, without a division per element
    for (int64_t c = ng * D; c < (ng + 1) * D; ++c)
      mu[c] = static_cast<const A*>(p.mean)[ng], rs[c] = static_cast<const A*>(p.rstd)[ng];
  std::vector<double> pw(tasks * C), pb(tasks * C), dwp(N * C), db(N * C);
  // With one block per sample each task runs both passes back to back (no barrier between them).
#pragma omp parallel num_threads(use_threads(nt, tasks, p.numel()))
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t n = t / nb, k = n * C;
      const RowBlock rb = row_block(HW, nb, t % nb);
      const int64_t off = (n * HW + rb.r0) * C;
      kern.nhwc_sums(x + off, dy + off, dx + off, rb.r1 - rb.r0, C, mu.data() + k, rs.data() + k, w.data(),
                     b.data(), pw.data() + t * C, pb.data() + t * C);
      if (nb > 1) continue;
      nhwc_sample_bwd(p, n, pw.data() + t * C, pb.data() + t * C, w.data(), dwp.data(), db.data(),
                      alpha.data() + k, a2.data() + k, b2.data() + k);
      kern.nhwc_dx(x + off, dy + off, dx + off, HW, C, mu.data() + k, rs.data() + k, w.data(), b.data(),
                   alpha.data() + k, a2.data() + k, b2.data() + k);
    }
    if (nb > 1) {
#pragma omp for schedule(static)
      for (int64_t n = 0; n < N; ++n) {  // the blocks' sums into block 0's, in a fixed order
        double *sw = pw.data() + n * nb * C, *sb = pb.data() + n * nb * C;
        for (int64_t blk = 1; blk < nb; ++blk)
          for (int64_t c = 0; c < C; ++c) sw[c] += sw[blk * C + c], sb[c] += sb[blk * C + c];
        nhwc_sample_bwd(p, n, sw, sb, w.data(), dwp.data(), db.data(), alpha.data() + n * C, a2.data() + n * C,
                        b2.data() + n * C);
      }
#pragma omp for schedule(static)
      for (int64_t t = 0; t < tasks; ++t) {
        const int64_t n = t / nb, k = n * C;
        const RowBlock rb = row_block(HW, nb, t % nb);
        const int64_t off = (n * HW + rb.r0) * C;
        kern.nhwc_dx(x + off, dy + off, dx + off, rb.r1 - rb.r0, C, mu.data() + k, rs.data() + k, w.data(),
                     b.data(), alpha.data() + k, a2.data() + k, b2.data() + k);
      }
    }
  }
  reduce_affine_grads<A>(p, dwp, db);
}

// Empty tensors (N == 0 or HW == 0): nothing to normalize; statistics and affine grads are zeros.
template <typename A> void fill_empty(const GroupNormSiLUParams& p, bool backward) {
  if (!backward && p.mean != nullptr) {
    std::fill(static_cast<A*>(p.mean), static_cast<A*>(p.mean) + p.N * p.G, A(0));
    std::fill(static_cast<A*>(p.rstd), static_cast<A*>(p.rstd) + p.N * p.G, A(0));
  } else if (p.dweight != nullptr) {
    std::fill(static_cast<A*>(p.dweight), static_cast<A*>(p.dweight) + p.C, A(0));
    std::fill(static_cast<A*>(p.dbias), static_cast<A*>(p.dbias) + p.C, A(0));
  }
}

template <typename T> void run(const GroupNormSiLUParams& p, int nt, bool backward) {
  if (p.numel() == 0) {
    if (p.N * p.G > 0 || backward) fill_empty<Acc<T>>(p, backward);
    return;
  }
  const bool nhwc = p.layout == Layout::kNHWC;
  if (backward) return nhwc ? bwd_nhwc<T>(p, nt) : bwd_nchw<T>(p, nt);
  std::vector<Acc<T>> stats;  // statistics the caller discards (mean == rstd == nullptr)
  GroupNormSiLUParams q = p;
  if (p.mean == nullptr) {
    stats.resize(2 * p.N * p.G);
    q.mean = stats.data(), q.rstd = stats.data() + p.N * p.G;
  }
  nhwc ? fwd_nhwc<T>(q, nt) : fwd_nchw<T>(q, nt);
}

void dispatch(const GroupNormSiLUParams& p, int num_threads, bool backward) {
  gns_check(p, backward, !backward);
  gns_require(num_threads >= 1, "num_threads must be >= 1 (got " + std::to_string(num_threads) + ")");
  switch (p.dtype) {
    case DType::kFloat32: return run<float>(p, num_threads, backward);
    case DType::kBFloat16: return run<bf16>(p, num_threads, backward);
    case DType::kFloat64: return run<double>(p, num_threads, backward);
    default: gns_require(false, "float16 is not supported by the CPU kernels (use float32 or bfloat16)");
  }
}

}  // namespace

void group_norm_silu_fwd_cpu(const GroupNormSiLUParams& p, int num_threads) { dispatch(p, num_threads, false); }
void group_norm_silu_bwd_cpu(const GroupNormSiLUParams& p, int num_threads) { dispatch(p, num_threads, true); }

}  // namespace ddpm_fast
