"""Triton kernels of mixfast's ops, one module per op (as ``mixfast/ops``), with ``layout`` (image
layout helpers shared with the ops; torch only) and ``aot`` (launch descriptions, compiled
ahead of time for a GPU in the tests). A leaf package: nothing here imports ``mixfast``.

Import them lazily (mixfast/ops/*.py do): on a machine without a GPU, Triton runs kernels
only in its interpreter, and ``TRITON_INTERPRET=1`` must be set before a kernel module is
imported (the ``@triton.jit`` decorator reads it).
"""
