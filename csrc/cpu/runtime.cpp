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

#ifdef MIXFAST_WITH_CUDA
namespace {

int query_device_count() {
  int n = 0;
  // Without a driver this returns cudaErrorInsufficientDriver / cudaErrorNoDevice; clear
  // the sticky error and report no device.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

}  // namespace
#endif

int cuda_device_count() {
#ifdef MIXFAST_WITH_CUDA
  // Every CUDA entry point asks (require_cuda). The visible devices are fixed when the
  // driver initializes, so the driver is asked once per process, not once per launch.
  static const int count = query_device_count();
  return count;
#else
  return 0;
#endif
}

}  // namespace mixfast
