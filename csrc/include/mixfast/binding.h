// The shape every binding (csrc/bind_*.cpp) shares; included by the bindings only.
//
// Python fills each argument struct with one constructor call per op call (bind_struct:
// pointers are integer addresses from Tensor.data_ptr()) and passes it to the entry
// points. An entry point checks all its arguments (ValueError, mixfast/check.h) and only
// then, on CUDA, requires a device (launch_cuda: RuntimeError), so every check can be
// tested on a machine without a GPU, and launches.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "mixfast/runtime.h"

namespace mixfast {
namespace binding {

namespace py = pybind11;

// One field of struct C as Python sees it: a pointer is an integer address.
template <typename C, typename M>
struct Field {
  using py_type = std::conditional_t<std::is_pointer_v<M>, uintptr_t, M>;
  const char* name;
  M C::*member;

  void set(C& c, const py_type& value) const {
    if constexpr (std::is_pointer_v<M>)
      c.*member = reinterpret_cast<M>(value);  // NOLINT: addresses come from torch tensors
    else
      c.*member = value;
  }
  py_type get(const C& c) const {
    if constexpr (std::is_pointer_v<M>)
      return reinterpret_cast<uintptr_t>(c.*member);
    else
      return c.*member;
  }
};

template <typename C, typename M>
Field<C, M> field(const char* name, M C::*member) {
  return {name, member};
}

// The field `member` of `Struct` under its own name.
#define MIXFAST_FIELD(Struct, member) ::mixfast::binding::field(#member, &Struct::member)

template <typename C, typename M>
void def_attribute(py::class_<C>& cls, const Field<C, M>& f) {
  if constexpr (std::is_pointer_v<M>)
    cls.def_property(
        f.name, [f](const C& c) { return f.get(c); }, [f](C& c, uintptr_t address) { f.set(c, address); });
  else
    cls.def_readwrite(f.name, f.member);  // struct fields by reference: `args.geo.N = 2` edits args
}

// Binds struct C as a Python class: a constructor that takes the fields in the order given
// here, by position or keyword (default: the field's value in C{}), so Python fills a
// struct in one call; a read-write attribute per field; and `_fields`, the names in
// constructor order. Calls on every op use positions: pybind11 looks each parameter name
// up per call, which makes a keyword call several times as costly.
template <typename C, typename... M>
py::class_<C> bind_struct(py::module_& m, const char* name, const char* doc, Field<C, M>... fields) {
  py::class_<C> cls(m, name, doc);
  const C defaults{};
  cls.def(py::init([fields...](const typename Field<C, M>::py_type&... values) {
            C c{};
            (fields.set(c, values), ...);
            return c;
          }),
          (py::arg(fields.name) = fields.get(defaults))...);
  (def_attribute(cls, fields), ...);
  cls.attr("_fields") = py::make_tuple(fields.name...);
  return cls;
}

// A CUDA launcher, or a null one of the same type in a build without the CUDA kernels (whose
// launchers are not compiled): launch_cuda() raises before a null launcher would be called.
#ifdef MIXFAST_WITH_CUDA
#define MIXFAST_CUDA_LAUNCHER(fn) (&fn)
#else
#define MIXFAST_CUDA_LAUNCHER(fn) static_cast<decltype(&fn)>(nullptr)
#endif

// Runs a CUDA launcher once the build and the machine have CUDA (RuntimeError otherwise).
// Called after the entry point has checked its arguments.
template <typename... Params, typename... Args>
void launch_cuda(const char* op, void (*launcher)(Params...), Args&&... args) {
  require_cuda(op);
  launcher(std::forward<Args>(args)...);
}

}  // namespace binding
}  // namespace mixfast
