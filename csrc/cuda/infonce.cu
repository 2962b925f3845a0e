// Fused soft-InfoNCE CUDA kernels: flash-style column streaming with an online logsumexp, split over columns.
//
// API and math: csrc/include/mixfast/infonce.h. Three kernels, each a grid of (block, split) programs:
//
//   lse_partials_kernel   row block x column split: the row block's q tile stays in shared memory while the
//                         split's column tiles stream through; a warp per row keeps the running max / sum.
//   grad_q_kernel         row block x column split: recomputes each logits tile from the saved lse, turns it
//                         into the coefficient tile, accumulates coef . cols into dq.
//   grad_cols_kernel      column block x row split: the same coefficient tiles, accumulating coef^T . q.
//
// Nothing of size m x n is written to global memory; partial results per split are summed by the caller in a
// fixed order (no atomics). Accumulation is fp32. 16-bit inputs use tensor cores through WMMA (m16n16k16, fp32
// accumulators; the coefficient tile is rounded to the input dtype for the second product, as flash-attention
// does); fp32 inputs use fp32 FMAs (no TF32). The temperature and log2(e) are applied to the fp32 dot product in
// the one FMA that feeds exp2 -- scaling a 16-bit q by 1/tau first would round it a second time.
//
// Tiles: 256 threads; BM = BN = 64 rows/columns for head dims up to 128, 32 up to 256; D is padded to
// DP in {32, 64, 128, 256} with zeros in shared memory.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <atomic>
#include <cstddef>
#include <string>
#include <type_traits>

#include "mixfast/check.h"
#include "mixfast/cuda_utils.h"
#include "mixfast/infonce.h"

namespace mixfast {
namespace infonce {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }

constexpr size_t round128(size_t bytes) { return (bytes + 127) / 128 * 128; }
constexpr size_t max_size(size_t a, size_t b) { return a > b ? a : b; }

// Tile geometry and the shared-memory layout for input type T and padded head dim DP.
template <typename T, int DP>
struct Cfg {
  static constexpr bool kMma = !std::is_same<T, float>::value;
  static constexpr int BM = block_size(DP);       // rows of q per tile
  static constexpr int BN = BM;                   // columns per tile
  // Row pitches (elements). SIMT reads walk a column of the tile, so the pitch is one 4-byte word off a multiple
  // of 32 banks; WMMA needs 16-byte multiples and 32-byte aligned fragment pointers, hence +8.
  static constexpr int LD = kMma ? DP + 8 : DP + 4 / static_cast<int>(sizeof(T));
  static constexpr int LDS = BN + 4;  // fp32 logits / coefficients
  static constexpr int LDK = BN + 8;  // 16-bit coefficients (MMA)
  static constexpr int LDA = DP + 4;  // fp32 staging of MMA accumulators
  static constexpr int FRAGS = (BM / 16) * (DP / 16) / kWarps;  // MMA: accumulator fragments per warp
  static_assert(FRAGS >= 1 && (BM / 16) * (DP / 16) % kWarps == 0, "accumulator tiles must split over warps");

  static constexpr size_t kQ = round128(size_t(BM) * LD * sizeof(T));
  static constexpr size_t kC = round128(size_t(BN) * LD * sizeof(T));
  static constexpr size_t kTiles = max_size(kQ + kC, round128(size_t(BM) * LDA * sizeof(float)));  // + staging
  static constexpr size_t kS = round128(size_t(BM) * LDS * sizeof(float));
  static constexpr size_t kCoef = kMma ? round128(size_t(BM) * LDK * sizeof(T)) : 0;
  static constexpr size_t kRows = round128(size_t(BM) * (2 * sizeof(float) + sizeof(int64_t)));
  static constexpr size_t kSmem = kTiles + kS + kCoef + kRows;
};

template <typename T, int DP>
struct Smem {
  using C = Cfg<T, DP>;
  T* q;
  T* cols;
  float* stage;  // overlaps q and cols: used only after the main loop
  float* s;
  T* coef;
  float* lse2;   // per row of the current q tile: lse in base 2
  float* gl;
  int64_t* excl;

  __device__ explicit Smem(unsigned char* base) {
    q = reinterpret_cast<T*>(base);
    cols = reinterpret_cast<T*>(base + C::kQ);
    stage = reinterpret_cast<float*>(base);
    s = reinterpret_cast<float*>(base + C::kTiles);
    coef = reinterpret_cast<T*>(base + C::kTiles + C::kS);
    lse2 = reinterpret_cast<float*>(base + C::kTiles + C::kS + C::kCoef);
    gl = lse2 + C::BM;
    excl = reinterpret_cast<int64_t*>(gl + C::BM);
  }
};

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// dst[r][k] = src[row0 + r][k] for rows below `limit` and k < d, zero elsewhere (ROWS x DP, pitch LD).
template <typename T, int DP, int ROWS>
__device__ void load_tile(T* dst, const T* src, int64_t stride, int64_t row0, int64_t limit, int64_t d) {
  constexpr int LD = Cfg<T, DP>::LD;
  for (int idx = threadIdx.x; idx < ROWS * DP; idx += kThreads) {
    const int r = idx / DP, k = idx % DP;
    const int64_t g = row0 + r;
    dst[r * LD + k] = (g < limit && k < d) ? src[g * stride + k] : from_float<T>(0.f);
  }
}

// Per-row data of the q tile starting at row0: lse in base 2, dF/dlse and the excluded column.
template <typename T, int DP>
__device__ void load_rows(Smem<T, DP>& sm, const Problem& p, const GradTerms& g, int64_t row0, int64_t limit) {
  for (int r = threadIdx.x; r < Cfg<T, DP>::BM; r += kThreads) {
    const int64_t row = row0 + r;
    const bool ok = row < limit;
    sm.lse2[r] = (ok && g.in_denom) ? g.lse[row] * kLog2e : 0.f;
    sm.gl[r] = (ok && g.in_denom) ? g.gl[row] : 0.f;
    sm.excl[r] = (ok && p.exclude != nullptr) ? p.exclude[row] : -1;
  }
}

// s = q . cols^T (raw fp32 dot products), BM x BN.
template <typename T, int DP>
__device__ void tile_logits(const T* sq, const T* sc, float* ss) {
  using C = Cfg<T, DP>;
  if constexpr (C::kMma) {
    using namespace nvcuda;
    constexpr int tiles_n = C::BN / 16, tiles = (C::BM / 16) * tiles_n;
    for (int t = threadIdx.x / 32; t < tiles; t += kWarps) {
      const int tm = t / tiles_n, tn = t % tiles_n;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int k = 0; k < DP; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // cols^T: (k, n) at cols[n][k]
        wmma::load_matrix_sync(a, sq + tm * 16 * C::LD + k, C::LD);
        wmma::load_matrix_sync(b, sc + tn * 16 * C::LD + k, C::LD);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(ss + tm * 16 * C::LDS + tn * 16, acc, C::LDS, wmma::mem_row_major);
    }
  } else {  // fp32: threads form a 16 x 16 grid, each computing RM rows x CN (strided) columns
    constexpr int RM = C::BM / 16, CN = C::BN / 16;
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    float acc[RM][CN] = {};
    for (int k = 0; k < DP; ++k) {
      float a[RM], b[CN];
#pragma unroll
      for (int i = 0; i < RM; ++i) a[i] = sq[(ty * RM + i) * C::LD + k];
#pragma unroll
      for (int j = 0; j < CN; ++j) b[j] = sc[(tx + 16 * j) * C::LD + k];
#pragma unroll
      for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int j = 0; j < CN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int j = 0; j < CN; ++j) ss[(ty * RM + i) * C::LDS + tx + 16 * j] = acc[i][j];
  }
}

// The coefficient tile dF/ds for rows [row0, row_end) x columns [col0, col_end): written over the logits (SIMT)
// or, rounded to T, into sm.coef (MMA). Needs the logits in sm.s when g.in_denom.
template <typename T, int DP>
__device__ void tile_coef(Smem<T, DP>& sm, const GradTerms& g, int64_t row0, int64_t row_end, int64_t col0,
                          int64_t col_end, float scale_log2) {
  using C = Cfg<T, DP>;
  for (int idx = threadIdx.x; idx < C::BM * C::BN; idx += kThreads) {
    const int r = idx / C::BN, c = idx % C::BN;
    const int64_t row = row0 + r, col = col0 + c;
    float coef = 0.f;
    if (row < row_end && col < col_end) {
      if (g.in_denom && col != sm.excl[r])
        coef = exp2f(fmaf(sm.s[r * C::LDS + c], scale_log2, -sm.lse2[r])) * sm.gl[r];
      if (g.pos != nullptr)
        for (int64_t k = 0; k < g.p; ++k)
          if (g.pos[row * g.p + k] == col) coef += g.gs[row * g.p + k];
    }
    if constexpr (C::kMma)
      sm.coef[r * C::LDK + c] = from_float<T>(coef);
    else
      sm.s[r * C::LDS + c] = coef;
  }
}

// Accumulators: SIMT keeps rows x head dims in registers per thread; MMA keeps 16 x 16 fragments per warp.
template <typename T, int DP, bool MMA = Cfg<T, DP>::kMma>
struct Acc;

template <typename T, int DP>
struct Acc<T, DP, false> {  // fp32 (T = float): threads form a 16 x 16 grid, RM rows x CD (strided) dims each
  using C = Cfg<T, DP>;
  static constexpr int RM = C::BM / 16;  // == BN / 16: the column accumulator has the same shape
  static constexpr int CD = DP / 16;
  float v[RM][CD] = {};

  // rows of q: v += coef . cols
  __device__ void add_coef_cols(const Smem<T, DP>& sm) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    for (int n = 0; n < C::BN; ++n) {
      float a[RM], b[CD];
#pragma unroll
      for (int i = 0; i < RM; ++i) a[i] = sm.s[(ty * RM + i) * C::LDS + n];
#pragma unroll
      for (int j = 0; j < CD; ++j) b[j] = sm.cols[n * C::LD + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int j = 0; j < CD; ++j) v[i][j] = fmaf(a[i], b[j], v[i][j]);
    }
  }

  // columns: v += coef^T . q
  __device__ void add_coefT_q(const Smem<T, DP>& sm) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    for (int m = 0; m < C::BM; ++m) {
      float a[RM], b[CD];
#pragma unroll
      for (int i = 0; i < RM; ++i) a[i] = sm.s[m * C::LDS + ty * RM + i];
#pragma unroll
      for (int j = 0; j < CD; ++j) b[j] = sm.q[m * C::LD + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int j = 0; j < CD; ++j) v[i][j] = fmaf(a[i], b[j], v[i][j]);
    }
  }

  // out[row0 + r][k] = scale * v for rows below limit and k < d.
  __device__ void store(Smem<T, DP>&, float* out, int64_t row0, int64_t limit, int64_t d, float scale) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < RM; ++i) {
      const int64_t row = row0 + ty * RM + i;
#pragma unroll
      for (int j = 0; j < CD; ++j) {
        const int k = tx + 16 * j;
        if (row < limit && k < d) out[row * d + k] = v[i][j] * scale;
      }
    }
  }
};

template <typename T, int DP>
struct Acc<T, DP, true> {
  using C = Cfg<T, DP>;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> f[C::FRAGS];

  __device__ Acc() {
#pragma unroll
    for (int u = 0; u < C::FRAGS; ++u) nvcuda::wmma::fill_fragment(f[u], 0.f);
  }

  __device__ void add_coef_cols(const Smem<T, DP>& sm) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int u = 0; u < C::FRAGS; ++u) {
      const int t = warp * C::FRAGS + u, fm = t / (DP / 16), fd = t % (DP / 16);
#pragma unroll
      for (int k = 0; k < C::BN; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, sm.coef + fm * 16 * C::LDK + k, C::LDK);
        wmma::load_matrix_sync(b, sm.cols + k * C::LD + fd * 16, C::LD);
        wmma::mma_sync(f[u], a, b, f[u]);
      }
    }
  }

  __device__ void add_coefT_q(const Smem<T, DP>& sm) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int u = 0; u < C::FRAGS; ++u) {
      const int t = warp * C::FRAGS + u, fn = t / (DP / 16), fd = t % (DP / 16);
#pragma unroll
      for (int k = 0; k < C::BM; k += 16) {
        // coef^T as a column-major matrix_a: element (n, m) sits at coef[m][n].
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, sm.coef + k * C::LDK + fn * 16, C::LDK);
        wmma::load_matrix_sync(b, sm.q + k * C::LD + fd * 16, C::LD);
        wmma::mma_sync(f[u], a, b, f[u]);
      }
    }
  }

  // Through shared memory (fragments have no documented element layout); the caller synchronized after its last
  // use of the q / cols tiles, which the staging area overlaps.
  __device__ void store(Smem<T, DP>& sm, float* out, int64_t row0, int64_t limit, int64_t d, float scale) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int u = 0; u < C::FRAGS; ++u) {
      const int t = warp * C::FRAGS + u, fm = t / (DP / 16), fd = t % (DP / 16);
      wmma::store_matrix_sync(sm.stage + fm * 16 * C::LDA + fd * 16, f[u], C::LDA, wmma::mem_row_major);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < C::BM * DP; idx += kThreads) {
      const int r = idx / DP, k = idx % DP;
      const int64_t row = row0 + r;
      if (row < limit && k < d) out[row * d + k] = sm.stage[r * C::LDA + k] * scale;
    }
  }
};

// ---------------------------------------------------------------------------------------------------------------
// kernels
// ---------------------------------------------------------------------------------------------------------------

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) lse_partials_kernel(Problem p, float* part_max, float* part_sum,
                                                                 int64_t per_split) {
  using C = Cfg<T, DP>;
  extern __shared__ __align__(128) unsigned char smem[];
  Smem<T, DP> sm(smem);
  const int64_t row0 = int64_t(blockIdx.x) * C::BM;
  const int64_t start = int64_t(blockIdx.y) * per_split;
  const int64_t end = min(start + per_split, p.n);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float scale_log2 = p.scale * kLog2e;

  load_tile<T, DP, C::BM>(sm.q, static_cast<const T*>(p.q), p.q_stride, row0, p.m, p.d);
  for (int r = threadIdx.x; r < C::BM; r += kThreads) {
    const int64_t row = row0 + r;
    sm.excl[r] = (row < p.m && p.exclude != nullptr) ? p.exclude[row] : -1;
  }
  // A warp owns rows warp, warp + 8, ...; every lane holds the row's running (max, sum) in base 2.
  constexpr int kRowsPerWarp = C::BM / kWarps;
  float run_max[kRowsPerWarp], run_sum[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) run_max[i] = -INFINITY, run_sum[i] = 0.f;

  for (int64_t c0 = start; c0 < end; c0 += C::BN) {
    load_tile<T, DP, C::BN>(sm.cols, static_cast<const T*>(p.cols), p.cols_stride, c0, end, p.d);
    __syncthreads();
    tile_logits<T, DP>(sm.q, sm.cols, sm.s);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int r = warp + i * kWarps;
      float* srow = sm.s + r * C::LDS;
      float mx = -INFINITY;
      for (int c = lane; c < C::BN; c += 32) {
        const int64_t col = c0 + c;
        const float v = (col < end && col != sm.excl[r]) ? srow[c] * scale_log2 : -INFINITY;
        srow[c] = v;
        mx = fmaxf(mx, v);
      }
      const float m_new = fmaxf(run_max[i], warp_max(mx));
      const float m_safe = m_new == -INFINITY ? 0.f : m_new;  // no valid column yet: the sum stays 0
      float sum = 0.f;
      for (int c = lane; c < C::BN; c += 32) sum += exp2f(srow[c] - m_safe);
      run_sum[i] = run_sum[i] * exp2f(run_max[i] - m_safe) + warp_sum(sum);
      run_max[i] = m_new;
    }
    __syncthreads();  // before the next tile overwrites cols and s
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int64_t row = row0 + warp + i * kWarps;
      if (row < p.m) {
        const int64_t o = int64_t(blockIdx.y) * p.m + row;
        part_max[o] = run_max[i] * kLn2;  // natural-log units for the caller's combine
        part_sum[o] = run_sum[i];
      }
    }
  }
}

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) grad_q_kernel(Problem p, GradTerms g, float* out, int64_t per_split) {
  using C = Cfg<T, DP>;
  extern __shared__ __align__(128) unsigned char smem[];
  Smem<T, DP> sm(smem);
  const int64_t row0 = int64_t(blockIdx.x) * C::BM;
  const int64_t start = int64_t(blockIdx.y) * per_split;
  const int64_t end = min(start + per_split, p.n);
  const float scale_log2 = p.scale * kLog2e;

  load_tile<T, DP, C::BM>(sm.q, static_cast<const T*>(p.q), p.q_stride, row0, p.m, p.d);
  load_rows<T, DP>(sm, p, g, row0, p.m);
  Acc<T, DP> acc;
  for (int64_t c0 = start; c0 < end; c0 += C::BN) {
    load_tile<T, DP, C::BN>(sm.cols, static_cast<const T*>(p.cols), p.cols_stride, c0, end, p.d);
    __syncthreads();
    if (g.in_denom) {
      tile_logits<T, DP>(sm.q, sm.cols, sm.s);
      __syncthreads();
    }
    tile_coef<T, DP>(sm, g, row0, p.m, c0, end, scale_log2);
    __syncthreads();
    acc.add_coef_cols(sm);
    __syncthreads();
  }
  acc.store(sm, out + int64_t(blockIdx.y) * p.m * p.d, row0, p.m, p.d, p.scale);
}

template <typename T, int DP>
__global__ void __launch_bounds__(kThreads) grad_cols_kernel(Problem p, GradTerms g, float* out,
                                                              int64_t per_split) {
  using C = Cfg<T, DP>;
  extern __shared__ __align__(128) unsigned char smem[];
  Smem<T, DP> sm(smem);
  const int64_t col0 = int64_t(blockIdx.x) * C::BN;
  const int64_t start = int64_t(blockIdx.y) * per_split;
  const int64_t end = min(start + per_split, p.m);
  const float scale_log2 = p.scale * kLog2e;

  load_tile<T, DP, C::BN>(sm.cols, static_cast<const T*>(p.cols), p.cols_stride, col0, p.n, p.d);
  Acc<T, DP> acc;
  for (int64_t r0 = start; r0 < end; r0 += C::BM) {
    load_tile<T, DP, C::BM>(sm.q, static_cast<const T*>(p.q), p.q_stride, r0, end, p.d);
    load_rows<T, DP>(sm, p, g, r0, end);
    __syncthreads();
    if (g.in_denom) {
      tile_logits<T, DP>(sm.q, sm.cols, sm.s);
      __syncthreads();
    }
    tile_coef<T, DP>(sm, g, r0, end, col0, p.n, scale_log2);
    __syncthreads();
    acc.add_coefT_q(sm);
    __syncthreads();
  }
  acc.store(sm, out + int64_t(blockIdx.y) * p.n * p.d, col0, p.n, p.d, p.scale);
}

// ---------------------------------------------------------------------------------------------------------------
// launch
// ---------------------------------------------------------------------------------------------------------------

template <typename T>
struct Type {
  using type = T;
};
template <int V>
struct Dim {
  static constexpr int value = V;
};

// Calls f(Type<T>, Dim<DP>) for the input dtype and the smallest padded head dim that holds d.
template <typename F>
void with_kernel_types(int dtype, int64_t d, F&& f) {
  auto by_dim = [&](auto type) {
    if (d <= 32) f(type, Dim<32>{});
    else if (d <= 64) f(type, Dim<64>{});
    else if (d <= 128) f(type, Dim<128>{});
    else f(type, Dim<256>{});
  };
  switch (dtype) {
    case kFloat32: by_dim(Type<float>{}); break;
    case kBFloat16: by_dim(Type<__nv_bfloat16>{}); break;
    case kFloat16: by_dim(Type<__half>{}); break;
    default: fail("soft_infonce", "unknown dtype code " + std::to_string(dtype));  // the binding checked it
  }
}

// Kernels with more than 48 KB of dynamic shared memory must opt in with cudaFuncSetAttribute, a driver call that
// would cost host time on every launch. The opt-in belongs to the kernel on a device and each kernel is launched
// with one size, so it is made once per (kernel, size, device); racing threads merely repeat it.
template <auto Kernel, size_t kSmem>
void opt_in_shared_memory() {
  static std::atomic<bool> done[kMaxDevices];
  const int device = current_device();
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached && done[device].load(std::memory_order_acquire)) return;
  MIXFAST_CUDA_CHECK(
      cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem)));
  if (cached) done[device].store(true, std::memory_order_release);
}

template <auto Kernel, size_t kSmem, typename... Args>
void launch(dim3 grid, uintptr_t stream, Args... args) {
  opt_in_shared_memory<Kernel, kSmem>();
  Kernel<<<grid, kThreads, kSmem, as_stream(stream)>>>(args...);
  MIXFAST_CUDA_CHECK(cudaGetLastError());
}

unsigned grid_dim(int64_t n, int block) { return static_cast<unsigned>((n + block - 1) / block); }

}  // namespace

void lse_partials(const Problem& p, float* part_max, float* part_sum, int splits, int64_t per_split) {
  with_kernel_types(p.dtype, p.d, [&](auto type, auto dim) {
    using T = typename decltype(type)::type;
    constexpr int DP = decltype(dim)::value;
    using C = Cfg<T, DP>;
    launch<lse_partials_kernel<T, DP>, C::kSmem>(dim3(grid_dim(p.m, C::BM), splits), p.stream, p, part_max,
                                                 part_sum, per_split);
  });
}

void grad_q_partials(const Problem& p, const GradTerms& g, float* out, int splits, int64_t per_split) {
  with_kernel_types(p.dtype, p.d, [&](auto type, auto dim) {
    using T = typename decltype(type)::type;
    constexpr int DP = decltype(dim)::value;
    using C = Cfg<T, DP>;
    launch<grad_q_kernel<T, DP>, C::kSmem>(dim3(grid_dim(p.m, C::BM), splits), p.stream, p, g, out, per_split);
  });
}

void grad_cols_partials(const Problem& p, const GradTerms& g, float* out, int splits, int64_t per_split) {
  with_kernel_types(p.dtype, p.d, [&](auto type, auto dim) {
    using T = typename decltype(type)::type;
    constexpr int DP = decltype(dim)::value;
    using C = Cfg<T, DP>;
    launch<grad_cols_kernel<T, DP>, C::kSmem>(dim3(grid_dim(p.n, C::BN), splits), p.stream, p, g, out,
                                              per_split);
  });
}

}  // namespace infonce
}  // namespace mixfast
