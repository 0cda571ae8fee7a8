// The portable CPU kernels of GroupNorm+SiLU (group_norm_silu_cpu.cpp, the only includer): plain C++ that
// -O3 vectorizes, each hot function compiled twice (baseline x86-64 and x86-64-v3) and picked at load time.
// They serve fp64, CPUs without AVX2, and anyone who asks for them (gns_cpu_isa("portable")); the SIMD kernels
// of group_norm_silu_cpu_simd.h keep their contracts. NCHW: one task per (n, group); NHWC: (n, block of rows).
#pragma once

#include <cstdint>
#include <vector>

#include "group_norm_silu.h"
#include "group_norm_silu_cpu_math.h"

namespace ddpm_fast {
namespace {

// ---------------------------------------------------------------- NCHW: one task per (n, group)
// x, y: the group's D*HW contiguous elements; w, b: its D channels' affine (nullable).
// Below this many positions per channel, the per-channel loop's set-up (re-broadcasting exp's constants,
// epilogue) cost as much as the work (2 ns/element at HW = 16, measured): expand the affine per element
// and run one flat loop over the group instead.
constexpr int64_t kFlatHW = 128;

// x, y: the group's D*HW contiguous elements; w, b: its D channels' affine (nullable);
// coef: 2*D*HW scratch floats, used when HW < kFlatHW.
template <typename T>
GNS_CLONES void fwd_nchw_group(const T* x, T* y, const Acc<T>* w, const Acc<T>* b, int64_t D, int64_t HW,
                               double eps, Acc<T>* mean_out, Acc<T>* rstd_out, Acc<T>* coef) {
  using A = Acc<T>;
  const ExpRange er{gns_exp_lo, gns_exp_hi};
  // The group is D*HW contiguous elements: one pass of shifted sums over all of it.
  double sum, sumsq;
  const double shift = group_shift(x, D * HW);
  row_shifted_sums(x, D * HW, shift, &sum, &sumsq);
  A mu, r;
  finish_stats(1.0 / double(D * HW), shift, sum, sumsq, eps, &mu, &r);
  *mean_out = mu;
  *rstd_out = r;
  if (HW < kFlatHW) {
    A* ca = coef;
    A* cc = coef + D * HW;
    for (int64_t d = 0; d < D; ++d) {
      const A a = w ? r * w[d] : r, c = b ? b[d] : A(0);
      for (int64_t i = 0; i < HW; ++i) ca[d * HW + i] = a, cc[d * HW + i] = c;
    }
#pragma omp simd
    for (int64_t i = 0; i < D * HW; ++i) {
      const A z = (load(x + i) - mu) * ca[i] + cc[i];
      store(y + i, silu(z, er));
    }
    return;
  }
  for (int64_t d = 0; d < D; ++d) {
    const A a = w ? r * w[d] : r, c = b ? b[d] : A(0);
    const T* xr = x + d * HW;
    T* yr = y + d * HW;
#pragma omp simd
    for (int64_t i = 0; i < HW; ++i) {
      const A z = (load(xr + i) - mu) * a + c;
      store(yr + i, silu(z, er));
    }
  }
}

// Flat variant of bwd_nchw_group for HW < kFlatHW (see fwd_nchw_group); scratch: 4*D*HW.
template <typename T>
GNS_INLINE void bwd_nchw_group_flat(const T* x, const T* dy, T* dx, const Acc<T>* w, const Acc<T>* b, int64_t D,
                                    int64_t HW, Acc<T> mu, Acc<T> r, Acc<T>* scratch, double* dwp, double* db,
                                    ExpRange er) {
  using A = Acc<T>;
  const int64_t M = D * HW;
  A* gs = scratch;          // dz
  A* ps = scratch + M;      // dz * xhat
  A* we = scratch + 2 * M;  // w, b per element
  A* be = scratch + 3 * M;
  for (int64_t d = 0; d < D; ++d)
    for (int64_t i = 0; i < HW; ++i) we[d * HW + i] = w ? w[d] : A(1), be[d * HW + i] = b ? b[d] : A(0);
#pragma omp simd
  for (int64_t i = 0; i < M; ++i) {
    const A xh = (load(x + i) - mu) * r;
    const A g = silu_grad(xh * we[i] + be[i], load(dy + i), er);
    gs[i] = g;
    ps[i] = g * xh;
  }
  double s1 = 0, s2 = 0;
  for (int64_t d = 0; d < D; ++d) {
    double dw_sum = 0, db_sum = 0;
#pragma omp simd reduction(+ : dw_sum, db_sum)
    for (int64_t i = d * HW; i < (d + 1) * HW; ++i) dw_sum += double(ps[i]), db_sum += double(gs[i]);
    dwp[d] = dw_sum;
    db[d] = db_sum;
    s1 += double(we[d * HW]) * db_sum;
    s2 += double(we[d * HW]) * dw_sum;
  }
  const A a2 = A(-double(r) * double(r) * s2 / double(M)), b2 = A(-double(r) * s1 / double(M));
#pragma omp simd
  for (int64_t i = 0; i < M; ++i) store(dx + i, r * we[i] * gs[i] + a2 * (load(x + i) - mu) + b2);
}

// Pass 1 stores dz = dy * silu'(z) in `scratch` (D*HW, stays in cache) and reduces per channel
// dwp = sum dz * xhat and db = sum dz; pass 2 writes dx = r*w*dz + A2*(x - mu) + B.
template <typename T>
GNS_CLONES void bwd_nchw_group(const T* x, const T* dy, T* dx, const Acc<T>* w, const Acc<T>* b, int64_t D,
                               int64_t HW, Acc<T> mu, Acc<T> r, Acc<T>* scratch, double* dwp, double* db) {
  using A = Acc<T>;
  const ExpRange er{gns_exp_lo, gns_exp_hi};
  if (HW < kFlatHW) return bwd_nchw_group_flat(x, dy, dx, w, b, D, HW, mu, r, scratch, dwp, db, er);
  double s1 = 0, s2 = 0;
  for (int64_t d = 0; d < D; ++d) {
    const A wd = w ? w[d] : A(1), bd = b ? b[d] : A(0);
    const T* xr = x + d * HW;
    const T* gr = dy + d * HW;
    A* sr = scratch + d * HW;
    double dw_sum = 0, db_sum = 0;
#pragma omp simd reduction(+ : dw_sum, db_sum)
    for (int64_t i = 0; i < HW; ++i) {
      const A xh = (load(xr + i) - mu) * r;
      const A g = silu_grad(xh * wd + bd, load(gr + i), er);
      sr[i] = g;
      dw_sum += double(g * xh);
      db_sum += double(g);
    }
    dwp[d] = dw_sum;
    db[d] = db_sum;
    s1 += double(wd) * db_sum;
    s2 += double(wd) * dw_sum;
  }
  const double M = double(D * HW);
  const A a2 = A(-double(r) * double(r) * s2 / M), b2 = A(-double(r) * s1 / M);
  for (int64_t d = 0; d < D; ++d) {
    const A alpha = w ? r * w[d] : r;
    const T* xr = x + d * HW;
    const A* sr = scratch + d * HW;
    T* out = dx + d * HW;
#pragma omp simd
    for (int64_t i = 0; i < HW; ++i) store(out + i, alpha * sr[i] + a2 * (load(xr + i) - mu) + b2);
  }
}

// ---------------------------------------------------------------- NHWC: tasks are (n, block of rows)
// A row is the C contiguous channels of one spatial position; loops run along C so they vectorize.

// Column sums of (x - shift[c]) and of their squares over `rows` rows, added into s[c], q[c].
template <typename T>
GNS_CLONES void nhwc_col_sums(const T* x, int64_t rows, int64_t C, const Acc<T>* shift, double* s, double* q) {
  using A = Acc<T>;
  for (int64_t rr = 0; rr < rows; ++rr) {
    const T* row = x + rr * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const A v = load(row + c) - shift[c];
      s[c] += double(v);
      q[c] += double(v * v);
    }
  }
}

template <typename T>
GNS_CLONES void nhwc_fwd_rows(const T* x, T* y, int64_t rows, int64_t C, const Acc<T>* mu, const Acc<T>* a,
                              const Acc<T>* c0) {
  using A = Acc<T>;
  const ExpRange er{gns_exp_lo, gns_exp_hi};
  for (int64_t rr = 0; rr < rows; ++rr) {
    const T* xr = x + rr * C;
    T* yr = y + rr * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const A z = (load(xr + c) - mu[c]) * a[c] + c0[c];
      store(yr + c, silu(z, er));
    }
  }
}


// Backward pass 1 over rows: dwp[c] += sum dz*xhat, db[c] += sum dz (coef: mu, rstd, w, b per channel).
template <typename T>
GNS_CLONES void nhwc_bwd_sums(const T* x, const T* dy, T* dz, int64_t rows, int64_t C, const Acc<T>* mu,
                              const Acc<T>* rs, const Acc<T>* w, const Acc<T>* b, double* dwp, double* db) {
  using A = Acc<T>;
  const ExpRange er{gns_exp_lo, gns_exp_hi};
  for (int64_t rr = 0; rr < rows; ++rr) {
    const T* xr = x + rr * C;
    const T* gr = dy + rr * C;
    T* zr = dz + rr * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const A xh = (load(xr + c) - mu[c]) * rs[c];
      const A g = silu_grad(xh * w[c] + b[c], load(gr + c), er);
      if constexpr (kStashDz<T>) zr[c] = g;
      dwp[c] += double(g * xh);
      db[c] += double(g);
    }
  }
}

// Backward pass 2: dx = alpha*dz + a2*(x - mu) + b2, dz read back from dx (kStashDz) or recomputed.
template <typename T>
GNS_CLONES void nhwc_bwd_dx(const T* x, const T* dy, T* dx, int64_t rows, int64_t C, const Acc<T>* mu,
                            const Acc<T>* rs, const Acc<T>* w, const Acc<T>* b, const Acc<T>* alpha,
                            const Acc<T>* a2, const Acc<T>* b2) {
  using A = Acc<T>;
  const ExpRange er{gns_exp_lo, gns_exp_hi};
  for (int64_t rr = 0; rr < rows; ++rr) {
    const T* xr = x + rr * C;
    const T* gr = dy + rr * C;
    T* out = dx + rr * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const A xm = load(xr + c) - mu[c];
      A g;
      if constexpr (kStashDz<T>) g = load(out + c);
      else g = silu_grad(xm * rs[c] * w[c] + b[c], load(gr + c), er);
      store(out + c, alpha[c] * g + a2[c] * xm + b2[c]);
    }
  }
}

// NCHW groups [t0, t1) with the portable per-group kernel.
template <typename T> void fwd_nchw_range(const GroupNormSiLUParams& p, int64_t t0, int64_t t1) {
  using A = Acc<T>;
  const A* w = static_cast<const A*>(p.weight);
  const A* b = static_cast<const A*>(p.bias);
  const int64_t D = p.D(), M = p.group_size();
  std::vector<A> coef(p.HW < kFlatHW ? 2 * M : 0);  // scratch of the flat path
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t c0 = (t % p.G) * D;  // group (n, g) is t = n*G + g; its data starts at t*M
    fwd_nchw_group<T>(static_cast<const T*>(p.x) + t * M, static_cast<T*>(p.y) + t * M, w ? w + c0 : nullptr,
                      b ? b + c0 : nullptr, D, p.HW, p.eps, static_cast<A*>(p.mean) + t,
                      static_cast<A*>(p.rstd) + t, coef.data());
  }
}

}  // namespace
}  // namespace ddpm_fast
