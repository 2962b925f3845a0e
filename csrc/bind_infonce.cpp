// pybind11 binding of the fused soft-InfoNCE CUDA kernels (`bind_infonce`, called from bindings.cpp).
//
// Python (mixfast/ops/infonce.py, _NativeCuda) validates the tensors and passes raw device pointers
// (tensor.data_ptr()), sizes, strides, a dtype code and torch's current stream. This API layer checks every
// scalar argument (ValueError), then require_cuda() (RuntimeError on a build or machine without CUDA), and only
// then launches -- so the checks are testable on a CPU-only machine. There is no CPU kernel: on the CPU
// soft_infonce runs the chunked torch implementation (mixfast/ops/infonce_chunked.py), whose matmuls are BLAS's.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "mixfast/infonce.h"
#include "mixfast/runtime.h"

namespace py = pybind11;
using namespace mixfast;

namespace {

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument("mixfast._C soft_infonce: " + what); }

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);  // NOLINT: addresses come from torch tensors
}

infonce::Problem problem(uintptr_t q, int64_t q_stride, uintptr_t cols, int64_t cols_stride, uintptr_t exclude,
                         int64_t m, int64_t n, int64_t d, double scale, int dtype, uintptr_t stream) {
  if (m < 1 || n < 1) fail("m and n must be >= 1 (empty problems are handled in Python), got m=" +
                           std::to_string(m) + ", n=" + std::to_string(n));
  if (d < 1 || d > infonce::kMaxDim)
    fail("d must be in [1, " + std::to_string(infonce::kMaxDim) + "], got " + std::to_string(d));
  if (q_stride < d || cols_stride < d)
    fail("row strides must be >= d=" + std::to_string(d) + " (unit column stride), got q_stride=" +
         std::to_string(q_stride) + ", cols_stride=" + std::to_string(cols_stride));
  if (q == 0 || cols == 0) fail("q and cols must be non-null");
  if (dtype != kFloat32 && dtype != kBFloat16 && dtype != kFloat16)
    fail("dtype code must be 0 (float32), 1 (bfloat16) or 2 (float16), got " + std::to_string(dtype));
  if (!(scale > 0.0) || !std::isfinite(scale)) fail("scale (1/tau) must be finite and > 0");
  return infonce::Problem{ptr<const void>(q), q_stride, ptr<const void>(cols), cols_stride,
                          ptr<const int64_t>(exclude), m, n, d, static_cast<float>(scale), dtype, stream};
}

infonce::GradTerms grad_terms(uintptr_t lse, uintptr_t gl, uintptr_t pos, uintptr_t gs, int64_t p, bool in_denom) {
  if (in_denom && (lse == 0 || gl == 0)) fail("lse and gl must be non-null when in_denom");
  if ((pos == 0) != (gs == 0)) fail("pos and gs must be given together");
  if (pos != 0 && p < 1) fail("p must be >= 1 when positives are given, got " + std::to_string(p));
  return infonce::GradTerms{ptr<const float>(lse), ptr<const float>(gl), ptr<const int64_t>(pos),
                            ptr<const float>(gs), pos != 0 ? p : 0, in_denom};
}

// A split of `extent` rows or columns into `splits` pieces of `per_split` (a multiple of the block size): every
// piece non-empty, all of them together covering the extent exactly once.
void check_splits(int64_t extent, int64_t d, int splits, int64_t per_split, uintptr_t out) {
  const int block = infonce::block_size(d);
  if (out == 0) fail("output buffers must be non-null");
  if (splits < 1 || splits > 65535) fail("splits must be in [1, 65535], got " + std::to_string(splits));
  if (per_split < 1 || per_split % block != 0)
    fail("per_split must be a positive multiple of " + std::to_string(block) + ", got " + std::to_string(per_split));
  if (int64_t(splits - 1) * per_split >= extent || int64_t(splits) * per_split < extent)
    fail(std::to_string(splits) + " splits of " + std::to_string(per_split) + " do not tile " +
         std::to_string(extent) + " exactly (an empty or missing split)");
}

}  // namespace

void bind_infonce(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def("infonce_has_cuda", [] { return cuda_built() && cuda_device_count() > 0; },
        "Whether the soft-InfoNCE CUDA kernels were built and a device is visible.");
  m.def("infonce_max_dim", [] { return infonce::kMaxDim; }, "Largest head dimension D the kernels take.");
  m.def(
      "infonce_blocks",
      [](int64_t d) {
        const int b = infonce::block_size(d);
        return py::make_tuple(b, b);
      },
      py::arg("d"), "(rows, columns) per thread block for head dim d; split lengths are multiples of these.");

  m.def(
      "infonce_lse_partials",
      [](uintptr_t q, int64_t q_stride, uintptr_t cols, int64_t cols_stride, uintptr_t exclude, int64_t m_,
         int64_t n, int64_t d, double scale, int dtype, uintptr_t stream, uintptr_t part_max, uintptr_t part_sum,
         int splits, int64_t per_split) {
        [[maybe_unused]] const infonce::Problem p =
            problem(q, q_stride, cols, cols_stride, exclude, m_, n, d, scale, dtype, stream);
        check_splits(n, d, splits, per_split, part_max);
        if (part_sum == 0) fail("part_sum must be non-null");
        require_cuda("infonce_lse_partials");
#ifdef MIXFAST_WITH_CUDA
        infonce::lse_partials(p, ptr<float>(part_max), ptr<float>(part_sum), splits, per_split);
#endif
      },
      py::arg("q"), py::arg("q_stride"), py::arg("cols"), py::arg("cols_stride"), py::arg("exclude"), py::arg("m"),
      py::arg("n"), py::arg("d"), py::arg("scale"), py::arg("dtype"), py::arg("stream"), py::arg("part_max"),
      py::arg("part_sum"), py::arg("splits"), py::arg("per_split"), nogil,
      "Online-logsumexp partials [splits, m] (max in natural-log units, sum) over column splits.");

  m.def(
      "infonce_grad_q_partials",
      [](uintptr_t q, int64_t q_stride, uintptr_t cols, int64_t cols_stride, uintptr_t exclude, int64_t m_,
         int64_t n, int64_t d, double scale, int dtype, uintptr_t stream, uintptr_t lse, uintptr_t gl, uintptr_t pos,
         uintptr_t gs, int64_t p, bool in_denom, uintptr_t out, int splits, int64_t per_split) {
        [[maybe_unused]] const infonce::Problem pr =
            problem(q, q_stride, cols, cols_stride, exclude, m_, n, d, scale, dtype, stream);
        [[maybe_unused]] const infonce::GradTerms g = grad_terms(lse, gl, pos, gs, p, in_denom);
        check_splits(n, d, splits, per_split, out);
        require_cuda("infonce_grad_q_partials");
#ifdef MIXFAST_WITH_CUDA
        infonce::grad_q_partials(pr, g, ptr<float>(out), splits, per_split);
#endif
      },
      py::arg("q"), py::arg("q_stride"), py::arg("cols"), py::arg("cols_stride"), py::arg("exclude"), py::arg("m"),
      py::arg("n"), py::arg("d"), py::arg("scale"), py::arg("dtype"), py::arg("stream"), py::arg("lse"),
      py::arg("gl"), py::arg("pos"), py::arg("gs"), py::arg("p"), py::arg("in_denom"), py::arg("out"),
      py::arg("splits"), py::arg("per_split"), nogil, "dq partials [splits, m, d] over column splits.");

  m.def(
      "infonce_grad_cols_partials",
      [](uintptr_t q, int64_t q_stride, uintptr_t cols, int64_t cols_stride, uintptr_t exclude, int64_t m_,
         int64_t n, int64_t d, double scale, int dtype, uintptr_t stream, uintptr_t lse, uintptr_t gl, uintptr_t pos,
         uintptr_t gs, int64_t p, bool in_denom, uintptr_t out, int splits, int64_t per_split) {
        [[maybe_unused]] const infonce::Problem pr =
            problem(q, q_stride, cols, cols_stride, exclude, m_, n, d, scale, dtype, stream);
        [[maybe_unused]] const infonce::GradTerms g = grad_terms(lse, gl, pos, gs, p, in_denom);
        check_splits(m_, d, splits, per_split, out);
        require_cuda("infonce_grad_cols_partials");
#ifdef MIXFAST_WITH_CUDA
        infonce::grad_cols_partials(pr, g, ptr<float>(out), splits, per_split);
#endif
      },
      py::arg("q"), py::arg("q_stride"), py::arg("cols"), py::arg("cols_stride"), py::arg("exclude"), py::arg("m"),
      py::arg("n"), py::arg("d"), py::arg("scale"), py::arg("dtype"), py::arg("stream"), py::arg("lse"),
      py::arg("gl"), py::arg("pos"), py::arg("gs"), py::arg("p"), py::arg("in_denom"), py::arg("out"),
      py::arg("splits"), py::arg("per_split"), nogil, "dcols partials [splits, n, d] over row splits.");
}
