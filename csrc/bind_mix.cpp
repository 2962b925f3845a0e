// pybind11 binding of the mix ops (`bind_mix`, called from bindings.cpp).
//
// Python fills the argument structs with raw pointers (tensor.data_ptr()), sizes, strides
// and dtype codes (mixfast/ops/_native.py), the API layer (check_* in mixfast/mix_api.h)
// checks them, then the CPU or CUDA kernels run. CUDA entry points first call
// require_cuda(), so without a GPU they raise RuntimeError instead of crashing.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "mixfast/mix_api.h"
#include "mixfast/runtime.h"

namespace py = pybind11;
using namespace mixfast;

namespace {

// Expose a pointer member as a Python int (an address from Tensor.data_ptr()).
template <typename Class, typename Ptr>
void pointer_property(py::class_<Class>& cls, const char* name, Ptr Class::*member) {
  cls.def_property(
      name, [member](const Class& c) { return reinterpret_cast<uintptr_t>(c.*member); },
      [member](Class& c, uintptr_t address) {
        c.*member = reinterpret_cast<Ptr>(address);  // NOLINT: addresses come from torch tensors
      });
}

void check_make_masks(const MaskSpec& spec, int n) {
  check_spec(spec);
  if (n < 1) fail("make_masks: n must be >= 1, got " + std::to_string(n));
}

}  // namespace

void bind_mix(py::module_& m) {
  py::class_<MaskSpec>(m, "MaskSpec", "Mask generator parameters (mixfast/block_mask.h); built by mixfast.ops.reference.mask_spec")
      .def(py::init<>())
      .def_readwrite("grid", &MaskSpec::grid)
      .def_readwrite("kind", &MaskSpec::kind)
      .def_readwrite("num", &MaskSpec::num)
      .def_readwrite("min_patches", &MaskSpec::min_patches)
      .def_readwrite("threshold24", &MaskSpec::threshold24)
      .def_readwrite("key0", &MaskSpec::key0)
      .def_readwrite("key1", &MaskSpec::key1);

  py::class_<ImageGeometry>(m, "ImageGeometry", "[N, C, H, W], dtype code, NCHW or NHWC")
      .def(py::init<>())
      .def_readwrite("N", &ImageGeometry::N)
      .def_readwrite("C", &ImageGeometry::C)
      .def_readwrite("H", &ImageGeometry::H)
      .def_readwrite("W", &ImageGeometry::W)
      .def_readwrite("dtype", &ImageGeometry::dtype)
      .def_readwrite("channels_last", &ImageGeometry::channels_last);

  py::class_<MaskSource> masks(m, "MaskSource", "Given masks (uint8 [n, g, g]) or a spec to generate them");
  masks.def(py::init<>())
      .def_readwrite("n", &MaskSource::n)
      .def_readwrite("grid", &MaskSource::grid)
      .def_readwrite("spec", &MaskSource::spec);
  pointer_property(masks, "given", &MaskSource::given);
  pointer_property(masks, "out", &MaskSource::out);

  py::class_<MixArgs> mix(m, "MixArgs", "Arguments of mix_cpu / mix_cuda (see mixfast/mix_api.h)");
  mix.def(py::init<>())
      .def_readwrite("geo", &MixArgs::geo)
      .def_readwrite("x_batch_stride", &MixArgs::x_batch_stride)
      .def_readwrite("filler_batch_stride", &MixArgs::filler_batch_stride)
      .def_readwrite("perm_is_flip", &MixArgs::perm_is_flip)
      .def_readwrite("masks", &MixArgs::masks)
      .def_readwrite("num_threads", &MixArgs::num_threads);
  pointer_property(mix, "x", &MixArgs::x);
  pointer_property(mix, "perm", &MixArgs::perm);
  pointer_property(mix, "filler", &MixArgs::filler);
  pointer_property(mix, "mixed", &MixArgs::mixed);
  pointer_property(mix, "switch_out", &MixArgs::switch_out);
  pointer_property(mix, "lam", &MixArgs::lam);

  py::class_<UnmixArgs> unmix(m, "UnmixArgs", "Arguments of unmix_cpu / unmix_cuda (see mixfast/mix_api.h)");
  unmix.def(py::init<>())
      .def_readwrite("geo", &UnmixArgs::geo)
      .def_readwrite("x_batch_stride", &UnmixArgs::x_batch_stride)
      .def_readwrite("mixup", &UnmixArgs::mixup)
      .def_readwrite("lam", &UnmixArgs::lam)
      .def_readwrite("mu", &UnmixArgs::mu)
      .def_readwrite("y1", &UnmixArgs::y1)
      .def_readwrite("y2", &UnmixArgs::y2)
      .def_readwrite("x1", &UnmixArgs::x1)
      .def_readwrite("x2", &UnmixArgs::x2)
      .def_readwrite("num_threads", &UnmixArgs::num_threads);
  pointer_property(unmix, "x", &UnmixArgs::x);
  pointer_property(unmix, "out", &UnmixArgs::out);

  py::class_<MixUnmixArgs>(m, "MixUnmixArgs", "MixMask (mix) and Un-Mix (unmix) from one pass over x")
      .def(py::init<>())
      .def_readwrite("mix", &MixUnmixArgs::mix)
      .def_readwrite("unmix", &MixUnmixArgs::unmix);

  const auto nogil = py::call_guard<py::gil_scoped_release>();

  // --- CPU ------------------------------------------------------------------------------
  m.def(
      "make_masks_cpu",
      [](const MaskSpec& spec, int n, uintptr_t out, int num_threads) {
        check_make_masks(spec, n);
        if (out == 0) fail("make_masks: out must be non-null");
        cpu::make_masks(spec, n, reinterpret_cast<uint8_t*>(out), num_threads < 1 ? 1 : num_threads);
      },
      py::arg("spec"), py::arg("n"), py::arg("out"), py::arg("num_threads") = 1, nogil,
      "Write n masks (uint8 [n, g, g]) drawn from spec to the host buffer at address out.");
  m.def(
      "mix_cpu", [](const MixArgs& a) { check_mix(a); cpu::mix(a); }, py::arg("args"), nogil);
  m.def(
      "unmix_cpu", [](const UnmixArgs& a) { check_unmix(a); cpu::unmix(a); }, py::arg("args"), nogil);
  m.def(
      "mix_and_unmix_cpu", [](const MixUnmixArgs& a) { check_mix_unmix(a); cpu::mix_and_unmix(a); }, py::arg("args"),
      nogil);

  // --- CUDA -----------------------------------------------------------------------------
  // `stream` is torch.cuda.current_stream().cuda_stream. The guard runs before the
  // arguments are even looked at, so a machine without a GPU gets a RuntimeError.
  m.def(
      "make_masks_cuda",
      [](const MaskSpec& spec, int n, uintptr_t out, uintptr_t stream) {
        require_cuda("make_masks_cuda");
        check_make_masks(spec, n);
        if (out == 0) fail("make_masks: out must be non-null");
#ifdef MIXFAST_WITH_CUDA
        cuda::make_masks(spec, n, reinterpret_cast<uint8_t*>(out), stream);
#endif
      },
      py::arg("spec"), py::arg("n"), py::arg("out"), py::arg("stream"), nogil);
  m.def(
      "mix_cuda",
      [](const MixArgs& a, uintptr_t stream) {
        require_cuda("mix_cuda");
        check_mix(a);
#ifdef MIXFAST_WITH_CUDA
        cuda::mix(a, stream);
#endif
      },
      py::arg("args"), py::arg("stream"), nogil);
  m.def(
      "unmix_cuda",
      [](const UnmixArgs& a, uintptr_t stream) {
        require_cuda("unmix_cuda");
        check_unmix(a);
#ifdef MIXFAST_WITH_CUDA
        cuda::unmix(a, stream);
#endif
      },
      py::arg("args"), py::arg("stream"), nogil);
  m.def(
      "mix_and_unmix_cuda",
      [](const MixUnmixArgs& a, uintptr_t stream) {
        require_cuda("mix_and_unmix_cuda");
        check_mix_unmix(a);
#ifdef MIXFAST_WITH_CUDA
        cuda::mix_and_unmix(a, stream);
#endif
      },
      py::arg("args"), py::arg("stream"), nogil);

  // --- shared cores, exposed for the parity tests ----------------------------------------
  m.def(
      "philox4x32_10",
      [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
        const Philox4 r = philox4x32_10(c0, c1, c2, c3, k0, k1);
        return py::make_tuple(r.x, r.y, r.z, r.w);
      },
      "Philox4x32-10 of counter (c0..c3) and key (k0, k1), as used by the mask generator.");
  m.def(
      "block_candidate",
      [](const MaskSpec& spec, uint32_t sample, uint32_t draw, int rem) {
        check_spec(spec);
        const BlockCandidate c = block_candidate(spec, sample, draw, rem);
        return py::make_tuple(c.h, c.w, c.top, c.left, c.fits);
      },
      "(h, w, top, left, fits) of one BEiT block attempt (mixfast/block_mask.h).");
}
