// Argument structs and entry points of the mix ops, shared by the CPU kernels
// (csrc/cpu/mix_cpu.cpp), the CUDA kernels (csrc/cuda/mix_cuda.cu) and the binding
// (csrc/bind_mix.cpp). checked() is the API layer: every argument is checked here, on the
// host, before any kernel runs; Python has already checked the tensors themselves (shape,
// dtype, device, layout) in mixfast/ops/mix.py.
//
// Image batches are [N, C, H, W] with elements of `dtype`, dense within each image in
// NCHW or NHWC (channels_last) order; inputs may have any batch stride, outputs are dense.
// Masks are uint8 [n_masks, g, g] (0/1), n_masks = 1 (one per batch) or N (per sample).
#pragma once

#include <cstdint>
#include <string>

#include "mixfast/block_mask.h"
#include "mixfast/check.h"
#include "mixfast/common.h"

namespace mixfast {

struct ImageGeometry {
  int64_t N = 0, C = 0, H = 0, W = 0;
  int dtype = kFloat32;
  bool channels_last = false;
  int64_t image_elems() const { return C * H * W; }
};

struct MaskSource {
  const uint8_t* given = nullptr;  // masks to use, or nullptr to generate them from `spec`
  uint8_t* out = nullptr;          // generated masks are written here (required when generating)
  int n = 1;                       // 1 or N
  int grid = 0;                    // g of the given or generated masks
  MaskSpec spec{};                 // used when given == nullptr
};

// MixMask: mixed_i = m_i ? x_i : f_i, switch_i = m_i ? f_i : x_i, lam_k = |m_k upsampled| / (H W),
// with f_i = x[perm[i]], or filler_i for the erase baselines.
struct MixArgs {
  ImageGeometry geo;
  const void* x = nullptr;
  int64_t x_batch_stride = 0;  // elements
  const int64_t* perm = nullptr;
  const void* filler = nullptr;
  int64_t filler_batch_stride = 0;
  bool perm_is_flip = false;  // caller guarantees perm[i] == N-1-i (lets CUDA pair images)
  MaskSource masks;
  void* mixed = nullptr;
  void* switch_out = nullptr;  // optional
  float* lam = nullptr;        // [masks.n]
  int num_threads = 1;         // CPU only
};

// Un-Mix with the flip partner: mixup out_i = lam*x_i + mu*x_{N-1-i} (mu = float32(1-lam),
// each product rounded to float32, then the sum, then once to dtype), or CutMix: x_{N-1-i}
// inside rows [y1, y2) x columns [x1, x2), x_i elsewhere.
struct UnmixArgs {
  ImageGeometry geo;
  const void* x = nullptr;
  int64_t x_batch_stride = 0;
  bool mixup = true;
  float lam = 0.5f, mu = 0.5f;
  int y1 = 0, y2 = 0, x1 = 0, x2 = 0;
  void* out = nullptr;
  int num_threads = 1;
};

// MixMask (permutation perm) and Un-Mix (flip) from one pass over x.
struct MixUnmixArgs {
  MixArgs mix;      // mix.filler must be null
  UnmixArgs unmix;  // unmix.geo / x / x_batch_stride / num_threads are taken from mix (checked() below)
};

// ---------------------------------------------------------------------------------------
// API layer: `op` is the entry point named in error messages (mixfast/check.h).
// ---------------------------------------------------------------------------------------

inline void check_geometry(const char* op, const ImageGeometry& g) {
  MIXFAST_CHECK(g.N >= 1 && g.C >= 1 && g.H >= 1 && g.W >= 1, op,
                "image batch must have N, C, H, W >= 1, got [" + std::to_string(g.N) + ", " + std::to_string(g.C) +
                    ", " + std::to_string(g.H) + ", " + std::to_string(g.W) + "]");
  check_dtype(op, g.dtype);
  MIXFAST_CHECK(g.H <= (1 << 24) && g.W <= (1 << 24), op, "H and W must be below 2^24 (float32 pixel indices)");
}

inline void check_spec(const char* op, const MaskSpec& s) {
  MIXFAST_CHECK_RANGE(op, s.grid, 2, kMaxGrid);
  MIXFAST_CHECK(s.kind == kBlock || s.kind == kDiscrete, op, "mask kind must be 0 (block) or 1 (discrete)");
  if (s.kind == kBlock) {
    MIXFAST_CHECK_RANGE(op, s.num, 1, s.grid * s.grid - 1);
    MIXFAST_CHECK_RANGE(op, s.min_patches, 1, 4);
  } else {
    MIXFAST_CHECK_RANGE(op, s.threshold24, 1, int64_t{1} << 24);
  }
}

inline void check_masks(const char* op, const MaskSource& m, int64_t N) {
  MIXFAST_CHECK(m.n == 1 || m.n == N, op,
                "n_masks must be 1 or N=" + std::to_string(N) + ", got " + std::to_string(m.n));
  if (m.given == nullptr) {
    check_spec(op, m.spec);
    MIXFAST_CHECK(m.out != nullptr, op, "generated masks need an output buffer (out)");
    MIXFAST_CHECK(m.grid == m.spec.grid, op, "mask grid and spec grid differ");
  } else {
    MIXFAST_CHECK_RANGE(op, m.grid, 2, kMaxGrid);
  }
}

inline void check_mix(const char* op, const MixArgs& a) {
  check_geometry(op, a.geo);
  check_masks(op, a.masks, a.geo.N);
  MIXFAST_CHECK_NOT_NULL(op, a.x);
  MIXFAST_CHECK_NOT_NULL(op, a.mixed);
  MIXFAST_CHECK_NOT_NULL(op, a.lam);
  MIXFAST_CHECK((a.perm == nullptr) != (a.filler == nullptr), op, "exactly one of perm and filler must be given");
  MIXFAST_CHECK(a.filler == nullptr || a.switch_out == nullptr, op, "a filler has no switch image (switch_out)");
  MIXFAST_CHECK(!a.perm_is_flip || a.perm != nullptr, op, "perm_is_flip needs perm");
  MIXFAST_CHECK(a.num_threads >= 1, op, "num_threads must be >= 1");
}

inline void check_unmix(const char* op, const UnmixArgs& a) {
  check_geometry(op, a.geo);
  MIXFAST_CHECK_NOT_NULL(op, a.x);
  MIXFAST_CHECK_NOT_NULL(op, a.out);
  MIXFAST_CHECK(a.mixup || (0 <= a.y1 && a.y1 <= a.y2 && a.y2 <= a.geo.H && 0 <= a.x1 && a.x1 <= a.x2 &&
                            a.x2 <= a.geo.W),
                op, "box must satisfy 0 <= y1 <= y2 <= H and 0 <= x1 <= x2 <= W");
  MIXFAST_CHECK(a.num_threads >= 1, op, "num_threads must be >= 1");
}

inline void check_make_masks(const char* op, const MaskSpec& spec, int n, const uint8_t* out) {
  check_spec(op, spec);
  MIXFAST_CHECK(n >= 1, op, "n must be >= 1, got " + std::to_string(n));
  MIXFAST_CHECK_NOT_NULL(op, out);
}

// What the kernels get: the arguments once checked. They run no checks of their own.
inline const MixArgs& checked(const char* op, const MixArgs& a) {
  check_mix(op, a);
  return a;
}

inline const UnmixArgs& checked(const char* op, const UnmixArgs& a) {
  check_unmix(op, a);
  return a;
}

// Un-Mix reads the same batch as MixMask: its geometry, input, batch stride and threads are
// taken from `mix` here, once for both backends, and the kernels rely on it.
inline MixUnmixArgs checked(const char* op, const MixUnmixArgs& a) {
  MixUnmixArgs c = a;
  c.unmix.geo = a.mix.geo;
  c.unmix.x = a.mix.x;
  c.unmix.x_batch_stride = a.mix.x_batch_stride;
  c.unmix.num_threads = a.mix.num_threads;
  check_mix(op, c.mix);
  MIXFAST_CHECK(c.mix.filler == nullptr, op, "no filler in mix_and_unmix (Un-Mix needs the images)");
  check_unmix(op, c.unmix);
  return c;
}

// λ of one mask: the fraction of the H x W upsampled pixels that are 1, as float32 of the
// double quotient (the reference's `(count.double() / (H*W)).float()`).
inline float lambda_from_count(int64_t count, int64_t H, int64_t W) {
  return static_cast<float>(static_cast<double>(count) / static_cast<double>(H * W));
}

namespace cpu {
void make_masks(const MaskSpec& spec, int n, uint8_t* out, int num_threads);
void mix(const MixArgs& a);
void unmix(const UnmixArgs& a);
void mix_and_unmix(const MixUnmixArgs& a);
}  // namespace cpu

namespace cuda {
// `stream` is a cudaStream_t passed as an integer handle (torch's current stream).
void make_masks(const MaskSpec& spec, int n, uint8_t* out, uintptr_t stream);
void mix(const MixArgs& a, uintptr_t stream);
void unmix(const UnmixArgs& a, uintptr_t stream);
void mix_and_unmix(const MixUnmixArgs& a, uintptr_t stream);
}  // namespace cuda

}  // namespace mixfast
