// pybind11 binding of the fused soft-InfoNCE CUDA kernels (`bind_infonce`, called from bindings.cpp), in the
// shape of mixfast/binding.h.
//
// Python (mixfast/ops/infonce.py, _NativeCuda) validates the tensors and builds one InfoNCEProblem (raw device
// pointers from tensor.data_ptr(), sizes, strides, a dtype code, torch's current stream) and, for the gradients,
// one InfoNCEGradTerms per call; every launch of that call takes them. Each entry point checks the structs and its
// own arguments (ValueError), then requires CUDA (RuntimeError on a build or machine without it), and only then
// launches -- so the checks are testable on a CPU-only machine. There is no CPU kernel: on the CPU soft_infonce
// runs the chunked torch implementation (mixfast/ops/infonce_chunked.py), whose matmuls are BLAS's.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "mixfast/binding.h"
#include "mixfast/check.h"
#include "mixfast/infonce.h"

namespace py = pybind11;
using namespace mixfast;
using binding::bind_struct;
using binding::launch_cuda;
using infonce::GradTerms;
using infonce::Problem;

namespace {

void check_problem(const char* op, const Problem& p) {
  MIXFAST_CHECK(p.m >= 1 && p.n >= 1, op,
                "m and n must be >= 1 (empty problems are handled in Python), got m=" + std::to_string(p.m) +
                    ", n=" + std::to_string(p.n));
  MIXFAST_CHECK_RANGE(op, p.d, 1, infonce::kMaxDim);
  MIXFAST_CHECK(p.q_stride >= p.d && p.cols_stride >= p.d, op,
                "row strides must be >= d=" + std::to_string(p.d) + " (unit column stride), got q_stride=" +
                    std::to_string(p.q_stride) + ", cols_stride=" + std::to_string(p.cols_stride));
  MIXFAST_CHECK_NOT_NULL(op, p.q);
  MIXFAST_CHECK_NOT_NULL(op, p.cols);
  check_dtype(op, p.dtype);
  MIXFAST_CHECK(p.scale > 0.f && std::isfinite(p.scale), op, "scale (1/tau) must be finite and > 0");
}

void check_grad_terms(const char* op, const GradTerms& g) {
  MIXFAST_CHECK(!g.in_denom || (g.lse != nullptr && g.gl != nullptr), op, "lse and gl must be non-null when in_denom");
  MIXFAST_CHECK((g.pos == nullptr) == (g.gs == nullptr), op, "pos and gs must be given together");
  MIXFAST_CHECK(g.pos == nullptr || g.p >= 1, op,
                "p must be >= 1 when positives are given, got " + std::to_string(g.p));
}

// A split of `extent` rows or columns into `splits` pieces of `per_split` (a multiple of the block size): every
// piece non-empty, all of them together covering the extent exactly once.
void check_splits(const char* op, int64_t extent, int64_t d, int splits, int64_t per_split) {
  const int block = infonce::block_size(d);
  MIXFAST_CHECK_RANGE(op, splits, 1, 65535);
  MIXFAST_CHECK(per_split >= 1 && per_split % block == 0, op,
                "per_split must be a positive multiple of " + std::to_string(block) + ", got " +
                    std::to_string(per_split));
  MIXFAST_CHECK(int64_t(splits - 1) * per_split < extent && int64_t(splits) * per_split >= extent, op,
                std::to_string(splits) + " splits of " + std::to_string(per_split) + " do not tile " +
                    std::to_string(extent) + " exactly (an empty or missing split)");
}

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);  // NOLINT: addresses come from torch tensors
}

void lse_partials(const Problem& p, uintptr_t part_max, uintptr_t part_sum, int splits, int64_t per_split) {
  const char* op = "infonce_lse_partials";
  check_problem(op, p);
  check_splits(op, p.n, p.d, splits, per_split);
  MIXFAST_CHECK_NOT_NULL(op, part_max);
  MIXFAST_CHECK_NOT_NULL(op, part_sum);
  launch_cuda(op, MIXFAST_CUDA_LAUNCHER(infonce::lse_partials), p, ptr<float>(part_max), ptr<float>(part_sum),
              splits, per_split);
}

using GradLauncher = void (*)(const Problem&, const GradTerms&, float*, int, int64_t);

// The two gradient entry points differ only in their launcher and in what they split: dq splits the n columns,
// dcols the m rows.
void def_grad_partials(py::module_& m, const char* name, GradLauncher launcher, int64_t Problem::*split,
                       const char* doc) {
  m.def(
      name,
      [op = std::string(name), launcher, split](const Problem& p, const GradTerms& g, uintptr_t out, int splits,
                                                int64_t per_split) {
        check_problem(op.c_str(), p);
        check_grad_terms(op.c_str(), g);
        check_splits(op.c_str(), p.*split, p.d, splits, per_split);
        MIXFAST_CHECK_NOT_NULL(op.c_str(), out);
        launch_cuda(op.c_str(), launcher, p, g, ptr<float>(out), splits, per_split);
      },
      py::arg("problem"), py::arg("grad"), py::arg("out"), py::arg("splits"), py::arg("per_split"),
      py::call_guard<py::gil_scoped_release>(), doc);
}

}  // namespace

void bind_infonce(py::module_& m) {
  bind_struct<Problem>(m, "InfoNCEProblem", "q [m, d] against the column block cols [n, d] (see mixfast/infonce.h)",
                       MIXFAST_FIELD(Problem, q), MIXFAST_FIELD(Problem, q_stride), MIXFAST_FIELD(Problem, cols),
                       MIXFAST_FIELD(Problem, cols_stride), MIXFAST_FIELD(Problem, exclude), MIXFAST_FIELD(Problem, m),
                       MIXFAST_FIELD(Problem, n), MIXFAST_FIELD(Problem, d), MIXFAST_FIELD(Problem, scale),
                       MIXFAST_FIELD(Problem, dtype), MIXFAST_FIELD(Problem, stream));
  bind_struct<GradTerms>(m, "InfoNCEGradTerms", "dF/dlse and dF/ds at the positives (see mixfast/infonce.h)",
                         MIXFAST_FIELD(GradTerms, lse), MIXFAST_FIELD(GradTerms, gl), MIXFAST_FIELD(GradTerms, pos),
                         MIXFAST_FIELD(GradTerms, gs), MIXFAST_FIELD(GradTerms, p), MIXFAST_FIELD(GradTerms, in_denom));

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

  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("infonce_lse_partials", &lse_partials, py::arg("problem"), py::arg("part_max"), py::arg("part_sum"),
        py::arg("splits"), py::arg("per_split"), nogil,
        "Online-logsumexp partials [splits, m] (max in natural-log units, sum) over column splits.");
  def_grad_partials(m, "infonce_grad_q_partials", MIXFAST_CUDA_LAUNCHER(infonce::grad_q_partials), &Problem::n,
                    "dq partials [splits, m, d] over column splits.");
  def_grad_partials(m, "infonce_grad_cols_partials", MIXFAST_CUDA_LAUNCHER(infonce::grad_cols_partials),
                    &Problem::m, "dcols partials [splits, n, d] over row splits.");
}
