"""A kept-sequential chain's step compiled by inductor once and called per step: the "fused" loop.

The rolled loop (:mod:`.rolled`) runs the step's aten ops one eager kernel
each: for a wide elementwise step (Mamba's ``s = exp(A dt_l) * s + dt_l B_l
x_l`` on 24576 values, its producers moved into the step by
:mod:`seqpar.passes.absorb`) that is one pass over memory per op and per step.
Here the packed step ``s_l = f(s_{l-1}, x_l, *shared)`` (``(N, w)`` states,
one position's per-step inputs) is traced once to aten ops after inductor's
decompositions, with its result copied into an output argument, compiled by
inductor's inner compiler (``compile_fx_inner``: one fused kernel for the
pointwise ops, the copy stored in place, no guards and no aot_autograd
wrapper: about 3 us a call less than ``compile_fx``), and called ``L`` times,
each call writing ``s_l`` into row ``l`` of the op's state buffer:

    for l in range(start, L):
        step([s, x_l..., shared..., out[l - start]])   # out[l - start] = f(s, x_l, shared)
        s = out[l - start]

Which loop runs is measured, per program: the first calls alternate the
compiled step and the rolled loop's generated code of eager's kernels
(:data:`SAMPLES` timed calls each, :class:`~.trial.Trial`), and the faster by
its fastest call runs from then on (a step of two ops, ``tanh(s W^T + b)``,
loses to eager's two calls: the compiled call costs more than it saves; a
hand-written LSTM cell of a dozen ops, or Mamba's wide elementwise step,
wins). Compiled per layout (shapes, strides, dtypes and device of one call's
arguments), kept with the program's traced step, at most :data:`MAX_LAYOUTS`
per step. The generated loop runs, untimed, where the step has no compiled
form: a per-step input whose rows differ in layout, a step that writes in
place or draws random numbers (eager's order and random stream are kept), a
compile that fails (the reason is logged once), one layout too many, or a
call where the step's trace is not recorded (the first call of an inductor
graph runs its ops under aot_autograd's aliasing check:
:class:`~.rolled.UnrecordedTrace`; compiled at the next call). The compiled
step's states round like inductor's code, not eager's kernels: the policy
builds programs with ``loop="fused"`` only for chains the probe found
contractive, like the compiled C loop.
"""

from __future__ import annotations

import itertools
import logging
import time
import weakref

import torch
import torch.fx as fx

from .errors import brief
from .rolled import UnrecordedTrace, check_recorded, draws_random, may_mutate
from .tracing import make_fx, one_at_a_time
from .trial import Trial, synchronize

log = logging.getLogger("seqpar.runtime")

_aten = torch.ops.aten
# Layouts compiled per traced step at most (a chain of static shapes sees one).
MAX_LAYOUTS = 4

# Timed calls of each loop before the faster is kept.
SAMPLES = 2
FUSED, GENERATED = "fused", "generated"

_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # program -> {layout: compiled step}
_TRIALS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # program -> Trial of the two loops
# program -> (the states buffer, its version, the per-step outputs computed with it) until chain_outputs takes them
_SERVED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
clock = time.perf_counter  # what the trial times with (tests replace it)
_LATER = object()  # no compiled step at this call; one at a later call


def run_into(program, state: torch.Tensor, columns, shared, start: int, out: torch.Tensor, generated) -> str | None:
    """``out[l - start] = s_{l+1}`` for ``l = start .. stop - 1`` from ``state`` (``s_start``; ``stop = start +
    len(out)``, at most ``L``); returns how: ``"fused"`` (the compiled step) or ``"generated"``
    (``generated(state, columns, shared, start, stop, out)``, the rolled loop's ``run_into``, or ``None`` where it
    has none), as the program's trial chose, or ``None`` where neither ran. The compiled step also writes the
    per-step outputs where ``out`` takes the whole chain (:func:`served_outputs`).

    The first calls alternate the two (:data:`SAMPLES` each, timed per step: the calls of a chain run in blocks
    differ in length); the faster by its fastest step runs from then on. A call where the step has no compiled
    form runs the generated loop, untimed; a rolled loop without a generated loop after its first call leaves the
    compiled step (the graph's speed trial still times the whole)."""
    trial = _TRIALS.get(program)
    if trial is None:
        trial = _TRIALS[program] = Trial(FUSED, GENERATED, SAMPLES)
    form = trial.kept or trial.next_form()
    if form == GENERATED and generated is None:  # the rolled loop has no such loop
        if trial.times[FUSED]:  # not at the first call either: nothing to time the compiled step against
            trial.kept = FUSED
        form = FUSED
    timed = trial.kept is None
    # The outputs are served against the states buffer's version: an inference tensor has none to check.
    steps = len(out)
    whole = start == 0 and steps == program.length
    outputs = _output_buffers(program, out) if form == FUSED and whole and not out.is_inference() else []
    if form == FUSED and state.stride() != out[0].stride():  # an expanded or transposed initial state
        state = torch.empty_strided(out[0].shape, out[0].stride(), dtype=out.dtype, device=out.device).copy_(state)
    step = _compiled_for(program, state, columns, shared, start, out, outputs) if form == FUSED else None
    if form == FUSED and (step is None or step is _LATER):
        if step is None:
            trial.kept = GENERATED  # no compiled form: nothing to time
        if generated is None:
            return None
        form, timed = GENERATED, False
    if timed:
        synchronize(state.device)
    begin = clock()
    if form == FUSED:
        # Each step's arguments from views made at once (unbind), not indexed per step: ~1 us a step less.
        inputs = zip(*(column[start:] for column in columns)) if columns else itertools.repeat((), steps)
        s = state
        for x_row, row, *y_rows in zip(inputs, out.unbind(0), *(y.unbind(0) for y in outputs)):
            step([s, *x_row, *shared, row, *y_rows])
            s = row
        if outputs:
            _SERVED[program] = (weakref.ref(out), out._version, outputs)
    else:
        generated(state, columns, shared, start, start + steps, out)
    if timed:
        synchronize(state.device)
        trial.add(form, (clock() - begin) / steps)
        if trial.kept is not None:
            log.info("seqpar: chain of %d steps: the %s loop kept (fastest step: fused %.3g us, generated %.3g us)",
                     program.length, trial.kept, trial.fastest(FUSED) * 1e6, trial.fastest(GENERATED) * 1e6)
    return form


def _output_buffers(program, out: torch.Tensor) -> list[torch.Tensor]:
    """Buffers for the program's per-step outputs ``Y^j`` ``(L, *y^j shape)``, which the compiled step writes too
    (none where the program has no per-step outputs)."""
    if program.outputs is None:
        return []
    return [out.new_empty(shape, dtype=dtype) for shape, dtype in program.output_shapes]


def served_outputs(program, states: torch.Tensor) -> list[torch.Tensor] | None:
    """The per-step outputs the fused loop computed while it wrote ``states`` (the op ``chain_outputs`` then
    returns them instead of evaluating ``g`` again), once; ``None`` where ``states`` is not that unchanged buffer."""
    entry = _SERVED.pop(program, None)
    if entry is None:
        return None
    written, version, outputs = entry
    return outputs if written() is states and states._version == version else None


def deciding(program) -> bool:
    """Whether ``program``'s loop trial has started and not decided (its calls' times still vary by loop)."""
    trial = _TRIALS.get(program)
    return trial is not None and trial.kept is None


def _compiled_for(program, state, columns, shared, start, out, outputs):
    """The compiled step for this call's arguments; ``None`` where it has none (rows of a column laid out
    differently, a step that is not compiled), :data:`_LATER` where it is compiled at a later call.

    Every call of the compiled step then sees the layouts it was compiled for (its size asserts are left out):
    the state it reads is the initial state once and a row of ``out`` after, so both must be laid out alike
    (:func:`run_into` copies an initial state laid out otherwise); on an accelerator every row must also share
    the first row's alignment (Triton specialises on 16-byte aligned pointers)."""
    aligned = state.device.type == "cpu" or all(
        _alignment(rows) for rows in (out.unbind(0), *(y.unbind(0) for y in outputs), *columns))
    if not aligned or not all(_rows_alike(column) for column in columns):
        return None
    return _compiled(program, state, [column[start] for column in columns], shared, [out[0], *(y[0] for y in outputs)])


def _rows_alike(column) -> bool:
    """Whether every row of a column has the layout of its first (rows of one tensor always have)."""
    if isinstance(column, tuple) and len(column) and column[0]._base is not None:
        return True  # unbind(0) of one tensor
    first = column[0]
    return all(row.shape == first.shape and row.stride() == first.stride() and row.dtype == first.dtype
               and row.device == first.device for row in column)


def _alignment(rows) -> bool:
    """Whether every row's data pointer has the first row's alignment to 16 bytes."""
    first = rows[0].data_ptr() % 16
    return all(row.data_ptr() % 16 == first for row in rows)


def _layout(tensors) -> tuple:
    """What a compiled step is specialised on: shapes, strides, dtypes, devices, and on accelerators each data
    pointer's alignment to 16 bytes (Triton assumes the example's)."""
    return tuple((tuple(t.shape), t.stride(), t.dtype, t.device, t.device.type != "cpu" and t.data_ptr() % 16)
                 for t in tensors)


def _compiled(program, state, x_leaves, shared, rows):
    """The compiled step for arguments laid out like these (compiled at their first call), or ``None``; ``rows``:
    the state's row of the buffer and one row of each per-step output's."""
    compiled = _COMPILED.setdefault(program, {})
    key = _layout([state, *x_leaves, *shared, *rows])
    if key not in compiled:
        if len(compiled) >= MAX_LAYOUTS:
            log.info("seqpar: fused loop of %d steps: more than %d input layouts; the rolled loop runs",
                     program.length, MAX_LAYOUTS)
            return None
        try:
            compiled[key] = _compile(program, [state, *x_leaves, *shared, *rows], len(x_leaves), len(rows) - 1)
        except UnrecordedTrace:  # this call's dispatch context, not the step: compiled at the next call
            return _LATER
    return compiled[key]


def _compile(program, arguments, n_inputs: int, n_outputs: int):
    # inductor's compiler is imported at the first compile: 0.7 s that `import seqpar` need not pay
    from torch._inductor.compile_fx import compile_fx_inner

    try:
        # outside the caller's tracing context; inductor's compile (its config patched) one at a time in the process
        with one_at_a_time, torch._guards.tracing(None), torch.no_grad():
            examples = [tensor.detach() for tensor in arguments]
            # No size asserts in the generated code (~2 us a step): _compiled_for calls it with these layouts only.
            with torch._inductor.config.patch(size_asserts=False):
                compiled = compile_fx_inner(writing_step(program, n_inputs, n_outputs, examples), examples)
            # One call through the wrapper (its first call ends inductor's compile bookkeeping: autotuning caches);
            # it writes the first step's values into the rows the loop writes first. Later calls go straight to the
            # generated code, about 1.2 us a step less.
            compiled(list(arguments))
            return getattr(compiled, "current_callable", None) or compiled
    except UnrecordedTrace:
        raise
    except Exception as error:  # the rolled loop runs the step instead
        log.info("seqpar: fused loop of %d steps not compiled (%s); the rolled loop runs", program.length,
                 brief(error))
        return None


def writing_step(program, n_inputs: int, n_outputs: int, examples) -> fx.GraphModule:
    """The packed step as a graph of aten ops after inductor's decompositions (what ``compile_fx`` hands its
    inner compiler), on flat inputs ``s, x_0 .., shared_0 .., out, y_1 .., y_J`` (``J = n_outputs``), writing its
    result into ``out`` and its per-step outputs into the ``y_j`` (``aten.copy_``, which inductor stores in
    place); raises ValueError for a step that writes in place or draws random numbers (eager's order and random
    stream are kept), :class:`~.rolled.UnrecordedTrace` where the trace was not recorded."""
    n_shared = len(examples) - 2 - n_inputs - n_outputs

    def step_into(s, *rest):
        x, shared, out, ys = (rest[:n_inputs], rest[n_inputs : n_inputs + n_shared], rest[n_inputs + n_shared],
                              rest[n_inputs + n_shared + 1 :])
        new = program.step_packed(s, list(x), list(shared))
        out.copy_(new)
        if ys:
            values = program.outputs_packed(new if program.outputs_at_next else s, list(x), list(shared))
            for y, value in zip(ys, values):
                y.copy_(value)
        return ()

    from torch._inductor.decomposition import select_decomp_table  # at first use, as compile_fx_inner

    traced = make_fx(step_into, tracing_mode="fake", decomposition_table=select_decomp_table())(*examples)
    check_recorded(traced)
    written = list(traced.graph.find_nodes(op="placeholder"))[-1 - n_outputs :]
    for node in traced.graph.nodes:
        writes = node.op == "call_function" and node.target is _aten.copy_.default and node.args[0] in written
        if node.op == "call_function" and not writes and (may_mutate(node.target) or draws_random(node.target)):
            raise ValueError("the step writes in place or draws random numbers (eager's order and random stream "
                             "are kept)")
    return traced
