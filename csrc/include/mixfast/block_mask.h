// MixMask grid masks (MixMask paper, Vishniakov et al.: a g x g binary grid, 1 = keep the
// image, 0 = take the filler) as a pure function of (key, sample): the BEiT block generator
// and the i.i.d. "discrete" generator, shared by the CPU and CUDA kernels and mirrored step
// by step in kernels/mix.py (Triton) and mixfast/ops/reference.py.
//
// Randomness: Philox4x32-10 keyed by the (seed, step) key, counter (draw, sample, kind, 0).
// One draw gives four words. A block attempt uses one draw: word x -> area, y -> aspect,
// z -> top, w -> left. The discrete generator fills cells 4q..4q+3 from draw
// (round * ceil(g*g/4) + q). Draw indices run on across redraws of a rejected mask.
//
// A mask is stored as one uint64 per grid row: bit c of rows[r] is cell (r, c).
#pragma once

#include "mixfast/common.h"
#include "mixfast/fp32.h"
#include "mixfast/philox.h"

namespace mixfast {

// Everything a backend needs to draw masks; computed once in Python
// (mixfast/ops/reference.py: mask_spec) so every backend gets the same integers.
struct MaskSpec {
  int grid;              // g in [2, 64]
  int kind;              // kBlock or kDiscrete
  int num;               // block: target ones, clamp(int(ratio*g*g), 1, g*g-1)
  int min_patches;       // block: min(4, num, (g-1)^2)
  uint32_t threshold24;  // discrete: a cell is 1 iff (word >> 8) < threshold24 (= ceil(ratio*2^24))
  uint32_t key0, key1;   // Philox key derived from (seed, step)
};

constexpr int kBlockAttempts = 10;  // BEiT: up to 10 tries to place one block
constexpr int kMaxRedraws = 1000;   // redraws of an all-0 / all-1 mask before the fallback
constexpr float kLogAspectLo = -0x1.34379p+0f;   // float32(log 0.3)
constexpr float kLogAspectSpan = 0x1.34379p+1f;  // float32(log(1/0.3) - log 0.3)

MIXFAST_HD int popcount64(uint64_t v) {
#if defined(__CUDA_ARCH__)
  return __popcll(v);
#else
  return __builtin_popcountll(v);
#endif
}

// Bits left..left+w-1 set; w <= 63 here (blocks are strictly narrower than the grid).
MIXFAST_HD uint64_t span_bits(int left, int w) { return ((uint64_t{1} << w) - 1) << left; }

struct BlockCandidate {
  int h, w, top, left;
  bool fits;  // h < g and w < g (strict, as BEiT)
};

// Attempt number `draw` of sample `sample` when `rem` cells are still wanted.
//   area   = min_patches + (rem - min_patches) * u0          (random.uniform(a, b))
//   aspect = exp(log 0.3 + (log(1/0.3) - log 0.3) * u1)
//   h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect))
//   top ~ randint(0, g - h), left ~ randint(0, g - w)         (inclusive)
MIXFAST_HD BlockCandidate block_candidate(const MaskSpec& s, uint32_t sample, uint32_t draw, int rem) {
  const Philox4 r = philox4x32_10(draw, sample, static_cast<uint32_t>(kBlock), 0u, s.key0, s.key1);
  const float area = f_add(static_cast<float>(s.min_patches), f_mul(static_cast<float>(rem - s.min_patches), uniform01(r.x)));
  const float aspect = exp_poly(f_add(kLogAspectLo, f_mul(kLogAspectSpan, uniform01(r.y))));
  BlockCandidate c;
  c.h = round_half_even(f_sqrt(f_mul(area, aspect)));
  c.w = round_half_even(f_sqrt(f_div(area, aspect)));
  c.fits = c.h < s.grid && c.w < s.grid;
  c.top = c.fits ? uniform_below(r.z, static_cast<uint32_t>(s.grid - c.h + 1)) : 0;
  c.left = c.fits ? uniform_below(r.w, static_cast<uint32_t>(s.grid - c.w + 1)) : 0;
  return c;
}

MIXFAST_HD void clear_rows(uint64_t* rows, int grid) {
  for (int r = 0; r < grid; ++r) rows[r] = 0;
}

// BEiT block masking: add blocks until `num` ones or a block cannot be placed in 10 tries.
// Returns the number of ones (>= 1; <= num <= g*g-1, so never all-1).
MIXFAST_HD int generate_block_mask(const MaskSpec& s, uint32_t sample, uint64_t* rows) {
  uint32_t draw = 0;
  for (int redraw = 0; redraw < kMaxRedraws; ++redraw) {
    clear_rows(rows, s.grid);
    int count = 0;
    while (count < s.num) {
      const int rem = s.num - count;
      int added = 0;
      for (int attempt = 0; attempt < kBlockAttempts && added == 0; ++attempt) {
        const BlockCandidate c = block_candidate(s, sample, draw++, rem);
        if (!c.fits) continue;
        const uint64_t bits = span_bits(c.left, c.w);
        int already = 0;
        for (int r = c.top; r < c.top + c.h; ++r) already += popcount64(rows[r] & bits);
        const int fresh = c.h * c.w - already;
        if (fresh > 0 && fresh <= rem) {
          for (int r = c.top; r < c.top + c.h; ++r) rows[r] |= bits;
          added = fresh;
        }
      }
      if (added == 0) break;
      count += added;
    }
    if (count > 0) return count;  // an all-0 mask (first block never placed) is redrawn
  }
  // Never reached in practice (1000 mask draws in a row placing nothing); defined so every
  // backend agrees: a single 1 in cell (0, 0).
  clear_rows(rows, s.grid);
  rows[0] = 1;
  return 1;
}

// i.i.d. cells: 1 with probability ~ratio, row-major; redrawn while all-0 or all-1.
MIXFAST_HD int generate_discrete_mask(const MaskSpec& s, uint32_t sample, uint64_t* rows) {
  const int g = s.grid, cells = g * g, draws = (cells + 3) / 4;
  for (int redraw = 0; redraw < kMaxRedraws; ++redraw) {
    clear_rows(rows, g);
    int count = 0;
    for (int q = 0; q < draws; ++q) {
      const Philox4 r = philox4x32_10(static_cast<uint32_t>(redraw * draws + q), sample,
                                      static_cast<uint32_t>(kDiscrete), 0u, s.key0, s.key1);
      const uint32_t words[4] = {r.x, r.y, r.z, r.w};
      for (int j = 0; j < 4; ++j) {
        const int cell = 4 * q + j;
        if (cell < cells && (words[j] >> 8) < s.threshold24) {
          rows[cell / g] |= uint64_t{1} << (cell % g);
          ++count;
        }
      }
    }
    if (count > 0 && count < cells) return count;
  }
  // Fallback after 1000 constant draws (only for ratios within ~1e-3 of 0 or 1 on tiny
  // grids): one 1 in cell (0, 0) for ratio < 1/2, else all ones but cell (0, 0).
  clear_rows(rows, g);
  if (s.threshold24 < (1u << 23)) {
    rows[0] = 1;
    return 1;
  }
  const uint64_t full = (g == 64) ? ~uint64_t{0} : ((uint64_t{1} << g) - 1);
  for (int r = 0; r < g; ++r) rows[r] = full;
  rows[0] &= ~uint64_t{1};
  return cells - 1;
}

MIXFAST_HD int generate_mask(const MaskSpec& s, uint32_t sample, uint64_t* rows) {
  return s.kind == kBlock ? generate_block_mask(s, sample, rows) : generate_discrete_mask(s, sample, rows);
}

}  // namespace mixfast
