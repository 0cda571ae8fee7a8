// Device building blocks of the CUDA GroupNorm+SiLU kernels (group_norm_silu_cuda.cu, the only includer):
// fp16/bf16 conversions, vectorized pack loads/stores, warp and CTA sums, and where a group's elements live.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace ddpm_fast {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kWarp = 32;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// V consecutive elements at p (p aligned to V * sizeof(T) when V == 4): one 16- or 8-byte access.
template <typename T, int V> struct alignas(sizeof(T) * V) Pack {
  T v[V];
};
template <typename T, int V> __device__ __forceinline__ void load_pack(const T* p, float* out) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = to_f(pk.v[i]);
}
template <typename T, int V> __device__ __forceinline__ void store_pack(T* p, const float* in) {
  Pack<T, V> pk;
#pragma unroll
  for (int i = 0; i < V; ++i) pk.v[i] = from_f<T>(in[i]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

__device__ __forceinline__ float sigmoidf_(float z) { return 1.0f / (1.0f + __expf(-z)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the CTA (blockDim.x a multiple of 32), returned to every thread; `red` holds >= 32 floats.
// Every warp adds the per-warp partials in the same order, so the result is identical in all threads.
__device__ __forceinline__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  __syncthreads();  // red may still be read by a previous block_sum
  if ((threadIdx.x & (kWarp - 1)) == 0) red[threadIdx.x / kWarp] = v;
  __syncthreads();
  float total = 0.f;
  const int warps = blockDim.x / kWarp;
  for (int i = 0; i < warps; ++i) total += red[i];
  return total;
}

// Where element e (0 <= e < M, the group's linear index) of group (n, g) lives, and its channel.
struct GroupView {
  int64_t base;  // offset of the group's first element
  int HW, D, C;
  bool nhwc;
  __device__ __forceinline__ int64_t offset(int e) const {
    return nhwc ? base + int64_t(e / D) * C + (e % D) : base + e;
  }
  __device__ __forceinline__ int channel(int e) const { return nhwc ? e % D : e / HW; }  // within the group
};

__device__ __forceinline__ GroupView group_view(int64_t n, int64_t g, int C, int HW, int D, bool nhwc) {
  GroupView v;
  v.base = nhwc ? n * HW * C + g * D : (n * C + g * D) * int64_t(HW);
  v.HW = HW, v.D = D, v.C = C, v.nhwc = nhwc;
  return v;
}

}  // namespace
}  // namespace ddpm_fast
