// Nearest-neighbour source index of F.interpolate(mode="nearest"), the reference's
// upsampling of a g x g grid mask to H x W (mixfast/ops/reference.py: _nearest_indices):
//   src(y) = min(floor(float32(y) * float32(in / out)), in - 1)
// in float32 with that operation order -- not always the exact rational floor(y*in/out).
#pragma once

#include "mixfast/common.h"
#include "mixfast/fp32.h"

namespace mixfast {

MIXFAST_HD float nearest_scale(int in_size, int out_size) {
  return f_div(static_cast<float>(in_size), static_cast<float>(out_size));
}

MIXFAST_HD int nearest_src(int y, float scale, int in_size) {
  const int i = static_cast<int>(floorf(f_mul(static_cast<float>(y), scale)));
  return i < in_size - 1 ? i : in_size - 1;
}

}  // namespace mixfast
