"""mixfast ops: mask generation, image mixing, occlusion by learned masks and the soft InfoNCE loss.

The names below are the public API. Each lives in its own module (`mix.py`, `infonce.py`)
that dispatches to a backend (`_backend.py`: MIXFAST_BACKEND=auto|cuda|triton|cpu|torch);
`reference.py` holds the pure-PyTorch implementations that are the specification every
backend is tested against.
"""

from mixfast.ops.infonce import soft_infonce
from mixfast.ops.occlude import occlude
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
    "upsample_masks",
]
