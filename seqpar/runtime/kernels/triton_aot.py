"""Every Triton kernel seqpar ships, compiled ahead of time for a GPU that is not here.

Triton compiles without a device: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``
lowers a kernel to PTX and runs the ``ptxas`` of the Triton wheel on it. This module

1. enumerates every specialisation the dispatcher can launch: it runs the dispatcher itself
   (:func:`seqpar.runtime.kernels.triton_pcr.solve_chunked`) on meta tensors with a launcher that
   records :func:`~seqpar.runtime.kernels.triton_pcr.launch_arguments` instead of launching, over
   every kind, direction, operand dtype pair and supported width, and keeps one launch per
   distinct choice (pointer dtypes, constexprs, ``num_warps``);
2. compiles each for a :class:`~triton.backends.compiler.GPUTarget` the way a launch would (Triton's
   own argument binder gives the signature, constexprs and alignment attributes) and reads the
   registers and spills from ``ptxas -v``, the shared memory from the compiled metadata.

The kernels must be real ``JITFunction`` s: under ``TRITON_INTERPRET=1`` (the CPU test suite)
``triton.jit`` builds interpreter functions, so compile in a process without it::

    python -m seqpar.runtime.kernels.triton_aot --target sm_80 --target sm_90

Integer arguments (``L``, ``K``, ``D``, ``V``) are specialised by Triton on their values (``== 1``,
a multiple of 16); a specialisation is compiled with the integers of the first launch that chose
it, and pointers as 16-byte aligned (whole tensors from the caching allocator).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import re
import sys
import time

import torch

from ..spec import DENSE_WIDTH, JACOBIAN_KINDS
from . import triton_pcr

try:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, MockTensor, create_function_from_signature
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

TARGETS = {"sm_80": ("cuda", 80, 32), "sm_90": ("cuda", 90, 32)}
"""The targets seqpar is compiled for: A100 (sm_80) and H100/H200 (sm_90)."""

HALF_DTYPES = (torch.float16, torch.bfloat16)
OPERAND_DTYPES = tuple(
    [(dtype, dtype) for dtype in (torch.float32, torch.float64, *HALF_DTYPES)]
    + [(dtype, torch.float32) for dtype in HALF_DTYPES]
)
"""``(A dtype, c dtype)`` pairs that reach the solve: one dtype for both (the adjoint, Newton on
float32/float64 states), or Jacobians in the state's half dtype with the residual in float32
(Newton on half states, :func:`seqpar.runtime.newton._update`)."""

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
_POINTERS = ("A", "c", "h", "out", "P")


@dataclasses.dataclass(frozen=True)
class Specialisation:
    """One compiled variant of a kernel: ``kernel[grid](*args, **meta)`` as the dispatcher launches it.

    ``args`` holds :class:`~triton.runtime.jit.MockTensor` s for the pointers (their dtype is
    all that is compiled in) and the integers of a launch that chose this variant.
    """

    kernel: str
    label: str
    fn: object
    args: tuple
    meta: dict


@dataclasses.dataclass
class CompileResult:
    """The outcome of compiling one :class:`Specialisation` for one target.

    ``error`` is ``None`` on success; registers per thread and spill bytes are ``ptxas -v``'s,
    ``shared`` (bytes) the compiled kernel's metadata; ``None`` where compilation failed.
    """

    kernel: str
    label: str
    target: str
    error: str | None
    registers: int | None
    spill_stores: int | None
    spill_loads: int | None
    shared: int | None
    seconds: float

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads)


def unavailable_reason() -> str | None:
    """Why nothing can be compiled here (``None`` when it can): Triton, its ptxas, or interpreter mode."""
    if triton is None:
        return "triton is not installed"
    if not isinstance(triton_pcr._chunk_kernel, JITFunction):
        return ("the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at import); "
                "compile in a process without it: python -m seqpar.runtime.kernels.triton_aot")
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(80)
    except Exception as error:  # noqa: BLE001 - any failure to find ptxas means: cannot compile
        return f"triton's ptxas is missing: {error}"
    return None


def pcr_label(args, meta) -> str:
    """The name of a ``_chunk_kernel`` launch's specialisation (every choice it compiles in, pointer
    dtypes included), from :func:`~seqpar.runtime.kernels.triton_pcr.launch_arguments`' ``args, meta``."""
    kind = JACOBIAN_KINDS[meta["KIND"]]
    pointers = " ".join(f"{name}={_DTYPE_NAMES[tensor.dtype]}" for name, tensor in zip(_POINTERS, args))
    return (f"{kind} {'reverse' if meta['REVERSE'] else 'forward'} {'summary' if meta['SUMMARY'] else 'solve'} "
            f"{pointers} BLOCK={meta['BLOCK']} CHUNK={meta['CHUNK']} USE_DOT={int(meta['USE_DOT'])} "
            f"ACC={meta['ACC']} warps={meta['num_warps']}")


def _pcr_specialisations() -> list[Specialisation]:
    """Every launch of ``triton_pcr._chunk_kernel`` the dispatcher can choose.

    For each kind, direction and :data:`OPERAND_DTYPES` pair, ``solve_chunked`` runs on meta tensors
    at every width that gives a distinct ``BLOCK`` (full: ``w = 1 .. DENSE_WIDTH``, one batch element;
    diag and identity: ``N w = 1 .. CHANNEL_BLOCK + 1`` channels) and at two lengths: one chunk (a
    single pass writing ``c``'s dtype) and ``C^2 + 1`` steps (summary and final passes at the top
    level in ``c``'s dtype and at the levels below in the accumulation dtype, then a single pass).
    """
    found: dict[str, Specialisation] = {}

    def record(A, c, incoming, out, maps, kind, reverse, chunk, *, summary):
        grid, args, meta = triton_pcr.launch_arguments(A, c, incoming, out, maps, kind, reverse, chunk,
                                                       summary=summary)
        label = pcr_label(args, meta)
        if label not in found:
            mocks = tuple(MockTensor(tensor.dtype) for tensor in args[:5])
            found[label] = Specialisation("triton_pcr._chunk_kernel", label, triton_pcr._chunk_kernel,
                                          mocks + tuple(args[5:]), meta)

    for kind in JACOBIAN_KINDS:
        chunk = triton_pcr.DEFAULT_CHUNK[kind]
        widths = range(1, DENSE_WIDTH + 1) if kind == "full" else range(1, triton_pcr.CHANNEL_BLOCK + 2)
        for reverse in (False, True):
            for a_dtype, c_dtype in OPERAND_DTYPES:  # identity: A is None, repeats drop out
                for width in widths:
                    for length in (chunk * chunk + 1, 1):  # the deepest level first: L = 2, not 1
                        c = torch.empty((length, 1, width) if kind == "full" else (length, width, 1),
                                        dtype=c_dtype, device="meta")
                        A = {"full": torch.empty((*c.shape, c.shape[-1]), dtype=a_dtype, device="meta"),
                             "diag": torch.empty(c.shape, dtype=a_dtype, device="meta"),
                             "identity": None}[kind]
                        triton_pcr.solve_chunked(A, c, kind, reverse, launch=record)
    return list(found.values())


# Every kernel module and its enumeration. A module that is removed loses its one line here.
KERNELS = {
    "triton_pcr._chunk_kernel": _pcr_specialisations,
}


def specialisations(kernels=None) -> list[Specialisation]:
    """The specialisations of ``kernels`` (names of :data:`KERNELS`; default all)."""
    return [spec for name in (kernels or KERNELS) for spec in KERNELS[name]()]


def representative(specs: list[Specialisation]) -> list[Specialisation]:
    """One specialisation per code path: per kernel and choice of ``KIND``, ``REVERSE``, ``SUMMARY``,
    ``USE_DOT`` and ``ACC``, the one with the most distinct pointer dtypes (the most conversions) at
    the ``BLOCK`` most launches take: :data:`~seqpar.runtime.kernels.triton_pcr.CHANNEL_BLOCK`
    channels (diag, identity), 16 (full: the narrowest ``tl.dot`` tile)."""
    chosen: dict[tuple, Specialisation] = {}
    for spec in specs:
        meta = spec.meta
        if meta["BLOCK"] != (16 if meta["KIND"] == triton_pcr.FULL.value else triton_pcr.CHANNEL_BLOCK):
            continue
        key = (spec.kernel, *(str(meta[name]) for name in ("KIND", "REVERSE", "SUMMARY", "USE_DOT", "ACC")))
        conversions = len({arg.dtype for arg in spec.args[:5]})
        if key not in chosen or conversions > len({arg.dtype for arg in chosen[key].args[:5]}):
            chosen[key] = spec
    return list(chosen.values())


_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_specialisation(spec: Specialisation, target: str) -> CompileResult:
    """Compile ``spec`` for ``target`` (a key of :data:`TARGETS`) as its launch would, never from
    Triton's cache (so that ``ptxas -v`` runs and the seconds are a real compile's)."""
    gpu = GPUTarget(*TARGETS[target])
    fn = spec.fn
    start = time.perf_counter()
    log = io.StringIO()
    try:
        backend = make_backend(gpu)
        kwargs = dict(spec.meta, debug=fn.debug or knobs.runtime.debug,
                      instrumentation_mode=knobs.compilation.instrumentation_mode,
                      fpsan_homomorphic_casts=knobs.compilation.fpsan_homomorphic_casts)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*spec.args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        source = ASTSource(fn, signature, constexprs, attrs)
        with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.compilation.always_compile = True
            knobs.nvidia.dump_ptxas_log = True
            kernel = triton.compile(source, target=gpu, options=options.__dict__)
    except Exception as error:  # noqa: BLE001 - a compile error is the result being reported
        message = f"{type(error).__name__}: {error}".strip()
        return CompileResult(spec.kernel, spec.label, target, message, None, None, None, None,
                             time.perf_counter() - start)
    seconds = time.perf_counter() - start
    registers = _REGISTERS.search(log.getvalue())
    spills = _SPILLS.search(log.getvalue())
    return CompileResult(
        spec.kernel, spec.label, target, None,
        int(registers.group(1)) if registers else None,
        int(spills.group(1)) if spills else None,
        int(spills.group(2)) if spills else None,
        kernel.metadata.shared, seconds,
    )


_WORK: list = []  # the (spec, target) pairs of iter_compile, inherited by forked workers


def _compile_item(index):
    return compile_specialisation(*_WORK[index])


def iter_compile(specs: list[Specialisation], targets=tuple(TARGETS), jobs: int = 1):
    """:func:`compile_specialisation` of every spec for every target, in order, in ``jobs`` forked processes."""
    _WORK[:] = [(spec, target) for spec in specs for target in targets]
    try:
        if jobs <= 1:
            yield from map(_compile_item, range(len(_WORK)))
            return
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            yield from pool.imap(_compile_item, range(len(_WORK)), chunksize=1)
    finally:
        _WORK.clear()


def main(argv=None) -> int:
    """Compile and print the results as JSON lines; exit status 1 when any compile failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), help="default: all")
    parser.add_argument("--subset", choices=("all", "representative"), default="all")
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason is not None:
        print(json.dumps({"unavailable": reason}))
        return 2
    specs = specialisations()
    if args.subset == "representative":
        specs = representative(specs)
    failed = False
    for result in iter_compile(specs, tuple(args.target or TARGETS), args.jobs):
        print(json.dumps(dataclasses.asdict(result)), flush=True)
        failed = failed or result.error is not None
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
