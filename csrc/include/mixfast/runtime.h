// What the module was built with, and the guard every CUDA entry point calls after checking
// its arguments, so that using one without a GPU raises a Python error instead of crashing
// (csrc/cpu/runtime.cpp implements these for both build flavours).
#pragma once

#include <stdexcept>
#include <string>

namespace mixfast {

bool cuda_built();       // compiled with the CUDA kernels
int cuda_device_count(); // 0 when not built, without a driver or without a device; never throws

inline void require_cuda(const char* op) {
  if (!cuda_built())
    throw std::runtime_error(std::string("mixfast._C.") + op +
                             ": this build has no CUDA kernels (nvcc was not found or MIXFAST_CUDA=0 at build time)");
  if (cuda_device_count() < 1)
    throw std::runtime_error(std::string("mixfast._C.") + op + ": no CUDA device is available on this machine");
}

}  // namespace mixfast
