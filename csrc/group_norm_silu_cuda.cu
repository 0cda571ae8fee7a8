// CUDA kernels for y = silu(group_norm(x)): fp32/fp16/bf16 in and out, fp32 statistics, NCHW and NHWC.
//
// On-chip path (every DDPM shape): one CTA per (n, group) holds the whole group in registers, so x is read
// once and y written once (backward: x and dy read once, dx written once). Statistics are exact two-pass
// sums over the registers. Per-channel reductions in the backward go through shared memory in a fixed order
// (deterministic, no atomics). Generic path (groups too big for one CTA): stats kernel + elementwise kernel.
// No allocation and no host sync anywhere: every launch goes on the caller's stream (graph-capturable).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "group_norm_silu.h"
#include "group_norm_silu_cuda_util.cuh"

namespace ddpm_fast {
namespace {

// ------------------------------------------------------------------------------------ on-chip kernels
// Thread t owns slots s = j * blockDim.x + t (j < ITEMS); slot s is elements [s*V, s*V + V) of the group.
// With V == 4 the host guarantees the 4 elements are contiguous and aligned (NCHW: HW % 4 == 0;
// NHWC: D % 4 == 0), so one slot is one vector access and, in NCHW, lies in one channel.
template <typename T, int ITEMS, int V>
__global__ void __launch_bounds__(kMaxThreads) gns_fwd_onchip(const T* __restrict__ x, T* __restrict__ y,
                                                              const float* __restrict__ w,
                                                              const float* __restrict__ b, float* mean_out,
                                                              float* rstd_out, int C, int HW, int G, float eps,
                                                              bool nhwc) {
  __shared__ float red[kWarp];
  const int D = C / G, M = D * HW;
  const int64_t n = blockIdx.x / G, g = blockIdx.x % G;
  const GroupView view = group_view(n, g, C, HW, D, nhwc);
  float v[ITEMS][V];
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < ITEMS; ++j) {
    const int e = (j * blockDim.x + threadIdx.x) * V;
    if (e < M) {
      if (V == 4) {
        load_pack<T, V>(x + view.offset(e), v[j]);
      } else {
        v[j][0] = to_f(x[view.offset(e)]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) v[j][i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < V; ++i) sum += v[j][i];
  }
  const float mean = block_sum(sum, red) / M;
  float sq = 0.f;
#pragma unroll
  for (int j = 0; j < ITEMS; ++j) {
    if ((j * int(blockDim.x) + int(threadIdx.x)) * V < M) {
#pragma unroll
      for (int i = 0; i < V; ++i) sq += (v[j][i] - mean) * (v[j][i] - mean);
    }
  }
  const float rstd = rsqrtf(block_sum(sq, red) / M + eps);
  if (threadIdx.x == 0) mean_out[blockIdx.x] = mean, rstd_out[blockIdx.x] = rstd;
  const int c0 = int(g) * D;
#pragma unroll
  for (int j = 0; j < ITEMS; ++j) {
    const int e = (j * blockDim.x + threadIdx.x) * V;
    if (e >= M) continue;
    float out[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int c = c0 + view.channel(e + i);
      const float z = (v[j][i] - mean) * rstd * (w ? w[c] : 1.f) + (b ? b[c] : 0.f);
      out[i] = z * sigmoidf_(z);
    }
    if (V == 4) {
      store_pack<T, V>(y + view.offset(e), out);
    } else {
      y[view.offset(e)] = from_f<T>(out[0]);
    }
  }
}

// Backward, one CTA per (n, group). Writes dx and the per-(n, c) sums dwp = sum dz*xhat, dbp = sum dz
// (ws_w, ws_b: N*C floats), reduced over n by gns_affine_grads. Shared memory (dynamic): 2 * slots floats
// for NCHW (one partial per slot), 2 * blockDim.x * V for NHWC (blockDim.x % (D/V) == 0, so each thread
// always sees the same V channels and keeps their partials in registers).
template <typename T, int ITEMS, int V>
__global__ void __launch_bounds__(kMaxThreads) gns_bwd_onchip(const T* __restrict__ dy, const T* __restrict__ x,
                                                              T* __restrict__ dx, const float* __restrict__ w,
                                                              const float* __restrict__ b, const float* mean_in,
                                                              const float* rstd_in, float* ws_w, float* ws_b,
                                                              int C, int HW, int G, bool nhwc) {
  extern __shared__ float smem[];
  __shared__ float red[kWarp];
  const int D = C / G, M = D * HW, T_ = blockDim.x;
  const int64_t n = blockIdx.x / G, g = blockIdx.x % G;
  const GroupView view = group_view(n, g, C, HW, D, nhwc);
  const float mean = mean_in[blockIdx.x], rstd = rstd_in[blockIdx.x];
  const int c0 = int(g) * D;
  const int nslots = nhwc ? T_ : T_ * ITEMS;  // partial rows in smem (times V for NHWC)
  float* part_w = smem;
  float* part_b = smem + nslots * (nhwc ? V : 1);
  float xh[ITEMS][V], dz[ITEMS][V];
  float acc_w[V], acc_b[V];  // NHWC: this thread's channels
#pragma unroll
  for (int i = 0; i < V; ++i) acc_w[i] = acc_b[i] = 0.f;
#pragma unroll
  for (int j = 0; j < ITEMS; ++j) {
    const int s = j * T_ + threadIdx.x, e = s * V;
    float xv[V], gv[V];
    if (e < M) {
      if (V == 4) {
        load_pack<T, V>(x + view.offset(e), xv);
        load_pack<T, V>(dy + view.offset(e), gv);
      } else {
        xv[0] = to_f(x[view.offset(e)]);
        gv[0] = to_f(dy[view.offset(e)]);
      }
    }
    float pw = 0.f, pb = 0.f;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if (e < M) {
        const int c = c0 + view.channel(e + i);
        xh[j][i] = (xv[i] - mean) * rstd;
        const float z = xh[j][i] * (w ? w[c] : 1.f) + (b ? b[c] : 0.f);
        const float sg = sigmoidf_(z);
        dz[j][i] = gv[i] * sg * (1.f + z * (1.f - sg));
      } else {
        xh[j][i] = dz[j][i] = 0.f;
      }
      pw += dz[j][i] * xh[j][i];
      pb += dz[j][i];
      acc_w[i] += dz[j][i] * xh[j][i];
      acc_b[i] += dz[j][i];
    }
    if (!nhwc) part_w[s] = pw, part_b[s] = pb;  // NCHW: the slot lies in one channel
  }
  if (nhwc) {
#pragma unroll
    for (int i = 0; i < V; ++i) part_w[threadIdx.x * V + i] = acc_w[i], part_b[threadIdx.x * V + i] = acc_b[i];
  }
  __syncthreads();
  // Channel d's partials: NCHW slots [d*HW/V, (d+1)*HW/V); NHWC rows t = q + k*(D/V), component d % V.
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = T_ / kWarp;
  float s1 = 0.f, s2 = 0.f;  // sum over channels of w*db and w*dwp (lane 0 of each warp)
  for (int d = warp; d < D; d += warps) {
    const int base = nhwc ? (d / V) * V + d % V : d * (HW / V);
    const int stride = nhwc ? D : 1, cnt = nhwc ? T_ / (D / V) : HW / V;
    float sw = 0.f, sb = 0.f;
    for (int k = lane; k < cnt; k += kWarp) sw += part_w[base + k * stride], sb += part_b[base + k * stride];
    sw = warp_sum(sw);
    sb = warp_sum(sb);
    const int c = c0 + d;
    if (lane == 0) {
      ws_w[n * C + c] = sw;
      ws_b[n * C + c] = sb;
      s1 += (w ? w[c] : 1.f) * sb;
      s2 += (w ? w[c] : 1.f) * sw;
    }
  }
  s1 = block_sum(lane == 0 ? s1 : 0.f, red) / M;
  s2 = block_sum(lane == 0 ? s2 : 0.f, red) / M;
#pragma unroll
  for (int j = 0; j < ITEMS; ++j) {
    const int e = (j * T_ + threadIdx.x) * V;
    if (e >= M) continue;
    float out[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int c = c0 + view.channel(e + i);
      out[i] = rstd * ((w ? w[c] : 1.f) * dz[j][i] - s1 - xh[j][i] * s2);
    }
    if (V == 4) {
      store_pack<T, V>(dx + view.offset(e), out);
    } else {
      dx[view.offset(e)] = from_f<T>(out[0]);
    }
  }
}

// ------------------------------------------------------------------------------------ generic kernels
// For groups that do not fit one CTA's registers: statistics per (n, g), then elementwise passes.

// Element i of an (N, C, HW) tensor in either layout: its sample and channel.
__device__ __forceinline__ void locate(int64_t i, int C, int HW, bool nhwc, int64_t* n, int* c) {
  *n = i / (int64_t(HW) * C);
  *c = nhwc ? int(i % C) : int((i / HW) % C);
}

template <typename T>
__global__ void gns_stats_generic(const T* __restrict__ x, float* mean_out, float* rstd_out, int C, int HW, int G,
                                  float eps, bool nhwc) {
  __shared__ float red[kWarp];
  const int D = C / G, M = D * HW;
  const GroupView view = group_view(blockIdx.x / G, blockIdx.x % G, C, HW, D, nhwc);
  // Exact two passes (mean, then centred squares): the second read mostly hits L2, and fp32
  // sum-of-squares shortcuts lose ~10 ulp of y (measured on the Triton twin of this kernel).
  float s = 0.f;
  for (int e = threadIdx.x; e < M; e += blockDim.x) s += to_f(x[view.offset(e)]);
  const float mean = block_sum(s, red) / M;
  float q = 0.f;
  for (int e = threadIdx.x; e < M; e += blockDim.x) {
    const float v = to_f(x[view.offset(e)]) - mean;
    q += v * v;
  }
  const float var = block_sum(q, red) / M;
  if (threadIdx.x == 0) mean_out[blockIdx.x] = mean, rstd_out[blockIdx.x] = rsqrtf(var + eps);
}

template <typename T>
__global__ void gns_fwd_apply_generic(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ w,
                                      const float* __restrict__ b, const float* mean, const float* rstd,
                                      int64_t total, int C, int HW, int G, bool nhwc) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t n;
    int c;
    locate(i, C, HW, nhwc, &n, &c);
    const int64_t ng = n * G + c / (C / G);
    const float z = (to_f(x[i]) - mean[ng]) * rstd[ng] * (w ? w[c] : 1.f) + (b ? b[c] : 0.f);
    y[i] = from_f<T>(z * sigmoidf_(z));
  }
}

// Per-(n, c) sums of dz*xhat and dz: one CTA per (n, c).
template <typename T>
__global__ void gns_bwd_sums_generic(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ w,
                                     const float* __restrict__ b, const float* mean, const float* rstd, float* ws_w,
                                     float* ws_b, int C, int HW, int G, bool nhwc) {
  __shared__ float red[kWarp];
  const int64_t n = blockIdx.x / C;
  const int c = blockIdx.x % C;
  const int64_t ng = n * G + c / (C / G);
  const int64_t base = nhwc ? n * HW * C + c : (n * C + c) * int64_t(HW), stride = nhwc ? C : 1;
  const float mu = mean[ng], r = rstd[ng], wc = w ? w[c] : 1.f, bc = b ? b[c] : 0.f;
  float sw = 0.f, sb = 0.f;
  for (int k = threadIdx.x; k < HW; k += blockDim.x) {
    const float xh = (to_f(x[base + k * stride]) - mu) * r, z = xh * wc + bc, sg = sigmoidf_(z);
    const float g = to_f(dy[base + k * stride]) * sg * (1.f + z * (1.f - sg));
    sw += g * xh;
    sb += g;
  }
  sw = block_sum(sw, red);
  sb = block_sum(sb, red);
  if (threadIdx.x == 0) ws_w[blockIdx.x] = sw, ws_b[blockIdx.x] = sb;
}

// s1 = sum_c w*db / M and s2 = sum_c w*dwp / M per (n, g).
__global__ void gns_bwd_coefs_generic(const float* __restrict__ w, const float* ws_w, const float* ws_b, float* s1,
                                      float* s2, int64_t NG, int C, int HW, int G) {
  const int64_t ng = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (ng >= NG) return;
  const int D = C / G;
  const int64_t n = ng / G, c0 = (ng % G) * D;
  float a = 0.f, q = 0.f;
  for (int d = 0; d < D; ++d) {
    const float wc = w ? w[c0 + d] : 1.f;
    a += wc * ws_b[n * C + c0 + d];
    q += wc * ws_w[n * C + c0 + d];
  }
  s1[ng] = a / (float(D) * HW);
  s2[ng] = q / (float(D) * HW);
}

template <typename T>
__global__ void gns_bwd_apply_generic(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                      const float* __restrict__ w, const float* __restrict__ b, const float* mean,
                                      const float* rstd, const float* s1, const float* s2, int64_t total, int C,
                                      int HW, int G, bool nhwc) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t n;
    int c;
    locate(i, C, HW, nhwc, &n, &c);
    const int64_t ng = n * G + c / (C / G);
    const float wc = w ? w[c] : 1.f, r = rstd[ng];
    const float xh = (to_f(x[i]) - mean[ng]) * r, z = xh * wc + (b ? b[c] : 0.f), sg = sigmoidf_(z);
    const float g = to_f(dy[i]) * sg * (1.f + z * (1.f - sg));
    dx[i] = from_f<T>(r * (wc * g - s1[ng] - xh * s2[ng]));
  }
}

// dweight[c] = sum_n ws_w[n, c], dbias[c] = sum_n ws_b[n, c] (fixed order: deterministic).
__global__ void gns_affine_grads(const float* ws_w, const float* ws_b, float* dw, float* db, int64_t N, int C) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float a = 0.f, q = 0.f;
  for (int64_t n = 0; n < N; ++n) a += ws_w[n * C + c], q += ws_b[n * C + c];
  dw[c] = a;
  db[c] = q;
}

// ------------------------------------------------------------------------------------ host side
void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("ddpm_fast._C group_norm_silu: ") + what + " failed: " +
                             cudaGetErrorString(err));
}

bool aligned(const void* p, size_t bytes) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; }

int64_t gcd64(int64_t a, int64_t b) { return b == 0 ? a : gcd64(b, a % b); }

// The on-chip launch shape for a group of M = D*HW elements, or ok == false (use the generic path).
struct OnchipConfig {
  int threads = 0, items = 0, vec = 1;
  bool ok = false;
};

OnchipConfig pick_onchip(const GroupNormSiLUParams& p, bool aligned16) {
  OnchipConfig cfg;
  const int64_t D = p.D(), M = p.group_size();
  const bool nhwc = p.layout == Layout::kNHWC;
  cfg.vec = aligned16 && (nhwc ? D % 4 == 0 : p.HW % 4 == 0) ? 4 : 1;
  const int64_t slots = M / cfg.vec;
  // NHWC: threads must be a multiple of D/vec (each thread keeps the same channels) and of the warp size.
  const int64_t dv = D / cfg.vec, unit = nhwc ? kWarp / gcd64(kWarp, dv) * dv : kWarp;
  if (unit > kMaxThreads) return cfg;
  int64_t t = std::min<int64_t>(kMaxThreads, std::max<int64_t>(kWarp, (slots + 3) / 4));
  t = (t + unit - 1) / unit * unit;
  if (t > kMaxThreads) t = kMaxThreads / unit * unit;
  int items = 1;
  while (int64_t(items) * t < slots) items *= 2;
  if (items > 8) return cfg;
  cfg.threads = int(t), cfg.items = items, cfg.ok = true;
  return cfg;
}

template <typename T, int I, int V> void launch_fwd_onchip(const GroupNormSiLUParams& p, int threads, cudaStream_t s) {
  gns_fwd_onchip<T, I, V><<<unsigned(p.N * p.G), threads, 0, s>>>(
      static_cast<const T*>(p.x), static_cast<T*>(p.y), static_cast<const float*>(p.weight),
      static_cast<const float*>(p.bias), static_cast<float*>(p.mean), static_cast<float*>(p.rstd), int(p.C),
      int(p.HW), int(p.G), float(p.eps), p.layout == Layout::kNHWC);
}

template <typename T, int I, int V>
void launch_bwd_onchip(const GroupNormSiLUParams& p, int threads, float* ws_w, float* ws_b, cudaStream_t s) {
  const bool nhwc = p.layout == Layout::kNHWC;
  const size_t smem = sizeof(float) * 2 * (nhwc ? size_t(threads) * V : size_t(threads) * I);
  gns_bwd_onchip<T, I, V><<<unsigned(p.N * p.G), threads, smem, s>>>(
      static_cast<const T*>(p.dy), static_cast<const T*>(p.x), static_cast<T*>(p.dx),
      static_cast<const float*>(p.weight), static_cast<const float*>(p.bias), static_cast<const float*>(p.mean),
      static_cast<const float*>(p.rstd), ws_w, ws_b, int(p.C), int(p.HW), int(p.G), nhwc);
}

// Instantiates kernel<T, items, vec> for items in {1, 2, 4, 8} and vec in {1, 4}.
#define GNS_DISPATCH_ONCHIP(LAUNCH, T, cfg, ...)                      \
  do {                                                                \
    const int key = (cfg).items * 10 + (cfg).vec;                     \
    switch (key) {                                                    \
      case 11: LAUNCH<T, 1, 1>(__VA_ARGS__); break;                   \
      case 21: LAUNCH<T, 2, 1>(__VA_ARGS__); break;                   \
      case 41: LAUNCH<T, 4, 1>(__VA_ARGS__); break;                   \
      case 81: LAUNCH<T, 8, 1>(__VA_ARGS__); break;                   \
      case 14: LAUNCH<T, 1, 4>(__VA_ARGS__); break;                   \
      case 24: LAUNCH<T, 2, 4>(__VA_ARGS__); break;                   \
      case 44: LAUNCH<T, 4, 4>(__VA_ARGS__); break;                   \
      default: LAUNCH<T, 8, 4>(__VA_ARGS__); break;                   \
    }                                                                 \
  } while (0)

unsigned elementwise_blocks(int64_t total) { return unsigned(std::min<int64_t>((total + 255) / 256, 8192)); }

template <typename T> void fwd_typed(const GroupNormSiLUParams& p, cudaStream_t s) {
  const OnchipConfig cfg = pick_onchip(p, aligned(p.x, 4 * sizeof(T)) && aligned(p.y, 4 * sizeof(T)));
  if (cfg.ok) {
    GNS_DISPATCH_ONCHIP(launch_fwd_onchip, T, cfg, p, cfg.threads, s);
    check_launch("forward kernel");
    return;
  }
  const bool nhwc = p.layout == Layout::kNHWC;
  float* mean = static_cast<float*>(p.mean);
  float* rstd = static_cast<float*>(p.rstd);
  gns_stats_generic<T><<<unsigned(p.N * p.G), kMaxThreads, 0, s>>>(static_cast<const T*>(p.x), mean, rstd,
                                                                    int(p.C), int(p.HW), int(p.G), float(p.eps), nhwc);
  gns_fwd_apply_generic<T><<<elementwise_blocks(p.numel()), 256, 0, s>>>(
      static_cast<const T*>(p.x), static_cast<T*>(p.y), static_cast<const float*>(p.weight),
      static_cast<const float*>(p.bias), mean, rstd, p.numel(), int(p.C), int(p.HW), int(p.G), nhwc);
  check_launch("forward kernels (generic)");
}

template <typename T> void bwd_typed(const GroupNormSiLUParams& p, float* ws, cudaStream_t s) {
  const bool nhwc = p.layout == Layout::kNHWC;
  float* ws_w = ws;
  float* ws_b = ws + p.N * p.C;
  const size_t vbytes = 4 * sizeof(T);
  const OnchipConfig cfg =
      pick_onchip(p, aligned(p.x, vbytes) && aligned(p.dy, vbytes) && aligned(p.dx, vbytes));
  const float* w = static_cast<const float*>(p.weight);
  if (cfg.ok) {
    GNS_DISPATCH_ONCHIP(launch_bwd_onchip, T, cfg, p, cfg.threads, ws_w, ws_b, s);
  } else {
    float* s1 = ws + 2 * p.N * p.C;
    float* s2 = s1 + p.N * p.G;
    const auto* mean = static_cast<const float*>(p.mean);
    const auto* rstd = static_cast<const float*>(p.rstd);
    gns_bwd_sums_generic<T><<<unsigned(p.N * p.C), 256, 0, s>>>(
        static_cast<const T*>(p.dy), static_cast<const T*>(p.x), w, static_cast<const float*>(p.bias), mean, rstd,
        ws_w, ws_b, int(p.C), int(p.HW), int(p.G), nhwc);
    gns_bwd_coefs_generic<<<unsigned((p.N * p.G + 255) / 256), 256, 0, s>>>(w, ws_w, ws_b, s1, s2, p.N * p.G,
                                                                             int(p.C), int(p.HW), int(p.G));
    gns_bwd_apply_generic<T><<<elementwise_blocks(p.numel()), 256, 0, s>>>(
        static_cast<const T*>(p.dy), static_cast<const T*>(p.x), static_cast<T*>(p.dx), w,
        static_cast<const float*>(p.bias), mean, rstd, s1, s2, p.numel(), int(p.C), int(p.HW), int(p.G), nhwc);
  }
  if (p.dweight != nullptr)
    gns_affine_grads<<<unsigned((p.C + 255) / 256), 256, 0, s>>>(ws_w, ws_b, static_cast<float*>(p.dweight),
                                                                  static_cast<float*>(p.dbias), p.N, int(p.C));
  check_launch("backward kernels");
}

void check_cuda_params(const GroupNormSiLUParams& p, bool backward) {
  gns_check(p, backward);
  gns_require(p.dtype != DType::kFloat64, "float64 is not supported by the CUDA kernels");
  const int64_t kInt = (int64_t(1) << 31) - 1;
  gns_require(p.C <= kInt && p.HW <= kInt && p.group_size() <= kInt,
              "C, HW and the group size C/G*HW must each be < 2^31 on CUDA");
  gns_require(p.N * p.G <= kInt && p.N * p.C <= kInt, "N*C must be < 2^31 on CUDA");
}

// Empty input: no kernel to run; statistics (forward) or affine grads (backward) are zeros.
bool handle_empty(const GroupNormSiLUParams& p, bool backward, cudaStream_t s) {
  if (p.numel() != 0) return false;
  if (!backward && p.N * p.G > 0) {
    cudaMemsetAsync(p.mean, 0, sizeof(float) * p.N * p.G, s);
    cudaMemsetAsync(p.rstd, 0, sizeof(float) * p.N * p.G, s);
  } else if (backward && p.dweight != nullptr) {
    cudaMemsetAsync(p.dweight, 0, sizeof(float) * p.C, s);
    cudaMemsetAsync(p.dbias, 0, sizeof(float) * p.C, s);
  }
  check_launch("memset");
  return true;
}

}  // namespace

int64_t gns_cuda_workspace_floats(const GroupNormSiLUParams& p) { return 2 * p.N * p.C + 2 * p.N * p.G; }

void group_norm_silu_fwd_cuda(const GroupNormSiLUParams& p, void* stream) {
  check_cuda_params(p, false);
  auto s = static_cast<cudaStream_t>(stream);
  if (handle_empty(p, false, s)) return;
  switch (p.dtype) {
    case DType::kFloat32: return fwd_typed<float>(p, s);
    case DType::kFloat16: return fwd_typed<__half>(p, s);
    default: return fwd_typed<__nv_bfloat16>(p, s);
  }
}

void group_norm_silu_bwd_cuda(const GroupNormSiLUParams& p, float* workspace, int64_t workspace_floats,
                              void* stream) {
  check_cuda_params(p, true);
  gns_require(workspace_floats >= gns_cuda_workspace_floats(p) && (workspace != nullptr || p.numel() == 0),
              "workspace too small: need " + std::to_string(gns_cuda_workspace_floats(p)) + " floats, got " +
                  std::to_string(workspace_floats));
  auto s = static_cast<cudaStream_t>(stream);
  if (handle_empty(p, true, s)) return;
  switch (p.dtype) {
    case DType::kFloat32: return bwd_typed<float>(p, workspace, s);
    case DType::kFloat16: return bwd_typed<__half>(p, workspace, s);
    default: return bwd_typed<__nv_bfloat16>(p, workspace, s);
  }
}

}  // namespace ddpm_fast
