// bfloat16 / float16 <-> float32 conversions, bit-exact with PyTorch's (round to nearest
// even, quiet NaN), usable on host and device without cuda_bf16.h / cuda_fp16.h.
#pragma once

#include "mixfast/common.h"
#include "mixfast/fp32.h"

namespace mixfast {

MIXFAST_HD float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// c10::BFloat16's round_to_nearest_even.
MIXFAST_HD uint16_t float_to_bf16(float f) {
  if (f != f) return 0x7FC0;
  const uint32_t u = float_bits(f);
  const uint32_t bias = ((u >> 16) & 1u) + 0x7FFFu;
  return static_cast<uint16_t>((u + bias) >> 16);
}

// fp16_ieee_to_fp32_value from the FP16 library (used by c10::Half).
MIXFAST_HD float half_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float exp_scale = 0x1.0p-112f;
  const float normalized = f_mul(bits_float((two_w >> 4) + exp_offset), exp_scale);
  const uint32_t magic_mask = 126u << 23;
  const float magic_bias = 0.5f;
  const float denormalized = f_add(bits_float((two_w >> 17) | magic_mask), -magic_bias);
  const uint32_t denormalized_cutoff = 1u << 27;
  const uint32_t result = sign | (two_w < denormalized_cutoff ? float_bits(denormalized) : float_bits(normalized));
  return bits_float(result);
}

// fp16_ieee_from_fp32_value from the FP16 library (used by c10::Half): round to nearest even.
MIXFAST_HD uint16_t float_to_half(float f) {
  const float scale_to_inf = 0x1.0p+112f;
  const float scale_to_zero = 0x1.0p-110f;
  const float abs_f = bits_float(float_bits(f) & 0x7FFFFFFFu);
  float base = f_mul(f_mul(abs_f, scale_to_inf), scale_to_zero);
  const uint32_t w = float_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = f_add(bits_float((bias >> 1) + 0x07800000u), base);
  const uint32_t bits = float_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

template <int DTYPE>
struct Scalar;
template <>
struct Scalar<kFloat32> {
  using storage = float;
  static MIXFAST_HD float load(float v) { return v; }
  static MIXFAST_HD float store(float v) { return v; }
};
template <>
struct Scalar<kBFloat16> {
  using storage = uint16_t;
  static MIXFAST_HD float load(uint16_t v) { return bf16_to_float(v); }
  static MIXFAST_HD uint16_t store(float v) { return float_to_bf16(v); }
};
template <>
struct Scalar<kFloat16> {
  using storage = uint16_t;
  static MIXFAST_HD float load(uint16_t v) { return half_to_float(v); }
  static MIXFAST_HD uint16_t store(float v) { return float_to_half(v); }
};

}  // namespace mixfast
