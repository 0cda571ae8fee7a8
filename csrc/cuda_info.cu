// What the Python layer needs to decide, lazily and per device, whether this module's CUDA kernels can run:
// the CUDA runtime it was built with, the driver's CUDA version, and one tiny launch (cudart is linked
// statically, so an older driver -- or a GPU architecture the build has no code for -- fails at launch).
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

int ddpm_fast_cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

int ddpm_fast_cuda_driver_version() {
  int v = 0;
  cudaDriverGetVersion(&v);  // 0 when no driver is installed
  return v;
}

namespace {
__global__ void ddpm_fast_probe_kernel(int* sink) {
  if (sink != nullptr) *sink = 1;
}
}  // namespace

// Launches one empty kernel on `stream` (of the current device); "" on success, else the CUDA error text.
std::string ddpm_fast_cuda_probe(uintptr_t stream) {
  ddpm_fast_probe_kernel<<<1, 1, 0, reinterpret_cast<cudaStream_t>(stream)>>>(nullptr);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}
