#include <cuda_runtime.h>

int ddpm_fast_cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}
