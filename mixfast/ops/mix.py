"""Mask generation + permuted mixing + switch + λ, and Un-Mix: public entry points.

Dispatches to a backend (see _backend.py). Until native kernels land, every call runs the
reference implementation.
"""

from mixfast.ops.reference import make_masks, mix, rand_bbox, unmix, upsample_masks

__all__ = ["make_masks", "mix", "rand_bbox", "unmix", "upsample_masks"]
