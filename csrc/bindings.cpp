// pybind11 module ddpm_fast._C: torch-independent kernels taking raw pointers (as integers), sizes, a dtype
// code and a CUDA stream handle. The Python layer validates devices/dtypes/layouts; every function here
// re-checks the sizes it is handed before touching memory.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

namespace py = pybind11;

#ifdef DDPM_FAST_WITH_CUDA
#include <string>
int ddpm_fast_cuda_runtime_version();
int ddpm_fast_cuda_driver_version();
std::string ddpm_fast_cuda_probe(uintptr_t stream);
#endif

// ---- group_norm_silu bindings (owner: group_norm_silu) ----
#include <cstdint>

#include "group_norm_silu.h"
#include "group_norm_silu_cpu_simd.h"

namespace {
// Pointers arrive as integers (tensor.data_ptr()); 0 means "absent" (weight/bias/dweight/dbias).
template <typename P> P* gns_ptr(uintptr_t v) { return reinterpret_cast<P*>(v); }

ddpm_fast::GroupNormSiLUParams gns_params(int64_t N, int64_t C, int64_t HW, int64_t G, double eps, int dtype,
                                          int layout, uintptr_t x, uintptr_t weight, uintptr_t bias,
                                          uintptr_t mean, uintptr_t rstd) {
  ddpm_fast::GroupNormSiLUParams p;
  p.N = N, p.C = C, p.HW = HW, p.G = G, p.eps = eps;
  p.dtype = static_cast<ddpm_fast::DType>(dtype);
  p.layout = static_cast<ddpm_fast::Layout>(layout);
  p.x = gns_ptr<const void>(x), p.weight = gns_ptr<const void>(weight), p.bias = gns_ptr<const void>(bias);
  p.mean = gns_ptr<void>(mean), p.rstd = gns_ptr<void>(rstd);
  return p;
}

void gns_fwd_cpu(uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t y, uintptr_t mean, uintptr_t rstd,
                 int64_t N, int64_t C, int64_t HW, int64_t G, double eps, int dtype, int layout, int threads) {
  auto p = gns_params(N, C, HW, G, eps, dtype, layout, x, weight, bias, mean, rstd);
  p.y = gns_ptr<void>(y);
  ddpm_fast::group_norm_silu_fwd_cpu(p, threads);
}

void gns_bwd_cpu(uintptr_t dy, uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t mean, uintptr_t rstd,
                 uintptr_t dx, uintptr_t dweight, uintptr_t dbias, int64_t N, int64_t C, int64_t HW, int64_t G,
                 int dtype, int layout, int threads) {
  auto p = gns_params(N, C, HW, G, 0.0, dtype, layout, x, weight, bias, mean, rstd);
  p.dy = gns_ptr<const void>(dy), p.dx = gns_ptr<void>(dx);
  p.dweight = gns_ptr<void>(dweight), p.dbias = gns_ptr<void>(dbias);
  ddpm_fast::group_norm_silu_bwd_cpu(p, threads);
}

#ifdef DDPM_FAST_WITH_CUDA
void gns_fwd_cuda(uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t y, uintptr_t mean, uintptr_t rstd,
                  int64_t N, int64_t C, int64_t HW, int64_t G, double eps, int dtype, int layout,
                  uintptr_t stream) {
  auto p = gns_params(N, C, HW, G, eps, dtype, layout, x, weight, bias, mean, rstd);
  p.y = gns_ptr<void>(y);
  ddpm_fast::group_norm_silu_fwd_cuda(p, gns_ptr<void>(stream));
}

void gns_bwd_cuda(uintptr_t dy, uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t mean, uintptr_t rstd,
                  uintptr_t dx, uintptr_t dweight, uintptr_t dbias, uintptr_t workspace, int64_t workspace_floats,
                  int64_t N, int64_t C, int64_t HW, int64_t G, int dtype, int layout, uintptr_t stream) {
  auto p = gns_params(N, C, HW, G, 0.0, dtype, layout, x, weight, bias, mean, rstd);
  p.dy = gns_ptr<const void>(dy), p.dx = gns_ptr<void>(dx);
  p.dweight = gns_ptr<void>(dweight), p.dbias = gns_ptr<void>(dbias);
  ddpm_fast::group_norm_silu_bwd_cuda(p, gns_ptr<float>(workspace), workspace_floats, gns_ptr<void>(stream));
}

int64_t gns_cuda_workspace(int64_t N, int64_t C, int64_t HW, int64_t G) {
  auto p = gns_params(N, C, HW, G, 0.0, 0, 0, 0, 0, 0, 0, 0);
  return ddpm_fast::gns_cuda_workspace_floats(p);
}
#endif
}  // namespace
// ---- end group_norm_silu bindings ----

// ---- p_step bindings (owner: diffusion ops) ----
#include <cstdint>

namespace ddpm_fast {  // csrc/p_step_cpu.cpp
void p_step_fused_cpu(uintptr_t x, uintptr_t mo, uintptr_t noise, uintptr_t out, int64_t N, int64_t C, int64_t S,
                      bool channels_last, int64_t mo_sn, int64_t mo_sc, int64_t mo_ss, int64_t var_off, double p,
                      double q, double a, double b, double sigma, double lv_lo, double lv_hi, bool clip,
                      bool learned, bool add_noise, uint64_t seed, uint32_t step, uint32_t stream,
                      int64_t element_offset, bool guided, double w, int64_t mo_un, int threads);
void philox_randn_fill_cpu(uintptr_t out, int64_t n, uint64_t seed, uint32_t step, uint32_t stream,
                           int64_t element_offset, int threads);
}  // namespace ddpm_fast
// ---- end p_step bindings ----

// ---- solver_step bindings (owner: diffusion ops) ----
namespace ddpm_fast {  // csrc/solver_step_cpu.cpp
void solver_step_fused_cpu(uintptr_t x, uintptr_t mo, uintptr_t noise, uintptr_t out, uintptr_t h1, uintptr_t h2,
                           uintptr_t last, int64_t N, int64_t C, int64_t S, bool channels_last, int64_t mo_sn,
                           int64_t mo_sc, int64_t mo_ss, double p, double q, double cx, double cl, double c0,
                           double c1, double c2, double a, double b0, double b1, double b2, double s, bool add_noise,
                           uint64_t seed, uint32_t step, uint32_t stream, int64_t element_offset, bool guided,
                           double w, int64_t mo_un, int threads);
}  // namespace ddpm_fast
// ---- end solver_step bindings ----

PYBIND11_MODULE(_C, m) {
  m.doc() = "ddpm_fast compiled kernels (CPU always; CUDA when built with nvcc)";
#ifdef DDPM_FAST_WITH_CUDA
  m.attr("with_cuda") = true;
  m.attr("cuda_archs") = DDPM_FAST_CUDA_ARCHS_STR;  // what CMake compiled the kernels for, e.g. "80;90"
  m.def("cuda_runtime_version", &ddpm_fast_cuda_runtime_version, "CUDA runtime version this module was built with");
  m.def("cuda_driver_version", &ddpm_fast_cuda_driver_version, "the driver's CUDA version (0: no driver)");
  m.def("cuda_probe", &ddpm_fast_cuda_probe, "launch one empty kernel on `stream`; '' or the CUDA error",
        py::arg("stream"));
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_archs") = "";
#endif
#ifdef DDPM_FAST_OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
  // ---- group_norm_silu defs ----
  // Errors: std::invalid_argument -> ValueError (bad sizes/codes), std::runtime_error -> RuntimeError (CUDA).
  m.def("group_norm_silu_fwd_cpu", &gns_fwd_cpu, "y = silu(group_norm(x)); writes y, mean, rstd (CPU)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("y"), py::arg("mean"), py::arg("rstd"),
        py::arg("N"), py::arg("C"), py::arg("HW"), py::arg("G"), py::arg("eps"), py::arg("dtype"),
        py::arg("layout"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def("group_norm_silu_bwd_cpu", &gns_bwd_cpu, "dx, dweight, dbias of silu(group_norm(x)) (CPU)",
        py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("mean"), py::arg("rstd"),
        py::arg("dx"), py::arg("dweight"), py::arg("dbias"), py::arg("N"), py::arg("C"), py::arg("HW"),
        py::arg("G"), py::arg("dtype"), py::arg("layout"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>());
  m.def("group_norm_silu_cpu_isa", [](const std::string& request) {
          return std::string(ddpm_fast::gns_cpu_isa(request.c_str()));
        }, "CPU kernels in use ('avx512', 'avx2' or 'portable'); request one of those (at most it) or 'auto'; '' asks",
        py::arg("request") = "");
#ifdef DDPM_FAST_WITH_CUDA
  m.def("group_norm_silu_fwd_cuda", &gns_fwd_cuda, "y = silu(group_norm(x)) on `stream` (CUDA)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("y"), py::arg("mean"), py::arg("rstd"),
        py::arg("N"), py::arg("C"), py::arg("HW"), py::arg("G"), py::arg("eps"), py::arg("dtype"),
        py::arg("layout"), py::arg("stream"));
  m.def("group_norm_silu_bwd_cuda", &gns_bwd_cuda, "dx, dweight, dbias on `stream` (CUDA)", py::arg("dy"),
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("mean"), py::arg("rstd"), py::arg("dx"),
        py::arg("dweight"), py::arg("dbias"), py::arg("workspace"), py::arg("workspace_floats"), py::arg("N"),
        py::arg("C"), py::arg("HW"), py::arg("G"), py::arg("dtype"), py::arg("layout"), py::arg("stream"));
  m.def("group_norm_silu_cuda_workspace", &gns_cuda_workspace, "fp32 workspace size of the CUDA backward",
        py::arg("N"), py::arg("C"), py::arg("HW"), py::arg("G"));
#endif
  // ---- end group_norm_silu defs ----
  // ---- p_step defs ----
  m.def("p_step_fused_cpu", &ddpm_fast::p_step_fused_cpu,
        "x_{t-1} = a * clip(p x + q m) + b x + sigma z in one pass (m optionally guided); fp32; z injected or "
        "Philox (CPU)",
        py::arg("x"), py::arg("mo"), py::arg("noise"), py::arg("out"), py::arg("N"), py::arg("C"), py::arg("S"),
        py::arg("channels_last"), py::arg("mo_sn"), py::arg("mo_sc"), py::arg("mo_ss"), py::arg("var_off"),
        py::arg("p"), py::arg("q"), py::arg("a"), py::arg("b"), py::arg("sigma"), py::arg("lv_lo"),
        py::arg("lv_hi"), py::arg("clip"), py::arg("learned"), py::arg("add_noise"), py::arg("seed"),
        py::arg("step"), py::arg("stream"), py::arg("element_offset"), py::arg("guided"), py::arg("w"),
        py::arg("mo_un"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def("philox_randn_cpu", &ddpm_fast::philox_randn_fill_cpu,
        "fill n fp32 values with the Philox N(0, 1) stream of (seed, step, stream, element) (CPU)",
        py::arg("out"), py::arg("n"), py::arg("seed"), py::arg("step"), py::arg("stream"),
        py::arg("element_offset"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  // ---- end p_step defs ----
  // ---- solver_step defs ----
  m.def("solver_step_fused_cpu", &ddpm_fast::solver_step_fused_cpu,
        "one few-step solver step: x, model output and history in, x and history out, one pass; fp32 (CPU)",
        py::arg("x"), py::arg("mo"), py::arg("noise"), py::arg("out"), py::arg("h1"), py::arg("h2"),
        py::arg("last"), py::arg("N"), py::arg("C"), py::arg("S"), py::arg("channels_last"), py::arg("mo_sn"),
        py::arg("mo_sc"), py::arg("mo_ss"), py::arg("p"), py::arg("q"), py::arg("cx"), py::arg("cl"),
        py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("a"), py::arg("b0"), py::arg("b1"), py::arg("b2"),
        py::arg("s"), py::arg("add_noise"), py::arg("seed"), py::arg("step"), py::arg("stream"),
        py::arg("element_offset"), py::arg("guided"), py::arg("w"), py::arg("mo_un"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>());
  // ---- end solver_step defs ----
}
