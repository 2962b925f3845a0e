"""mixfast ops: mask generation, image mixing and the soft InfoNCE loss.

The names below are the public API. Today they are the pure-PyTorch reference
implementations (:mod:`mixfast.ops.reference`), which are also the specification that
faster backends are tested against; backend dispatch will be added behind these same
names and signatures.
"""

from mixfast.ops.reference import (
    make_masks,
    mix,
    rand_bbox,
    soft_infonce,
    unmix,
    upsample_masks,
)

__all__ = ["make_masks", "mix", "unmix", "rand_bbox", "soft_infonce", "upsample_masks"]
