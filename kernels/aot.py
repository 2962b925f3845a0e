"""Kernel launches as values, compiled ahead of time for a CUDA GPU without one.

The host wrappers describe each launch as a :class:`Launch` (kernel, grid, arguments) and
then run it. :func:`compile_launch` gives those same arguments to Triton's own argument
binder, the one ``kernel[grid](...)`` uses, so the signature (i32 or i64 per integer,
pointer alignment, the ``== 1`` and divisibility-by-16 value specializations) and the
constexprs of an ahead-of-time compile are what a launch on a GPU would compile: a test
that compiles the wrappers' launches cannot drift from what they launch.
:func:`specialization_key` is the key under which Triton caches that compile: two launches
with different keys compile twice. :func:`resource_usage` reads registers, stack frame
and spills from ``ptxas -v``.

These use Triton internals (``create_function_from_signature``, ``JITFunction._pack_args``,
``compute_cache_key``) as of Triton 3.9; kernels must be defined outside the interpreter.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WARP_SIZE = 32


@dataclass(frozen=True)
class Launch:
    """``kernel[grid](*args, **kwargs)``, recorded so it can be run or compiled for a GPU."""

    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict = field(default_factory=dict)

    def __call__(self):
        return self.kernel[self.grid](*self.args, **self.kwargs)


def _bind(launch: Launch, arch: int):
    """Triton's binder on the launch's arguments, as ``JITFunction.run`` calls it."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    fn = launch.kernel
    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{fn} is not a compiled-mode Triton kernel (was TRITON_INTERPRET=1 set at import?)")
    target = GPUTarget("cuda", arch, WARP_SIZE)
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    # compile options that exist only in some Triton versions (3.9 here, 3.6 on the GPU machine): passed as
    # JITFunction.run passes them, where this Triton has them
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    return fn, target, backend, kwargs, bound_args, specialization, options


def specialization_key(launch: Launch, arch: int = 90) -> str:
    """The key Triton's kernel cache files this launch under (its specialization and options)."""
    from triton.runtime.jit import compute_cache_key

    *_, specialization, options = _bind(launch, arch)
    return compute_cache_key({}, specialization, options)


def compile_launch(launch: Launch, arch: int):
    """Compile the kernel exactly as this launch would on a CUDA GPU of compute capability
    ``arch`` (80, 90, ...); returns Triton's CompiledKernel (``.asm["ptx"]``, ``.metadata``)."""
    import triton
    from triton.compiler import ASTSource

    fn, target, backend, kwargs, bound_args, specialization, options = _bind(launch, arch)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def resource_usage(compiled) -> dict:
    """Per-thread resources of a compiled kernel: ``registers``, ``stack`` (bytes of stack
    frame), ``spill_stores`` and ``spill_loads`` (bytes), read from ``ptxas -v`` run on its
    PTX with the ptxas and the flags Triton's own PTX-to-cubin step uses."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    meta = compiled.metadata
    arch = meta.target.arch
    flags = ["-v", "-lineinfo", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}"]
    if not meta.enable_fp_fusion:
        flags.append("--fmad=false")
    if meta.ptx_options:
        flags += meta.ptx_options.split(" ")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        proc = subprocess.run([get_ptxas(arch).path, *flags, str(ptx), "-o", str(Path(tmp) / "kernel.cubin")],
                              capture_output=True, text=True, check=True)
    return parse_ptxas_log(proc.stdout + proc.stderr)


def parse_ptxas_log(log: str) -> dict:
    """``ptxas -v`` output of one kernel -> registers, stack, spill_stores, spill_loads."""
    stack, regs = _PTXAS_STACK.findall(log), _PTXAS_REGS.findall(log)
    if len(stack) != 1 or len(regs) != 1:
        raise RuntimeError(f"expected the resource lines of one kernel in ptxas -v output, got:\n{log}")
    frame, stores, loads = map(int, stack[0])
    return {"registers": int(regs[0]), "stack": frame, "spill_stores": stores, "spill_loads": loads}
