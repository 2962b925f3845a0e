// The pybind11 module mixfast._C: build information plus each op family's bindings,
// which live next to their kernels' API (bind_mix.cpp, bind_infonce.cpp). CMake defines
// MIXFAST_HAS_INFONCE when csrc/bind_infonce.cpp exists.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "mixfast/runtime.h"

namespace py = pybind11;

void bind_mix(py::module_& m);
#ifdef MIXFAST_HAS_INFONCE
void bind_infonce(py::module_& m);
#endif

#ifndef MIXFAST_CUDA_ARCHS
#define MIXFAST_CUDA_ARCHS ""
#endif
#ifndef MIXFAST_NVCC_VERSION
#define MIXFAST_NVCC_VERSION ""
#endif
#ifndef MIXFAST_CUDA_SOURCES
#define MIXFAST_CUDA_SOURCES ""
#endif
#ifndef MIXFAST_COMPILER
#define MIXFAST_COMPILER ""
#endif
#ifndef MIXFAST_BUILD_TYPE
#define MIXFAST_BUILD_TYPE ""
#endif

namespace {

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s) {
    if (c == sep) {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

py::dict build_info() {
  py::dict d;
  d["cuda"] = mixfast::cuda_built();
  std::vector<int> archs;
  for (const auto& a : split(MIXFAST_CUDA_ARCHS, ',')) archs.push_back(std::stoi(a));
  d["cuda_archs"] = archs;
  d["nvcc_version"] = std::string(MIXFAST_NVCC_VERSION);
  d["cuda_sources"] = split(MIXFAST_CUDA_SOURCES, ',');
#ifdef _OPENMP
  d["openmp"] = true;
  d["openmp_version"] = static_cast<int>(_OPENMP);
#else
  d["openmp"] = false;
  d["openmp_version"] = 0;
#endif
  d["compiler"] = std::string(MIXFAST_COMPILER);
  d["build_type"] = std::string(MIXFAST_BUILD_TYPE);
#ifdef MIXFAST_HAS_INFONCE
  d["infonce"] = true;
#else
  d["infonce"] = false;
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mixfast native kernels (CPU/OpenMP always, CUDA when built): raw pointers in, no ATen";
  m.def("build_info", &build_info,
        "What this module was built with: cuda (bool), cuda_archs, nvcc_version, cuda_sources, openmp, compiler.");
  m.def("cuda_device_count", &mixfast::cuda_device_count, "CUDA devices visible to this build (0 without a GPU).");
  bind_mix(m);
#ifdef MIXFAST_HAS_INFONCE
  bind_infonce(m);
#endif
}
