// Build flavour and CUDA device presence; see mixfast/runtime.h.
#include "mixfast/runtime.h"

#ifdef MIXFAST_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace mixfast {

bool cuda_built() {
#ifdef MIXFAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int cuda_device_count() {
#ifdef MIXFAST_WITH_CUDA
  int n = 0;
  // Without a driver this returns cudaErrorInsufficientDriver / cudaErrorNoDevice; clear
  // the sticky error and report no device.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
#else
  return 0;
#endif
}

}  // namespace mixfast
