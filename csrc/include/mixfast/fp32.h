// Correctly rounded float32 arithmetic that every backend reproduces bit for bit.
//
// The mask generator turns Philox words into block sizes with float math. For the masks
// to be identical on CPU, CUDA, Triton and the Python reference, each operation must be
// one IEEE-754 round-to-nearest operation in a fixed order: no FMA contraction (CPU code
// is compiled with -ffp-contract=off; CUDA uses the _rn intrinsics, which nvcc never
// fuses), no approximate division/sqrt, and no transcendental library call (expf differs
// between libm, CUDA and numpy by an ulp) -- exp is a fixed polynomial below.
#pragma once

#include <cmath>
#include <cstring>

#include "mixfast/common.h"

namespace mixfast {

MIXFAST_HD float f_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

MIXFAST_HD float f_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

MIXFAST_HD float f_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

MIXFAST_HD float f_sqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

MIXFAST_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

MIXFAST_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// exp(t) for |t| <= 1.21 (the log-aspect range of the block generator): Taylor series to
// degree 11 by Horner, every step rounded. Relative error ~1e-6, far below anything the
// block statistics can see; what matters is that it is the same float on every backend.
// Coefficients are float32(1/k!), written as exact hex floats (mirrored in Python).
MIXFAST_HD float exp_poly(float t) {
  float p = 0x1.ae6456p-26f;        // 1/11!
  p = f_add(f_mul(p, t), 0x1.27e4fcp-22f);  // 1/10!
  p = f_add(f_mul(p, t), 0x1.71de3ap-19f);  // 1/9!
  p = f_add(f_mul(p, t), 0x1.a01a02p-16f);  // 1/8!
  p = f_add(f_mul(p, t), 0x1.a01a02p-13f);  // 1/7!
  p = f_add(f_mul(p, t), 0x1.6c16c2p-10f);  // 1/6!
  p = f_add(f_mul(p, t), 0x1.111112p-7f);   // 1/5!
  p = f_add(f_mul(p, t), 0x1.555556p-5f);   // 1/4!
  p = f_add(f_mul(p, t), 0x1.555556p-3f);   // 1/3!
  p = f_add(f_mul(p, t), 0x1.0p-1f);        // 1/2!
  p = f_add(f_mul(p, t), 1.0f);             // 1/1!
  p = f_add(f_mul(p, t), 1.0f);             // 1/0!
  return p;
}

// Python's round() (half to even) of a non-negative float below 2^23; exact steps only.
MIXFAST_HD int round_half_even(float v) {
  const float f = floorf(v);
  const float d = f_add(v, -f);  // exact: v and f share the exponent range
  int r = static_cast<int>(f);
  if (d > 0.5f || (d == 0.5f && (r & 1))) r += 1;
  return r;
}

}  // namespace mixfast
