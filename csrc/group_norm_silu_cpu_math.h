// Scalar building blocks of the CPU GroupNorm+SiLU kernels (included by group_norm_silu_cpu*.cpp):
// bf16 loads/stores, a branch-free vectorizable exp, sigmoid/SiLU and their gradient, and the shifted
// two-moment statistics. Everything is inline, in an anonymous namespace: one definition per including file.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

// No floating-point trap semantics in this file: GCC otherwise refuses to if-convert the clamps in exp_f,
// and the loops that call it stay scalar. Nothing here reads the FP exception flags.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

// "arch=x86-64-v3" in target_clones needs GCC >= 12; older compilers build the baseline code only.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__)
#define GNS_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define GNS_CLONES
#endif
#define GNS_INLINE inline __attribute__((always_inline))

namespace ddpm_fast {

// Defined in group_norm_silu_cpu.cpp. volatile, so that neither the compiler nor LTO (pybind11 builds with
// -flto) folds them: see ExpRange.
extern volatile float gns_exp_lo, gns_exp_hi;

// bfloat16 storage (fp32 math). Outside the anonymous namespace: the AVX2 kernels take it across files.
struct bf16 {
  uint16_t bits;
};

namespace {

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

GNS_INLINE float load(const float* p) { return *p; }
GNS_INLINE double load(const double* p) { return *p; }
GNS_INLINE float load(const bf16* p) {
  const uint32_t u = uint32_t(p->bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
GNS_INLINE void store(float* p, float v) { *p = v; }
GNS_INLINE void store(double* p, double v) { *p = v; }
GNS_INLINE void store(bf16* p, float v) {
  // Round to nearest even; NaN stays a (quiet) NaN instead of rounding into infinity.
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t rounded = u + 0x7FFFu + ((u >> 16) & 1u);
  const uint32_t out = (u & 0x7FFFFFFFu) > 0x7F800000u ? (u | 0x00400000u) : rounded;
  p->bits = uint16_t(out >> 16);
}

// exp(x) for float, branch-free so loops calling it vectorize (~1.3 ulp). The clamp
// keeps 2^n a normal float (NaN input gives a finite value; callers multiply by z, so y is still NaN).
// Its bounds are read from volatile globals once per call ON PURPOSE: with compile-time bounds GCC threads the
// clamp through the polynomial into compare/blend chains and the loop runs 3x slower (measured, GCC 12).
struct ExpRange {
  float lo, hi;
};
GNS_INLINE float exp_f(float x, ExpRange er) {
  x = x > er.lo ? x : er.lo;  // this operand order maps to one max/min instruction
  x = x < er.hi ? x : er.hi;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + magic) - magic;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  // Degree-5 near-minimax polynomial for e^r on [-ln2/2, ln2/2] (relative error 1.6e-7 in fp32, fitted with
  // reweighted least squares): two FMAs fewer than Cephes' expf, which matters in a compute-bound loop.
  float p = 0.008290315046906471f;
  p = p * r + 0.04189793020486832f;
  p = p * r + 0.1666763573884964f;
  p = p * r + 0.4999915063381195f;
  p = p * r + 0.9999997019767761f;
  p = p * r + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}
GNS_INLINE float sigmoid(float z, ExpRange er) { return 1.0f / (1.0f + exp_f(-z, er)); }
GNS_INLINE double sigmoid(double z, ExpRange) { return 1.0 / (1.0 + std::exp(-z)); }
// z * sigmoid(z) as one division (one rounding, one instruction fewer than the product)
GNS_INLINE float silu(float z, ExpRange er) { return z / (1.0f + exp_f(-z, er)); }
GNS_INLINE double silu(double z, ExpRange) { return z / (1.0 + std::exp(-z)); }

// d silu(z) / dz = s * (1 + z * (1 - s)), s = sigmoid(z)
template <typename A> GNS_INLINE A silu_grad(A z, A g, ExpRange er) {
  const A s = sigmoid(z, er);
  return g * s * (A(1) + z * (A(1) - s));
}

// Reductions are `omp simd reduction` loops into double accumulators: the pragma licenses the reassociation
// that vectorizing a sum needs (no -ffast-math here), and double keeps the variance accurate to fp32 round-off
// over any group size (float accumulators measured 5-15 ulp errors in y). Hand-unrolled float lane arrays
// made GCC emit permute storms (2x slower).

// mean and 1/sqrt(var + eps) from n elements' sums s = sum(x - shift), q = sum((x - shift)^2), given inv_n = 1/n
// (callers hoist the division: with the sqrt and the last division it bounded the small groups' statistics).
// The shift is near the mean (group_shift), so q/n - (s/n)^2 does not cancel catastrophically when |mean| >> std.
template <typename A> GNS_INLINE void finish_stats(double inv_n, double shift, double s, double q, double eps,
                                                   A* mean, A* rstd) {
  const double m = s * inv_n, var = q * inv_n - m * m;
  *mean = A(shift + m);
  *rstd = A(1.0 / std::sqrt((var > 0.0 ? var : 0.0) + eps));
}

// Sums of (row[i] - shift) and of their squares over n contiguous elements.
template <typename T>
GNS_INLINE void row_shifted_sums(const T* row, int64_t n, double shift, double* s_out, double* q_out) {
  using A = typename AccOf<T>::type;
  const A k = A(shift);
  double s = 0, q = 0;
#pragma omp simd reduction(+ : s, q)
  for (int64_t i = 0; i < n; ++i) {
    const A v = load(row + i) - k;
    s += double(v);
    q += double(v * v);
  }
  *s_out = s;
  *q_out = q;
}

template <typename T> using Acc = typename AccOf<T>::type;

// The shift of an NCHW group's shifted sums: the mean of its first kShiftSample (contiguous) elements; NHWC's is
// nhwc_shift's. q/n - (s/n)^2 cancels by a factor 1 + ((mean - shift) / std)^2: shifting by the group's first
// element alone lost ~15 ulp of rstd (y off by ~8x PyTorch's own fp32 error) whenever that element was a 3-sigma
// outlier; the mean of 8 divides the factor's excess by 8. A tree of adds, not a loop-carried sum: small groups
// (32 elements) take a few ns each, and a serial 16-element sum measured +30% there.
constexpr int64_t kShiftSample = 8;
template <typename T> GNS_INLINE Acc<T> group_shift(const T* x, int64_t n) {
  using A = Acc<T>;
  if (n >= kShiftSample) {
    A v[kShiftSample];
    for (int64_t i = 0; i < kShiftSample; ++i) v[i] = load(x + i);
    return (((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]))) / A(kShiftSample);
  }
  A s = 0;
  for (int64_t i = 0; i < n; ++i) s += load(x + i);
  return s / A(n);
}

// The NHWC backward parks dz in dx itself (read back by pass 2 instead of recomputing the sigmoid) when dx's
// type holds it exactly: fp32 and fp64, not bf16.
template <typename T> constexpr bool kStashDz = std::is_same<T, Acc<T>>::value;

}  // namespace
}  // namespace ddpm_fast
