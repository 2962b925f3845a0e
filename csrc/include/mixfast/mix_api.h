// Argument structs and entry points of the mix ops, shared by the CPU kernels
// (csrc/cpu/mix_cpu.cpp), the CUDA kernels (csrc/cuda/mix_cuda.cu) and the binding
// (csrc/bind_mix.cpp). check_*() is the API layer: every argument is checked here, on the
// host, before any kernel runs (flash-attention style); Python has already checked the
// tensors themselves (shape, dtype, device, layout) in mixfast/ops/mix.py.
//
// Image batches are [N, C, H, W] with elements of `dtype`, dense within each image in
// NCHW or NHWC (channels_last) order; inputs may have any batch stride, outputs are dense.
// Masks are uint8 [n_masks, g, g] (0/1), n_masks = 1 (one per batch) or N (per sample).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "mixfast/block_mask.h"
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
  UnmixArgs unmix;  // unmix.x / geo are taken from mix
};

inline void fail(const std::string& what) { throw std::invalid_argument("mixfast._C: " + what); }

inline void check_geometry(const ImageGeometry& g) {
  if (g.N < 1 || g.C < 1 || g.H < 1 || g.W < 1)
    fail("image batch must have N, C, H, W >= 1, got [" + std::to_string(g.N) + ", " + std::to_string(g.C) + ", " +
         std::to_string(g.H) + ", " + std::to_string(g.W) + "]");
  if (g.dtype != kFloat32 && g.dtype != kBFloat16 && g.dtype != kFloat16)
    fail("dtype code must be 0 (float32), 1 (bfloat16) or 2 (float16), got " + std::to_string(g.dtype));
  if (g.H > (1 << 24) || g.W > (1 << 24)) fail("H and W must be below 2^24 (float32 pixel indices)");
}

inline void check_spec(const MaskSpec& s) {
  if (s.grid < 2 || s.grid > kMaxGrid) fail("grid must be in [2, 64], got " + std::to_string(s.grid));
  if (s.kind != kBlock && s.kind != kDiscrete) fail("mask kind must be 0 (block) or 1 (discrete)");
  const int cells = s.grid * s.grid;
  if (s.kind == kBlock && (s.num < 1 || s.num > cells - 1))
    fail("block target num must be in [1, g*g-1], got " + std::to_string(s.num));
  if (s.kind == kBlock && (s.min_patches < 1 || s.min_patches > 4))
    fail("block min_patches must be in [1, 4], got " + std::to_string(s.min_patches));
  if (s.kind == kDiscrete && (s.threshold24 < 1 || s.threshold24 > (1u << 24)))
    fail("discrete threshold24 must be in [1, 2^24]");
}

inline void check_masks(const MaskSource& m, int64_t N) {
  if (m.n != 1 && m.n != N) fail("n_masks must be 1 or N=" + std::to_string(N) + ", got " + std::to_string(m.n));
  if (m.given == nullptr) {
    check_spec(m.spec);
    if (m.out == nullptr) fail("generated masks need an output buffer");
    if (m.grid != m.spec.grid) fail("mask grid and spec grid differ");
  } else if (m.grid < 2 || m.grid > kMaxGrid) {
    fail("mask grid must be in [2, 64], got " + std::to_string(m.grid));
  }
}

inline void check_mix(const MixArgs& a) {
  check_geometry(a.geo);
  check_masks(a.masks, a.geo.N);
  if (a.x == nullptr || a.mixed == nullptr || a.lam == nullptr) fail("mix: x, mixed and lam must be non-null");
  if ((a.perm == nullptr) == (a.filler == nullptr)) fail("mix: exactly one of perm and filler must be given");
  if (a.filler != nullptr && a.switch_out != nullptr) fail("mix: a filler has no switch image");
  if (a.perm_is_flip && a.perm == nullptr) fail("mix: perm_is_flip needs perm");
  if (a.num_threads < 1) fail("num_threads must be >= 1");
}

inline void check_unmix(const UnmixArgs& a) {
  check_geometry(a.geo);
  if (a.x == nullptr || a.out == nullptr) fail("unmix: x and out must be non-null");
  if (!a.mixup && !(0 <= a.y1 && a.y1 <= a.y2 && a.y2 <= a.geo.H && 0 <= a.x1 && a.x1 <= a.x2 && a.x2 <= a.geo.W))
    fail("unmix: box must satisfy 0 <= y1 <= y2 <= H and 0 <= x1 <= x2 <= W");
  if (a.num_threads < 1) fail("num_threads must be >= 1");
}

inline void check_mix_unmix(const MixUnmixArgs& a) {
  check_mix(a.mix);
  if (a.mix.filler != nullptr) fail("mix_and_unmix: no filler (Un-Mix needs the images)");
  UnmixArgs u = a.unmix;
  u.geo = a.mix.geo;
  u.x = a.mix.x;
  u.num_threads = a.mix.num_threads;
  check_unmix(u);
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
bool built();
int device_count();  // 0 without a driver or device (never throws)
void make_masks(const MaskSpec& spec, int n, uint8_t* out, uintptr_t stream);
void mix(const MixArgs& a, uintptr_t stream);
void unmix(const UnmixArgs& a, uintptr_t stream);
void mix_and_unmix(const MixUnmixArgs& a, uintptr_t stream);
}  // namespace cuda

}  // namespace mixfast
