"""mixfast ops: mask generation, image mixing, occlusion by learned masks, the soft InfoNCE loss, and
MixedAE's group mixing and homologous TopK attention.

The names below are the public API. Each lives in its own module (`mix.py`, `infonce.py`)
that dispatches to a backend (`_backend.py`: MIXFAST_BACKEND=auto|cuda|triton|cpu|torch);
`reference.py` holds the pure-PyTorch implementations that are the specification every
backend is tested against.
"""

from mixfast.ops.infonce import soft_infonce
from mixfast.ops.group_mix import group_cell_map, group_mix
from mixfast.ops.occlude import occlude
from mixfast.ops.topk_attention import topk_accuracy, topk_attention
from mixfast.ops.mix import make_masks, make_masks_and_mix, mix, mix_and_unmix, rand_bbox, unmix, upsample_masks

__all__ = [
    "make_masks",
    "make_masks_and_mix",
    "mix",
    "mix_and_unmix",
    "unmix",
    "rand_bbox",
    "soft_infonce",
    "occlude",
    "group_cell_map",
    "group_mix",
    "topk_attention",
    "topk_accuracy",
    "upsample_masks",
]
