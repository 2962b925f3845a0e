// pybind11 binding of the mix ops (`bind_mix`, called from bindings.cpp), in the shape of
// mixfast/binding.h: Python builds the argument structs (mixfast/ops/mix.py, _native_*)
// with one constructor call each, the API layer (checked() in mixfast/mix_api.h) checks
// them, then the CPU kernels run, or the CUDA ones once a device is known to be there.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "mixfast/binding.h"
#include "mixfast/mix_api.h"

namespace py = pybind11;
using namespace mixfast;
using binding::bind_struct;
using binding::launch_cuda;

namespace {

// `<name>_cpu(args)` and `<name>_cuda(args, stream)`, where `stream` is
// torch.cuda.current_stream().cuda_stream.
template <typename Args>
void def_cpu_and_cuda(py::module_& m, const std::string& name, void (*cpu)(const Args&),
                      void (*cuda)(const Args&, uintptr_t), const char* doc) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  const std::string on_cpu = name + "_cpu", on_cuda = name + "_cuda";
  m.def(
      on_cpu.c_str(), [cpu, op = on_cpu](const Args& a) { cpu(checked(op.c_str(), a)); }, py::arg("args"), nogil,
      doc);
  m.def(
      on_cuda.c_str(),
      [cuda, op = on_cuda](const Args& a, uintptr_t stream) {
        launch_cuda(op.c_str(), cuda, checked(op.c_str(), a), stream);
      },
      py::arg("args"), py::arg("stream"), nogil, doc);
}

void make_masks_cpu(const MaskSpec& spec, int n, uintptr_t out, int num_threads) {
  const auto masks = reinterpret_cast<uint8_t*>(out);  // NOLINT: addresses come from torch tensors
  check_make_masks("make_masks_cpu", spec, n, masks);
  cpu::make_masks(spec, n, masks, num_threads < 1 ? 1 : num_threads);
}

void make_masks_cuda(const MaskSpec& spec, int n, uintptr_t out, uintptr_t stream) {
  const auto masks = reinterpret_cast<uint8_t*>(out);  // NOLINT: addresses come from torch tensors
  check_make_masks("make_masks_cuda", spec, n, masks);
  launch_cuda("make_masks_cuda", MIXFAST_CUDA_LAUNCHER(cuda::make_masks), spec, n, masks, stream);
}

}  // namespace

void bind_mix(py::module_& m) {
  bind_struct<MaskSpec>(m, "MaskSpec", "Mask generator parameters (mixfast/block_mask.h), from reference.mask_spec",
                        MIXFAST_FIELD(MaskSpec, grid), MIXFAST_FIELD(MaskSpec, kind), MIXFAST_FIELD(MaskSpec, num),
                        MIXFAST_FIELD(MaskSpec, min_patches), MIXFAST_FIELD(MaskSpec, threshold24),
                        MIXFAST_FIELD(MaskSpec, key0), MIXFAST_FIELD(MaskSpec, key1));
  bind_struct<ImageGeometry>(m, "ImageGeometry", "[N, C, H, W], dtype code, NCHW or NHWC",
                             MIXFAST_FIELD(ImageGeometry, N), MIXFAST_FIELD(ImageGeometry, C),
                             MIXFAST_FIELD(ImageGeometry, H), MIXFAST_FIELD(ImageGeometry, W),
                             MIXFAST_FIELD(ImageGeometry, dtype), MIXFAST_FIELD(ImageGeometry, channels_last));
  bind_struct<MaskSource>(m, "MaskSource", "Given masks (uint8 [n, g, g]) or a spec to generate them into out",
                          MIXFAST_FIELD(MaskSource, given), MIXFAST_FIELD(MaskSource, out),
                          MIXFAST_FIELD(MaskSource, n), MIXFAST_FIELD(MaskSource, grid),
                          MIXFAST_FIELD(MaskSource, spec));
  bind_struct<MixArgs>(m, "MixArgs", "Arguments of mix_cpu / mix_cuda (see mixfast/mix_api.h)",
                       MIXFAST_FIELD(MixArgs, geo), MIXFAST_FIELD(MixArgs, x), MIXFAST_FIELD(MixArgs, x_batch_stride),
                       MIXFAST_FIELD(MixArgs, perm), MIXFAST_FIELD(MixArgs, filler),
                       MIXFAST_FIELD(MixArgs, filler_batch_stride), MIXFAST_FIELD(MixArgs, perm_is_flip),
                       MIXFAST_FIELD(MixArgs, masks), MIXFAST_FIELD(MixArgs, mixed),
                       MIXFAST_FIELD(MixArgs, switch_out), MIXFAST_FIELD(MixArgs, lam),
                       MIXFAST_FIELD(MixArgs, num_threads));
  bind_struct<UnmixArgs>(m, "UnmixArgs", "Arguments of unmix_cpu / unmix_cuda (see mixfast/mix_api.h)",
                         MIXFAST_FIELD(UnmixArgs, geo), MIXFAST_FIELD(UnmixArgs, x),
                         MIXFAST_FIELD(UnmixArgs, x_batch_stride), MIXFAST_FIELD(UnmixArgs, mixup),
                         MIXFAST_FIELD(UnmixArgs, lam), MIXFAST_FIELD(UnmixArgs, mu), MIXFAST_FIELD(UnmixArgs, y1),
                         MIXFAST_FIELD(UnmixArgs, y2), MIXFAST_FIELD(UnmixArgs, x1), MIXFAST_FIELD(UnmixArgs, x2),
                         MIXFAST_FIELD(UnmixArgs, out), MIXFAST_FIELD(UnmixArgs, num_threads));
  bind_struct<MixUnmixArgs>(m, "MixUnmixArgs", "MixMask (mix) and Un-Mix (unmix) from one pass over x",
                            MIXFAST_FIELD(MixUnmixArgs, mix), MIXFAST_FIELD(MixUnmixArgs, unmix));

  def_cpu_and_cuda<MixArgs>(m, "mix", &cpu::mix, MIXFAST_CUDA_LAUNCHER(cuda::mix),
                            "MixMask: mixed and switch images and lam per mask.");
  def_cpu_and_cuda<UnmixArgs>(m, "unmix", &cpu::unmix, MIXFAST_CUDA_LAUNCHER(cuda::unmix),
                              "Un-Mix with the flip partner: mixup or CutMix box.");
  def_cpu_and_cuda<MixUnmixArgs>(m, "mix_and_unmix", &cpu::mix_and_unmix, MIXFAST_CUDA_LAUNCHER(cuda::mix_and_unmix),
                                 "mix and unmix of one batch from one pass over it.");

  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("make_masks_cpu", &make_masks_cpu, py::arg("spec"), py::arg("n"), py::arg("out"), py::arg("num_threads") = 1,
        nogil, "Write n masks (uint8 [n, g, g]) drawn from spec to the host buffer at address out.");
  m.def("make_masks_cuda", &make_masks_cuda, py::arg("spec"), py::arg("n"), py::arg("out"), py::arg("stream"), nogil,
        "Write n masks (uint8 [n, g, g]) drawn from spec to the device buffer at address out.");

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
        check_spec("block_candidate", spec);
        const BlockCandidate c = block_candidate(spec, sample, draw, rem);
        return py::make_tuple(c.h, c.w, c.top, c.left, c.fits);
      },
      "(h, w, top, left, fits) of one BEiT block attempt (mixfast/block_mask.h).");
}
