"""Make torchvision importable on a CPU-only torch.

The only torchvision wheel on PyPI for torch 2.13 is a CUDA build. Its C extension
(`_C_stable.so`) does not load against the CPU torch wheel, and torchvision's
``__init__`` then fails while registering fake kernels for ops (``torchvision::nms``,
``roi_align`` ...) whose schemas the extension would have defined.

We do not use those detection ops. When torch has no CUDA and the extension cannot be
loaded, we define the op *schemas only* (no kernels) so the registrations succeed;
calling one of those ops still raises "no kernel", which is the honest outcome. On a
CUDA build of torch (or when the extension loads) this module does nothing.
"""

from __future__ import annotations

import importlib.util
import os

import torch

# Schemas as declared by torchvision's csrc/ops/*.cpp (TORCH_LIBRARY_FRAGMENT(torchvision, m)).
_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, int sampling_ratio, bool aligned) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) -> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) -> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)

_LIBRARY = None  # keep the Library object alive: dropping it would unregister the schemas


def _torchvision_extension_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # torchvision absent: nothing to patch
    folder = spec.submodule_search_locations[0]
    lib = next((f for f in os.listdir(folder) if f.startswith("_C") and f.endswith(".so")), None)
    if lib is None:
        return False
    try:
        torch.ops.load_library(os.path.join(folder, lib))
        return True
    except (OSError, RuntimeError):
        return False


def patch_torchvision_for_cpu_torch() -> bool:
    """Define torchvision's op schemas when its C extension cannot load. Returns True if patched."""
    global _LIBRARY
    if _LIBRARY is not None or torch.version.cuda is not None:
        return False
    if _torchvision_extension_loads():
        return False
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    for schema in _TORCHVISION_SCHEMAS:
        _LIBRARY.define(schema)
    return True


patch_torchvision_for_cpu_torch()
