"""Fused soft-InfoNCE: public entry point.

Dispatches to a backend (see _backend.py). Until native kernels land, every call runs the
reference implementation.
"""

from mixfast.ops.reference import soft_infonce

__all__ = ["soft_infonce"]
