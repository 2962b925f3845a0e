// Fused soft-InfoNCE: host API of the CUDA kernels in csrc/cuda/infonce.cu.
//
// The kernels implement the two primitives of mixfast/ops/infonce_chunked.py over one column block `cols`
// (the MoCo queue, or the keys) with s_rj = scale * q_r . cols_j:
//
//   lse_partials:        per (column split, row): the running max and sum of an online logsumexp over the
//                        split's columns, skipping exclude[r]. Python combines the splits in a fixed order:
//                        lse_r = logsumexp_s(part_max[s, r] + log(part_sum[s, r])).
//   grad_q_partials:     per (column split, row): scale * sum_j coef_rj cols_j
//   grad_cols_partials:  per (row split, column): scale * sum_r coef_rj q_r
//                        with coef_rj = [in_denom] gl_r exp(s_rj - lse_r) + sum_p gs_rp [pos_rp == j];
//                        Python sums the partials over splits (no atomics: results are reproducible).
//
// Plain C++ (no CUDA or torch headers) so the binding compiles without a CUDA toolkit. Pointers are device
// pointers; matrices are row-major with unit column stride; every float buffer is fp32.
#pragma once

#include <cstdint>

#include "mixfast/common.h"

namespace mixfast {
namespace infonce {

constexpr int64_t kMaxDim = 256;  // the kernels hold a [block, D] tile of q and of cols in shared memory

struct Problem {
  const void* q;           // [m, d], dtype
  int64_t q_stride;        // elements between rows, >= d
  const void* cols;        // [n, d], dtype
  int64_t cols_stride;
  const int64_t* exclude;  // [m]: column skipped in row r's softmax (-1: none); nullptr: none at all
  int64_t m, n, d;
  float scale;             // 1 / tau
  int dtype;               // mixfast::DType of q and cols
  uintptr_t stream;        // cudaStream_t
};

struct GradTerms {
  const float* lse;        // [m] natural-log logsumexp from the forward; used when in_denom
  const float* gl;         // [m] dF/dlse; used when in_denom
  const int64_t* pos;      // [m, p] positive column per (row, slot); nullptr: no positives in this block
  const float* gs;         // [m, p] dF/ds at the positives
  int64_t p;
  bool in_denom;           // whether the block's columns are in the softmax denominator
};

// Rows (= columns) per thread block for head dimension d; split lengths are multiples of it. Shared with the
// kernels' tile configuration so the two cannot disagree.
constexpr int block_size(int64_t d) { return d <= 128 ? 64 : 32; }

// part_max, part_sum: [splits, m]. Split s covers columns [s * per_split, (s + 1) * per_split).
void lse_partials(const Problem& p, float* part_max, float* part_sum, int splits, int64_t per_split);
// out: [splits, m, d]. Split s covers columns [s * per_split, ...).
void grad_q_partials(const Problem& p, const GradTerms& g, float* out, int splits, int64_t per_split);
// out: [splits, n, d]. Split s covers rows [s * per_split, ...).
void grad_cols_partials(const Problem& p, const GradTerms& g, float* out, int splits, int64_t per_split);

}  // namespace infonce
}  // namespace mixfast
