// Helpers for the CUDA launchers (csrc/cuda/*.cu): the one CUDA error check, which throws
// (pybind11 turns it into a Python RuntimeError), the current device, and its SM count for
// persistent grids.
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

// Per-device caches below hold this many devices.
constexpr int kMaxDevices = 64;

// The calling thread's device: host state only, no synchronization (fine under graph capture).
inline int current_device() {
  int dev = 0;
  MIXFAST_CUDA_CHECK(cudaGetDevice(&dev));
  return dev;
}

inline int current_sm_count() {
  static int cached[kMaxDevices] = {0};
  int dev = current_device();
  if (dev < 0 || dev >= kMaxDevices) dev = 0;
  if (cached[dev] == 0) MIXFAST_CUDA_CHECK(cudaDeviceGetAttribute(&cached[dev], cudaDevAttrMultiProcessorCount, dev));
  return cached[dev];
}

inline cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

}  // namespace mixfast
