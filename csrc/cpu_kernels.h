// What the CPU sampler kernels (p_step_cpu.cpp, solver_step_cpu.cpp) share: the run-time AVX2+FMA switch, the
// tiling of a pass over memory across OpenMP threads, and the Philox N(0, 1) stream of ops/triton/philox.py
// (defined in p_step_cpu.cpp).
#pragma once
#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DDPM_FAST_X86 1
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2,fma")))
#endif
#ifdef DDPM_FAST_OPENMP
#include <omp.h>
#endif

namespace ddpm_fast {

constexpr int64_t kTile = 2048;  // elements per work item (a multiple of 32: whole 8-group AVX2 batches)
// Work per thread >= kGrain elements (~30 us): smaller parallel regions cost more in fork/join than they save,
// and much more when the machine is oversubscribed.
constexpr int64_t kGrain = 16384;

// True when this CPU runs the AVX2+FMA paths (the build targets the baseline ISA).
bool use_avx2();

// Normals of global elements [e0, e1) at (seed, step, stream) into dst[0 .. e1 - e0): the Philox stream.
void philox_randn_range(float* dst, int64_t e0, int64_t e1, uint64_t seed, uint32_t step, uint32_t stream);

// body(l0, l1) over tiles [l0, l1) of [0, n), on up to `threads` threads; tiles never depend on the thread count.
template <typename F> void parallel_tiles(int64_t n, int threads, F body) {
  int64_t tiles = (n + kTile - 1) / kTile;
  int use = static_cast<int>(std::min<int64_t>(std::max(1, threads), std::max<int64_t>(1, n / kGrain)));
#ifdef DDPM_FAST_OPENMP
#pragma omp parallel for schedule(static) num_threads(use) if (use > 1)
#else
  (void)use;
#endif
  for (int64_t t = 0; t < tiles; ++t) body(t * kTile, std::min(n, (t + 1) * kTile));
}

}  // namespace ddpm_fast
