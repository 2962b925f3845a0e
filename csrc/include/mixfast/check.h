// Argument checks of the API layer, shared by every op family: a failed check throws
// std::invalid_argument (a Python ValueError) whose message names the entry point and the
// argument, e.g. "mixfast._C.mix_cpu: lam must be non-null".
//
// The checks run on every call, so a message is only built when its check fails.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "mixfast/common.h"

namespace mixfast {

[[noreturn]] inline void fail(const char* op, const std::string& what) {
  throw std::invalid_argument(std::string("mixfast._C.") + op + ": " + what);
}

// The name an argument has for the caller: "a.masks.grid" is the field "grid".
inline std::string argument_name(const char* expression) {
  const std::string e(expression);
  const size_t dot = e.rfind('.');
  return dot == std::string::npos ? e : e.substr(dot + 1);
}

inline std::string range_message(const char* expression, int64_t value, int64_t lo, int64_t hi) {
  return argument_name(expression) + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " +
         std::to_string(value);
}

inline void check_dtype(const char* op, int dtype) {
  if (dtype != kFloat32 && dtype != kBFloat16 && dtype != kFloat16)
    fail(op, "dtype code must be 0 (float32), 1 (bfloat16) or 2 (float16), got " + std::to_string(dtype));
}

}  // namespace mixfast

#define MIXFAST_CHECK(cond, op, what)          \
  do {                                         \
    if (!(cond)) ::mixfast::fail((op), (what)); \
  } while (0)

// A pointer (or an address passed as an integer) that must be given.
#define MIXFAST_CHECK_NOT_NULL(op, value) \
  MIXFAST_CHECK(static_cast<bool>(value), op, ::mixfast::argument_name(#value) + " must be non-null")

// An integer in the closed range [lo, hi].
#define MIXFAST_CHECK_RANGE(op, value, lo, hi)                          \
  MIXFAST_CHECK((lo) <= (value) && (value) <= (hi), op,                 \
                ::mixfast::range_message(#value, (value), (lo), (hi)))
