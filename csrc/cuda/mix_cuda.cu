// CUDA kernels of the mix ops: plain CUDA C++ on raw pointers and a stream, no ATen.
//
// One launch per op. The MixMask kernel is fused: each CTA draws (or loads) the grid masks
// it needs into shared memory with the host/device-shared generator (block_mask.h), so no
// mask is generated on the host, copied, or upsampled in memory; λ is computed on the
// device (no host sync). Work = (unit, chunk of rows): a unit is an image i with partner j
// -- the flip pair (i, N-1-i) when the caller says perm is the flip, so x_i and x_j are read
// once for the outputs of both. CTAs are persistent (a few per SM) and take contiguous
// ranges of work, so a per-batch mask is drawn once per CTA and a per-sample mask once
// per unit a CTA touches.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "mixfast/block_mask.h"
#include "mixfast/cuda_utils.h"
#include "mixfast/dtype.h"
#include "mixfast/mix_api.h"
#include "mixfast/upsample.h"

namespace mixfast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kCtasPerSm = 4;
constexpr int64_t kChunkElems = 8192;  // target elements per work item and input

template <int DT>
struct BitsOf {
  using type = uint16_t;
};
template <>
struct BitsOf<kFloat32> {
  using type = uint32_t;
};

template <int DT>
__device__ __forceinline__ float to_float(typename BitsOf<DT>::type v) {
  if constexpr (DT == kFloat32) return __uint_as_float(v);
  else return Scalar<DT>::load(v);
}

template <int DT>
__device__ __forceinline__ typename BitsOf<DT>::type from_float(float f) {
  if constexpr (DT == kFloat32) return __float_as_uint(f);
  else return Scalar<DT>::store(f);
}

// V consecutive elements moved as one aligned access (16 bytes when V > 1).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}

// Row geometry (see csrc/cpu/mix_cpu.cpp): a row is W elements of a channel plane (NCHW) or
// the W*C elements of a pixel row (NHWC).
struct Rows {
  int64_t N, H, W, run, rows_per_image, cin, img;
  int64_t rows_per_chunk, chunks;  // work split of one image
  float sy, sx;                    // nearest-upsampling scales g/H, g/W
  int g;
};

Rows make_rows(const ImageGeometry& geo, int g) {
  Rows r;
  r.N = geo.N;
  r.H = geo.H;
  r.W = geo.W;
  r.cin = geo.channels_last ? geo.C : 1;
  r.run = geo.W * r.cin;
  r.rows_per_image = geo.channels_last ? geo.H : geo.C * geo.H;
  r.img = geo.image_elems();
  r.rows_per_chunk = std::max<int64_t>(1, kChunkElems / r.run);
  r.chunks = (r.rows_per_image + r.rows_per_chunk - 1) / r.rows_per_chunk;
  r.g = g;
  r.sy = g > 0 ? nearest_scale(g, static_cast<int>(geo.H)) : 1.f;
  r.sx = g > 0 ? nearest_scale(g, static_cast<int>(geo.W)) : 1.f;
  return r;
}

// Mask bit of element e (offset within the image) of an image with grid rows `rows`.
__device__ __forceinline__ uint32_t mask_bit(const uint64_t* rows, const Rows& R, int64_t row, int64_t col_elem) {
  const int64_t y = row % R.H;
  const int gy = nearest_src(static_cast<int>(y), R.sy, R.g);
  const int gx = nearest_src(static_cast<int>(col_elem / R.cin), R.sx, R.g);
  return static_cast<uint32_t>((rows[gy] >> gx) & 1u);
}

// Put mask k in shared memory: parse the given bytes, or draw it on thread `worker` (the
// generator is sequential by nature and costs a few microseconds once per CTA and unit;
// the two masks of a per-sample pair are drawn by threads of different warps, in parallel).
__device__ void fetch_mask(const MaskSource& src, int k, uint64_t* rows, int worker) {
  const int g = src.grid;
  if (src.given != nullptr) {
    for (int r = threadIdx.x; r < g; r += blockDim.x) {
      const uint8_t* cells = src.given + (static_cast<int64_t>(k) * g + r) * g;
      uint64_t bits = 0;
      for (int c = 0; c < g; ++c) bits |= static_cast<uint64_t>(cells[c] != 0) << c;
      rows[r] = bits;
    }
  } else if (static_cast<int>(threadIdx.x) == worker) {
    generate_mask(src.spec, static_cast<uint32_t>(k), rows);
  }
}

// Write generated mask k (when generating) and its λ. Called by every thread of the CTA.
__device__ void publish_mask(const MaskSource& src, int k, const uint64_t* rows, const Rows& R, float* lam,
                             int* s_rowcnt, int* s_colcnt) {
  const int g = R.g;
  if (src.given == nullptr && src.out != nullptr)
    for (int idx = threadIdx.x; idx < g * g; idx += blockDim.x)
      src.out[static_cast<int64_t>(k) * g * g + idx] = static_cast<uint8_t>((rows[idx / g] >> (idx % g)) & 1u);
  for (int r = threadIdx.x; r < g; r += blockDim.x) s_rowcnt[r] = s_colcnt[r] = 0;
  __syncthreads();
  for (int64_t y = threadIdx.x; y < R.H; y += blockDim.x) atomicAdd(&s_rowcnt[nearest_src(static_cast<int>(y), R.sy, g)], 1);
  for (int64_t x = threadIdx.x; x < R.W; x += blockDim.x) atomicAdd(&s_colcnt[nearest_src(static_cast<int>(x), R.sx, g)], 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    long long count = 0;
    for (int r = 0; r < g; ++r) {
      long long cols = 0;
      for (int c = 0; c < g; ++c) cols += ((rows[r] >> c) & 1u) ? s_colcnt[c] : 0;
      count += cols * s_rowcnt[r];
    }
    lam[k] = static_cast<float>(static_cast<double>(count) / static_cast<double>(R.H * R.W));
  }
  __syncthreads();
}

// Contiguous range of work items of this CTA.
__device__ __forceinline__ void cta_range(int64_t total, int64_t& begin, int64_t& end) {
  const int64_t per = (total + gridDim.x - 1) / gridDim.x;
  begin = static_cast<int64_t>(blockIdx.x) * per;
  end = begin + per < total ? begin + per : total;
}

struct MixKernelArgs {
  MixArgs a;
  Rows R;
  int64_t units;
};

// MixMask. PAIR: unit u is the flip pair (u, N-1-u); else unit u is image u with partner
// perm[u] (or filler[u]).
template <typename T, int V, bool PAIR>
__global__ void __launch_bounds__(kThreads) mix_kernel(const MixKernelArgs args) {
  const MixArgs& a = args.a;
  const Rows& R = args.R;
  __shared__ uint64_t s_rows[2][kMaxGrid];
  __shared__ int s_rowcnt[kMaxGrid], s_colcnt[kMaxGrid];
  const bool per_sample = a.masks.n > 1;
  const T* x = static_cast<const T*>(a.x);
  const T* filler = static_cast<const T*>(a.filler);
  T* mixed = static_cast<T*>(a.mixed);
  T* sw = static_cast<T*>(a.switch_out);

  int64_t begin, end;
  cta_range(args.units * R.chunks, begin, end);
  int64_t loaded = -1;  // unit whose masks are in s_rows (per-batch: any)
  for (int64_t item = begin; item < end; ++item) {
    const int64_t u = item / R.chunks, chunk = item % R.chunks;
    const int64_t i = u;
    const int64_t j = PAIR ? R.N - 1 - u : (filler ? u : a.perm[u]);
    const bool both = PAIR && j != i;
    if (loaded < 0 || (per_sample && loaded != u)) {
      __syncthreads();
      fetch_mask(a.masks, per_sample ? static_cast<int>(i) : 0, s_rows[0], 0);
      if (per_sample && both) fetch_mask(a.masks, static_cast<int>(j), s_rows[1], 32);
      __syncthreads();
      loaded = u;
    }
    if (chunk == 0 && (per_sample || u == 0)) {
      publish_mask(a.masks, per_sample ? static_cast<int>(i) : 0, s_rows[0], R, a.lam, s_rowcnt, s_colcnt);
      if (per_sample && both) publish_mask(a.masks, static_cast<int>(j), s_rows[1], R, a.lam, s_rowcnt, s_colcnt);
    }
    const uint64_t* rows_i = s_rows[0];
    const uint64_t* rows_j = (per_sample && both) ? s_rows[1] : s_rows[0];
    const T* xi = x + i * a.x_batch_stride;
    const T* fj = filler ? filler + i * a.filler_batch_stride : x + j * a.x_batch_stride;
    const int64_t r0 = chunk * R.rows_per_chunk;
    const int64_t r1 = r0 + R.rows_per_chunk < R.rows_per_image ? r0 + R.rows_per_chunk : R.rows_per_image;
    const int64_t packs = (r1 - r0) * R.run / V;
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      const int64_t e = r0 * R.run + p * V;
      const int64_t row = e / R.run, col = e - row * R.run;
      const Pack<T, V> va = load_pack<T, V>(xi + e), vb = load_pack<T, V>(fj + e);
      Pack<T, V> mi, si, mj, sj;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const bool keep_i = mask_bit(rows_i, R, row, col + v);
        mi.v[v] = keep_i ? va.v[v] : vb.v[v];
        si.v[v] = keep_i ? vb.v[v] : va.v[v];
        if (both) {
          const bool keep_j = per_sample ? mask_bit(rows_j, R, row, col + v) : keep_i;
          mj.v[v] = keep_j ? vb.v[v] : va.v[v];
          sj.v[v] = keep_j ? va.v[v] : vb.v[v];
        }
      }
      store_pack<T, V>(mixed + i * R.img + e, mi);
      if (sw) store_pack<T, V>(sw + i * R.img + e, si);
      if (both) {
        store_pack<T, V>(mixed + j * R.img + e, mj);
        if (sw) store_pack<T, V>(sw + j * R.img + e, sj);
      }
    }
  }
}

struct UnmixKernelArgs {
  UnmixArgs u;
  Rows R;
};

// Un-Mix outputs of one pack for the flip pair (i, j) from a = x_i, b = x_j.
template <int DT, int V>
__device__ __forceinline__ void unmix_pack(const UnmixArgs& u, const Rows& R, int64_t row, int64_t col,
                                           const Pack<typename BitsOf<DT>::type, V>& a,
                                           const Pack<typename BitsOf<DT>::type, V>& b,
                                           Pack<typename BitsOf<DT>::type, V>& oi,
                                           Pack<typename BitsOf<DT>::type, V>& oj) {
  const int64_t y = row % R.H;
  const bool row_in = y >= u.y1 && y < u.y2;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    if (u.mixup) {
      const float fa = to_float<DT>(a.v[v]), fb = to_float<DT>(b.v[v]);
      oi.v[v] = from_float<DT>(__fadd_rn(__fmul_rn(u.lam, fa), __fmul_rn(u.mu, fb)));
      oj.v[v] = from_float<DT>(__fadd_rn(__fmul_rn(u.lam, fb), __fmul_rn(u.mu, fa)));
    } else {
      const int64_t px = (col + v) / R.cin;
      const bool in = row_in && px >= u.x1 && px < u.x2;
      oi.v[v] = in ? b.v[v] : a.v[v];
      oj.v[v] = in ? a.v[v] : b.v[v];
    }
  }
}

template <int DT, int V>
__global__ void __launch_bounds__(kThreads) unmix_kernel(const UnmixKernelArgs args) {
  using T = typename BitsOf<DT>::type;
  const UnmixArgs& u = args.u;
  const Rows& R = args.R;
  const T* x = static_cast<const T*>(u.x);
  T* out = static_cast<T*>(u.out);
  int64_t begin, end;
  cta_range(((R.N + 1) / 2) * R.chunks, begin, end);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t i = item / R.chunks, chunk = item % R.chunks, j = R.N - 1 - i;
    const T* xi = x + i * u.x_batch_stride;
    const T* xj = x + j * u.x_batch_stride;
    const int64_t r0 = chunk * R.rows_per_chunk;
    const int64_t r1 = r0 + R.rows_per_chunk < R.rows_per_image ? r0 + R.rows_per_chunk : R.rows_per_image;
    const int64_t packs = (r1 - r0) * R.run / V;
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      const int64_t e = r0 * R.run + p * V;
      const int64_t row = e / R.run, col = e - row * R.run;
      Pack<T, V> oi, oj;
      unmix_pack<DT, V>(u, R, row, col, load_pack<T, V>(xi + e), load_pack<T, V>(xj + e), oi, oj);
      store_pack<T, V>(out + i * R.img + e, oi);
      if (j != i) store_pack<T, V>(out + j * R.img + e, oj);
    }
  }
}

struct MixUnmixKernelArgs {
  MixArgs a;
  UnmixArgs u;
  Rows R;
};

// MixMask (perm) + Un-Mix (flip) over flip pairs: x_i, x_j read once for both families.
template <int DT, int V>
__global__ void __launch_bounds__(kThreads) mix_unmix_kernel(const MixUnmixKernelArgs args) {
  using T = typename BitsOf<DT>::type;
  const MixArgs& a = args.a;
  const UnmixArgs& u = args.u;
  const Rows& R = args.R;
  __shared__ uint64_t s_rows[2][kMaxGrid];
  __shared__ int s_rowcnt[kMaxGrid], s_colcnt[kMaxGrid];
  const bool per_sample = a.masks.n > 1;
  const T* x = static_cast<const T*>(a.x);
  T* mixed = static_cast<T*>(a.mixed);
  T* sw = static_cast<T*>(a.switch_out);
  T* um = static_cast<T*>(u.out);

  int64_t begin, end;
  cta_range(((R.N + 1) / 2) * R.chunks, begin, end);
  int64_t loaded = -1;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t i = item / R.chunks, chunk = item % R.chunks, j = R.N - 1 - i;
    const bool both = j != i;
    if (loaded < 0 || (per_sample && loaded != i)) {
      __syncthreads();
      fetch_mask(a.masks, per_sample ? static_cast<int>(i) : 0, s_rows[0], 0);
      if (per_sample && both) fetch_mask(a.masks, static_cast<int>(j), s_rows[1], 32);
      __syncthreads();
      loaded = i;
    }
    if (chunk == 0 && (per_sample || i == 0)) {
      publish_mask(a.masks, per_sample ? static_cast<int>(i) : 0, s_rows[0], R, a.lam, s_rowcnt, s_colcnt);
      if (per_sample && both) publish_mask(a.masks, static_cast<int>(j), s_rows[1], R, a.lam, s_rowcnt, s_colcnt);
    }
    const uint64_t* rows_j = (per_sample && both) ? s_rows[1] : s_rows[0];
    const T* xi = x + i * a.x_batch_stride;
    const T* xj = x + j * a.x_batch_stride;
    const T* pi = x + a.perm[i] * a.x_batch_stride;
    const T* pj = x + a.perm[j] * a.x_batch_stride;
    const int64_t r0 = chunk * R.rows_per_chunk;
    const int64_t r1 = r0 + R.rows_per_chunk < R.rows_per_image ? r0 + R.rows_per_chunk : R.rows_per_image;
    const int64_t packs = (r1 - r0) * R.run / V;
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      const int64_t e = r0 * R.run + p * V;
      const int64_t row = e / R.run, col = e - row * R.run;
      const Pack<T, V> va = load_pack<T, V>(xi + e), vb = load_pack<T, V>(xj + e);
      Pack<T, V> ui, uj;
      unmix_pack<DT, V>(u, R, row, col, va, vb, ui, uj);
      store_pack<T, V>(um + i * R.img + e, ui);
      if (both) store_pack<T, V>(um + j * R.img + e, uj);
      for (int side = 0; side < (both ? 2 : 1); ++side) {
        const Pack<T, V> own = side ? vb : va;
        const Pack<T, V> fill = load_pack<T, V>((side ? pj : pi) + e);
        const uint64_t* rows = side ? rows_j : s_rows[0];
        Pack<T, V> mo, so;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const bool keep = mask_bit(rows, R, row, col + v);
          mo.v[v] = keep ? own.v[v] : fill.v[v];
          so.v[v] = keep ? fill.v[v] : own.v[v];
        }
        const int64_t k = side ? j : i;
        store_pack<T, V>(mixed + k * R.img + e, mo);
        if (sw) store_pack<T, V>(sw + k * R.img + e, so);
      }
    }
  }
}

__global__ void make_masks_kernel(const MaskSpec spec, int n, uint8_t* out) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= n) return;
  uint64_t rows[kMaxGrid];
  generate_mask(spec, static_cast<uint32_t>(k), rows);
  const int g = spec.grid;
  for (int idx = 0; idx < g * g; ++idx)
    out[static_cast<int64_t>(k) * g * g + idx] = static_cast<uint8_t>((rows[idx / g] >> (idx % g)) & 1u);
}

// ---------------------------------------------------------------------------------------
// launchers
// ---------------------------------------------------------------------------------------

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// 16-byte packs need every base address and row start 16-byte aligned.
bool can_vectorize(const Rows& R, int elem_size, std::initializer_list<const void*> ptrs,
                   std::initializer_list<int64_t> batch_strides) {
  const int V = 16 / elem_size;
  if (R.run % V != 0 || (R.img * elem_size) % 16 != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return false;
  for (int64_t s : batch_strides)
    if ((s * elem_size) % 16 != 0) return false;
  return true;
}

int grid_for(int64_t items) {
  const int64_t cap = static_cast<int64_t>(current_sm_count()) * kCtasPerSm;
  return static_cast<int>(std::max<int64_t>(1, std::min(items, cap)));
}

template <typename T, int V>
void launch_mix_typed(const MixKernelArgs& k, bool pair, cudaStream_t s) {
  const int grid = grid_for(k.units * k.R.chunks);
  if (pair) mix_kernel<T, V, true><<<grid, kThreads, 0, s>>>(k);
  else mix_kernel<T, V, false><<<grid, kThreads, 0, s>>>(k);
}

template <int DT>
void launch_unmix_typed(const UnmixKernelArgs& k, bool vec, cudaStream_t s) {
  constexpr int V = DT == kFloat32 ? 4 : 8;
  const int grid = grid_for(((k.R.N + 1) / 2) * k.R.chunks);
  if (vec) unmix_kernel<DT, V><<<grid, kThreads, 0, s>>>(k);
  else unmix_kernel<DT, 1><<<grid, kThreads, 0, s>>>(k);
}

template <int DT>
void launch_mix_unmix_typed(const MixUnmixKernelArgs& k, bool vec, cudaStream_t s) {
  constexpr int V = DT == kFloat32 ? 4 : 8;
  const int grid = grid_for(((k.R.N + 1) / 2) * k.R.chunks);
  if (vec) mix_unmix_kernel<DT, V><<<grid, kThreads, 0, s>>>(k);
  else mix_unmix_kernel<DT, 1><<<grid, kThreads, 0, s>>>(k);
}

}  // namespace

void make_masks(const MaskSpec& spec, int n, uint8_t* out, uintptr_t stream) {
  const int threads = 64;
  make_masks_kernel<<<(n + threads - 1) / threads, threads, 0, as_stream(stream)>>>(spec, n, out);
  MIXFAST_CUDA_CHECK(cudaGetLastError());
}

void mix(const MixArgs& a, uintptr_t stream) {
  MixKernelArgs k{a, make_rows(a.geo, a.masks.grid), 0};
  // Pairing needs the flip (known from the caller: the device perm is never read on the host).
  const bool pair = a.perm_is_flip && a.filler == nullptr;
  k.units = pair ? (a.geo.N + 1) / 2 : a.geo.N;
  const int es = dtype_size(a.geo.dtype);
  const bool vec = can_vectorize(k.R, es, {a.x, a.filler, a.mixed, a.switch_out}, {a.x_batch_stride, a.filler_batch_stride});
  const cudaStream_t s = as_stream(stream);
  if (es == 4) vec ? launch_mix_typed<uint32_t, 4>(k, pair, s) : launch_mix_typed<uint32_t, 1>(k, pair, s);
  else vec ? launch_mix_typed<uint16_t, 8>(k, pair, s) : launch_mix_typed<uint16_t, 1>(k, pair, s);
  MIXFAST_CUDA_CHECK(cudaGetLastError());
}

void unmix(const UnmixArgs& u, uintptr_t stream) {
  UnmixKernelArgs k{u, make_rows(u.geo, 0)};
  const bool vec = can_vectorize(k.R, dtype_size(u.geo.dtype), {u.x, u.out}, {u.x_batch_stride});
  const cudaStream_t s = as_stream(stream);
  switch (u.geo.dtype) {
    case kFloat32: launch_unmix_typed<kFloat32>(k, vec, s); break;
    case kBFloat16: launch_unmix_typed<kBFloat16>(k, vec, s); break;
    default: launch_unmix_typed<kFloat16>(k, vec, s); break;
  }
  MIXFAST_CUDA_CHECK(cudaGetLastError());
}

// The Un-Mix half already reads mix's input (the API layer's checked()).
void mix_and_unmix(const MixUnmixArgs& args, uintptr_t stream) {
  MixUnmixKernelArgs k{args.mix, args.unmix, make_rows(args.mix.geo, args.mix.masks.grid)};
  const bool vec = can_vectorize(k.R, dtype_size(k.a.geo.dtype), {k.a.x, k.a.mixed, k.a.switch_out, k.u.out},
                                 {k.a.x_batch_stride});
  const cudaStream_t s = as_stream(stream);
  switch (k.a.geo.dtype) {
    case kFloat32: launch_mix_unmix_typed<kFloat32>(k, vec, s); break;
    case kBFloat16: launch_mix_unmix_typed<kBFloat16>(k, vec, s); break;
    default: launch_mix_unmix_typed<kFloat16>(k, vec, s); break;
  }
  MIXFAST_CUDA_CHECK(cudaGetLastError());
}

}  // namespace cuda
}  // namespace mixfast
