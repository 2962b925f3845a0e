// Portability macros for code shared by the CPU (g++) and CUDA (nvcc) builds.
//
// Everything under csrc/include is plain C++17 with no ATen/torch dependency: kernels take
// raw pointers, sizes, strides and dtype codes, so the CUDA sources compile without a CUDA
// build of torch and one build works across torch versions (Python validates the tensors
// and passes data_ptr()). Functions marked MIXFAST_HD compile for host and device.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MIXFAST_HD __host__ __device__ __forceinline__
#define MIXFAST_DEVICE_CODE 1
#else
#define MIXFAST_HD inline
#define MIXFAST_DEVICE_CODE 0
#endif

namespace mixfast {

// dtype codes shared with Python (mixfast/ops/_native.py: DTYPE_CODES).
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Mask kinds (MixMask paper, Fig. 1): block = BEiT block masking, discrete = i.i.d. cells;
// also the third Philox counter word, so the two kinds draw from disjoint streams.
enum MaskKind : int { kBlock = 0, kDiscrete = 1 };

constexpr int kMaxGrid = 64;  // a grid row is one uint64 bitmask

MIXFAST_HD int dtype_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

}  // namespace mixfast
