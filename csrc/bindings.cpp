// pybind11 module ddpm_fast._C: torch-independent kernels taking raw pointers (as integers), sizes, a dtype
// code and a CUDA stream handle. The Python layer validates devices/dtypes/layouts; every function here
// re-checks the sizes it is handed before touching memory.
#include <pybind11/pybind11.h>

namespace py = pybind11;

#ifdef DDPM_FAST_WITH_CUDA
int ddpm_fast_cuda_runtime_version();
#endif

// ---- group_norm_silu bindings (owner: group_norm_silu) ----
// ---- end group_norm_silu bindings ----

// ---- p_step bindings (owner: diffusion ops) ----
#include <cstdint>

namespace ddpm_fast {  // csrc/p_step_cpu.cpp
void p_step_fused_cpu(uintptr_t x, uintptr_t mo, uintptr_t noise, uintptr_t out, int64_t N, int64_t C, int64_t S,
                      bool channels_last, int64_t mo_sn, int64_t mo_sc, int64_t mo_ss, int64_t var_off, double p,
                      double q, double a, double b, double sigma, double lv_lo, double lv_hi, bool clip,
                      bool learned, bool add_noise, uint64_t seed, uint32_t step, uint32_t stream,
                      int64_t element_offset, int threads);
void philox_randn_fill_cpu(uintptr_t out, int64_t n, uint64_t seed, uint32_t step, uint32_t stream,
                           int64_t element_offset, int threads);
}  // namespace ddpm_fast
// ---- end p_step bindings ----

PYBIND11_MODULE(_C, m) {
  m.doc() = "ddpm_fast compiled kernels (CPU always; CUDA when built with nvcc)";
#ifdef DDPM_FAST_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("cuda_runtime_version", &ddpm_fast_cuda_runtime_version);
#else
  m.attr("with_cuda") = false;
#endif
#ifdef DDPM_FAST_OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
  // ---- group_norm_silu defs ----
  // ---- end group_norm_silu defs ----
  // ---- p_step defs ----
  m.def("p_step_fused_cpu", &ddpm_fast::p_step_fused_cpu,
        "x_{t-1} = a * clip(p x + q m) + b x + sigma z in one pass; fp32; z injected or Philox (CPU)",
        py::arg("x"), py::arg("mo"), py::arg("noise"), py::arg("out"), py::arg("N"), py::arg("C"), py::arg("S"),
        py::arg("channels_last"), py::arg("mo_sn"), py::arg("mo_sc"), py::arg("mo_ss"), py::arg("var_off"),
        py::arg("p"), py::arg("q"), py::arg("a"), py::arg("b"), py::arg("sigma"), py::arg("lv_lo"),
        py::arg("lv_hi"), py::arg("clip"), py::arg("learned"), py::arg("add_noise"), py::arg("seed"),
        py::arg("step"), py::arg("stream"), py::arg("element_offset"), py::arg("num_threads"),
        py::call_guard<py::gil_scoped_release>());
  m.def("philox_randn_cpu", &ddpm_fast::philox_randn_fill_cpu,
        "fill n fp32 values with the Philox N(0, 1) stream of (seed, step, stream, element) (CPU)",
        py::arg("out"), py::arg("n"), py::arg("seed"), py::arg("step"), py::arg("stream"),
        py::arg("element_offset"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  // ---- end p_step defs ----
}
