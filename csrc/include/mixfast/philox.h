// Philox4x32-10 counter-based RNG (Salmon et al., "Parallel random numbers: as easy as
// 1, 2, 3", SC'11; constants and round function as in Random123 and cuRAND).
//
// mixfast keys it with (seed, step) and counts with (draw index, sample, stream, 0), so a
// mask is a pure function of (seed, step, sample) on every backend. The same function is
// mirrored in kernels/mix.py (Triton) and mixfast/ops/reference.py (Python); the
// known-answer vectors of Random123 are checked for all three in the tests.
#pragma once

#include "mixfast/common.h"

namespace mixfast {

struct Philox4 {
  uint32_t x, y, z, w;
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1

MIXFAST_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if MIXFAST_DEVICE_CODE && defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Ten rounds of Philox4x32 on counter (c0, c1, c2, c3) with key (k0, k1).
MIXFAST_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(kPhiloxM0, c0), lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = mulhi32(kPhiloxM1, c2), lo1 = kPhiloxM1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return Philox4{c0, c1, c2, c3};
}

// Uniform float in [0, 1) from the top 24 bits: exact (every value is a multiple of 2^-24).
MIXFAST_HD float uniform01(uint32_t r) { return static_cast<float>(r >> 8) * 5.9604644775390625e-08f; }

// Integer in [0, n) by multiply-shift (Lemire); n >= 1. Bias < n / 2^32, irrelevant here.
MIXFAST_HD int uniform_below(uint32_t r, uint32_t n) { return static_cast<int>(mulhi32(r, n)); }

}  // namespace mixfast
