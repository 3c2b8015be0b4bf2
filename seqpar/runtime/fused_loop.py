"""A kept-sequential chain's step compiled by inductor once and called per step: the "fused" loop.

The rolled loop (:mod:`.rolled`) runs the step's aten ops one eager kernel
each: for a wide elementwise step (Mamba's ``s = exp(A dt_l) * s + dt_l B_l
x_l`` on 24576 values, its producers moved into the step by
:mod:`seqpar.passes.absorb`) that is one pass over memory per op and per step.
Here the packed step ``s_l = f(s_{l-1}, x_l, *shared)`` (``(N, w)`` states,
one position's per-step inputs) is traced to its functional aten graph once,
compiled by inductor (``compile_fx``: one fused kernel for the pointwise ops,
no guards), and called ``L`` times, each call writing ``s_l`` into row ``l``
of the op's state buffer:

    for l in range(start, L):
        step(s, x_l..., shared..., out[l - start])   # out[l - start] = f(s, x_l, shared)
        s = out[l - start]

Compiled per layout (shapes, strides, dtypes and device of one call's
arguments), kept with the program's traced step, at most
:data:`MAX_LAYOUTS` per step; a per-step input whose rows differ in layout,
a compile that fails or one layout too many runs the rolled loop instead
(``None``; the reason is logged once); so does a call where the step's
trace is not recorded (the first call of an inductor graph runs its ops
under aot_autograd's aliasing check: :class:`~.rolled.UnrecordedTrace`),
which compiles it at the next call. The states round like inductor's
code, not eager's kernels: the policy chooses this loop only for chains the
probe found contractive (``loop="fused"``), like the compiled C loop.
"""

from __future__ import annotations

import logging
import weakref

import torch
import torch.fx as fx

from torch._inductor.compile_fx import compile_fx

from .rolled import UnrecordedTrace, trace_step

log = logging.getLogger("seqpar.runtime")

_aten = torch.ops.aten
# Layouts compiled per traced step at most (a chain of static shapes sees one).
MAX_LAYOUTS = 4

_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def run_into(program, state: torch.Tensor, columns, shared, start: int, out: torch.Tensor) -> torch.Tensor | None:
    """``out[l - start] = s_{l+1}`` for ``l = start .. L - 1`` from ``state`` (``s_start``) by the compiled step;
    ``None`` (``out`` untouched) where the step has no compiled form for these arguments."""
    if not all(_rows_alike(column) for column in columns):
        return None
    step = _compiled(program, state, [column[start] for column in columns], shared, out[0])
    if step is None:
        return None
    s = state
    for position in range(start, program.length):
        row = out[position - start]
        step(s, *[column[position] for column in columns], *shared, row)
        s = row
    return out


def _rows_alike(column) -> bool:
    """Whether every row of a column has the layout of its first (rows of one tensor always have)."""
    if isinstance(column, tuple) and len(column) and column[0]._base is not None:
        return True  # unbind(0) of one tensor
    first = column[0]
    return all(row.shape == first.shape and row.stride() == first.stride() and row.dtype == first.dtype
               and row.device == first.device for row in column)


def _layout(tensors) -> tuple:
    return tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)


def _compiled(program, state, x_leaves, shared, out_row):
    """The compiled step for arguments laid out like these (compiled at their first call), or ``None``."""
    compiled = _COMPILED.setdefault(program.lowered, {})
    key = _layout([state, *x_leaves, *shared, out_row])
    if key not in compiled:
        if len(compiled) >= MAX_LAYOUTS:
            log.info("seqpar: fused loop of %d steps: more than %d input layouts; the rolled loop runs",
                     program.length, MAX_LAYOUTS)
            return None
        try:
            compiled[key] = _compile(program, state, x_leaves, shared, out_row)
        except UnrecordedTrace:  # this call's dispatch context, not the step: compiled at the next call
            return None
    return compiled[key]


def _compile(program, state, x_leaves, shared, out_row):
    try:
        with torch._guards.tracing(None), torch.no_grad():  # outside the caller's tracing context
            graph_module = writing_step(trace_step(program, state, x_leaves, shared))
            return compile_fx(graph_module, [state, *x_leaves, *shared, out_row])
    except UnrecordedTrace:
        raise
    except Exception as error:  # the rolled loop runs the step instead
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        log.info("seqpar: fused loop of %d steps not compiled (%s: %s); the rolled loop runs",
                 program.length, type(error).__name__, first_line)
        return None


def writing_step(traced: fx.GraphModule) -> fx.GraphModule:
    """``traced`` (placeholders ``s, x.., shared..``, one output) as a flat graph with one more placeholder ``out``
    that the step's result is copied into; returns nothing."""
    graph = fx.Graph()
    env = {}
    for node in traced.graph.find_nodes(op="placeholder"):
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)
    out = graph.placeholder("out")
    result = graph.graph_copy(traced.graph, env)
    if isinstance(result, (list, tuple)):
        (result,) = result
    graph.call_function(_aten.copy_.default, (out, result))
    graph.output(())
    return fx.GraphModule(traced, graph)
