// Helpers for the CUDA launchers (csrc/cuda/*.cu): error checks that throw (pybind11 turns
// them into Python RuntimeError) and the device's SM count for persistent grids.
#pragma once

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#define MIXFAST_CUDA_CHECK(expr)                                                                             \
  do {                                                                                                       \
    const cudaError_t mixfast_err_ = (expr);                                                                 \
    if (mixfast_err_ != cudaSuccess)                                                                         \
      throw std::runtime_error(std::string("mixfast CUDA error: ") + cudaGetErrorString(mixfast_err_) + " (" + \
                               #expr + ", " + __FILE__ + ":" + std::to_string(__LINE__) + ")");             \
  } while (0)

namespace mixfast {

inline int current_sm_count() {
  static int cached[64] = {0};
  int dev = 0;
  MIXFAST_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 0 || dev >= 64) dev = 0;
  if (cached[dev] == 0) MIXFAST_CUDA_CHECK(cudaDeviceGetAttribute(&cached[dev], cudaDevAttrMultiProcessorCount, dev));
  return cached[dev];
}

inline cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

}  // namespace mixfast
