"""Triton kernels of mixfast's ops, one module per op (DESIGN.md).

Import them lazily (mixfast/ops/*.py do): on a machine without a GPU, Triton runs kernels
only in its interpreter, and ``TRITON_INTERPRET=1`` must be set before a kernel module is
imported (the ``@triton.jit`` decorator reads it).
"""
