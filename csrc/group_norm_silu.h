// Fused y = silu(group_norm(x, G, weight, bias, eps)): the one parameter set shared by the CPU and CUDA
// kernels. Torch-free: tensors arrive as raw pointers plus sizes, a dtype code and a layout code.
//
// Shapes (NCHW means x[n][c][hw], NHWC means x[n][hw][c]; HW is the product of all spatial dims):
//   x, y, dy, dx: N*C*HW elements of `dtype`
//   weight, bias: C elements of the stats type (nullptr: weight 1, bias 0)
//   mean, rstd:   N*G elements of the stats type     dweight, dbias: C elements of the stats type
// The stats type is float, except double for kFloat64 inputs on the CPU (so float64 gradcheck is exact).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace ddpm_fast {

// Codes shared with Python (ddpm_fast/ops/group_norm_silu.py: _DTYPE_CODES, _LAYOUT_CODES).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };
enum class Layout : int { kNCHW = 0, kNHWC = 1 };

struct GroupNormSiLUParams {
  int64_t N = 0, C = 0, HW = 0, G = 1;
  double eps = 1e-5;
  DType dtype = DType::kFloat32;
  Layout layout = Layout::kNCHW;
  // forward inputs / outputs
  const void* x = nullptr;
  const void* weight = nullptr;  // stats type (the Python layer casts); nullptr -> 1
  const void* bias = nullptr;    // nullptr -> 0
  void* y = nullptr;
  void* mean = nullptr;  // written by forward, read by backward
  void* rstd = nullptr;
  // backward only
  const void* dy = nullptr;
  void* dx = nullptr;
  void* dweight = nullptr;  // may be nullptr: then dweight/dbias are not reduced
  void* dbias = nullptr;

  int64_t D() const { return C / G; }  // channels per group
  int64_t group_size() const { return C / G * HW; }
  int64_t numel() const { return N * C * HW; }
};

inline void gns_require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("ddpm_fast._C group_norm_silu: " + what);
}

// Validates every size and code before any memory is touched (std::invalid_argument -> ValueError).
// stats_optional: mean/rstd may both be null (the CPU forward then keeps them to itself).
inline void gns_check(const GroupNormSiLUParams& p, bool backward, bool stats_optional = false) {
  gns_require(p.N >= 0 && p.HW >= 0, "N and HW must be >= 0 (got N=" + std::to_string(p.N) +
                                         ", HW=" + std::to_string(p.HW) + ")");
  gns_require(p.C >= 1 && p.G >= 1, "C and G must be >= 1 (got C=" + std::to_string(p.C) +
                                        ", G=" + std::to_string(p.G) + ")");
  gns_require(p.C % p.G == 0, "C=" + std::to_string(p.C) + " is not divisible by G=" + std::to_string(p.G));
  gns_require(p.eps >= 0.0, "eps must be >= 0");
  const int dt = static_cast<int>(p.dtype), lt = static_cast<int>(p.layout);
  gns_require(dt >= 0 && dt <= 3, "unknown dtype code " + std::to_string(dt));
  gns_require(lt == 0 || lt == 1, "unknown layout code " + std::to_string(lt));
  // N*C*HW must not overflow int64 (each factor is checked against the bound before multiplying).
  const int64_t kMax = int64_t(1) << 62;
  gns_require(p.HW == 0 || p.N <= kMax / p.C / p.HW, "N*C*HW overflows int64");
  gns_require(p.N == 0 || p.G <= kMax / p.N, "N*G overflows int64");
  if (p.numel() == 0 && p.N * p.G == 0) return;
  gns_require((p.mean != nullptr && p.rstd != nullptr) || (stats_optional && p.mean == p.rstd),
              "mean/rstd pointers are null");
  if (p.numel() == 0) return;
  gns_require(p.x != nullptr, "x pointer is null");
  if (!backward) {
    gns_require(p.y != nullptr, "y pointer is null");
  } else {
    gns_require(p.dy != nullptr && p.dx != nullptr, "dy/dx pointers are null");
    gns_require((p.dweight == nullptr) == (p.dbias == nullptr), "dweight and dbias must both be given or both null");
  }
}

// CPU (csrc/group_norm_silu_cpu.cpp). num_threads >= 1: the Python layer passes torch.get_num_threads().
// Supported dtypes: kFloat32, kBFloat16 (fp32 math), kFloat64. The forward accepts null mean and rstd (both):
// inference that discards them.
void group_norm_silu_fwd_cpu(const GroupNormSiLUParams& p, int num_threads);
void group_norm_silu_bwd_cpu(const GroupNormSiLUParams& p, int num_threads);

#ifdef DDPM_FAST_WITH_CUDA
// CUDA (csrc/group_norm_silu_cuda.cu). Supported dtypes: kFloat32, kFloat16, kBFloat16; stats always fp32.
// `stream` is a cudaStream_t. No allocation, no host sync: capturable in a CUDA graph. The backward needs a
// workspace of gns_cuda_workspace_floats(p) floats (allocated by the caller).
int64_t gns_cuda_workspace_floats(const GroupNormSiLUParams& p);
void group_norm_silu_fwd_cuda(const GroupNormSiLUParams& p, void* stream);
void group_norm_silu_bwd_cuda(const GroupNormSiLUParams& p, float* workspace, int64_t workspace_floats,
                              void* stream);
#endif

}  // namespace ddpm_fast
