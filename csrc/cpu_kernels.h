// What the CPU sampler kernels (p_step_cpu.cpp, solver_step_cpu.cpp) share: the run-time AVX2+FMA switch, the
// tiling of a pass over memory across OpenMP threads, the runs of x's elements whose model output is contiguous,
// and the Philox N(0, 1) stream of ops/triton/philox.py (defined in p_step_cpu.cpp).
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

// Runs: the innermost memory dimension of x (dense NCHW or channels-last, N x C x S), merged with the next ones
// while the model output (strides mo_sn, mo_sc, mo_ss) is contiguous across them: a model output laid out like x
// gives one run per tile. for_each(l0, l1, f) calls f(l, len, base) for the runs cut to [l0, l1): x elements
// [l, l + len) read the model output at base + i * in_st.
struct ModelOutputRuns {
  int64_t CS, in_len, in_st, mid_st, mo_sn, run;

  ModelOutputRuns(bool channels_last, int64_t N, int64_t C, int64_t S, int64_t mo_sn_, int64_t mo_sc, int64_t mo_ss)
      : CS(C * S), in_len(channels_last ? C : S), in_st(channels_last ? mo_sc : mo_ss),
        mid_st(channels_last ? mo_ss : mo_sc), mo_sn(mo_sn_), run(in_len) {
    const int64_t n = N * C * S, mid_len = channels_last ? S : C;
    if (mid_st == in_len * in_st) run *= mid_len;
    if (run == CS && mo_sn == run * in_st) run = n > 0 ? n : 1;
  }

  template <typename F> void for_each(int64_t l0, int64_t l1, F f) const {
    for (int64_t l = l0; l < l1;) {
      const int64_t len = std::min(run - l % run, l1 - l);
      const int64_t ns = l / CS, rem = l % CS;
      f(l, len, ns * mo_sn + (rem / in_len) * mid_st + (rem % in_len) * in_st);
      l += len;
    }
  }
};

}  // namespace ddpm_fast
