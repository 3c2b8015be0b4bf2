"""The ``seqpar`` torch.compile backend: options -> passes -> inner backend.

For every graph Dynamo hands over: copy it, find chains (``passes.detect``),
decide per chain (``passes.policy``, with the runtime's predictability probe),
replace the chosen chains by the runtime's chain op (``passes.rewrite``), and
compile the result with the inner backend (inductor by default). The backend
object records what it did (:class:`GraphRecord`) for ``seqpar.explain``, the
debug dump and tests. Registered through the ``torch_dynamo_backends`` entry
point as ``seqpar_backend``.

A rewritten graph whose call runs out of memory (``torch.OutOfMemoryError``)
hands the graph back: that call and every later one run the original graph
(the chains' reasons say so); an original graph that runs out of memory in
the speed trial ends the trial with the rewritten graph kept. Either only
where the stopped call left nothing a second run would see
(:func:`~seqpar.passes.rerun.rerun_hazard`); otherwise the error reaches the
caller, with the hazard in the log. On a CPU, where running out of memory
ends the process instead, the trial's original call of a differentiated graph
that might not fit runs under a guard that stops it first (:mod:`.memory`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx
from torch._dynamo import lookup_backend
from torch._dynamo.exc import RestartAnalysis, ShortenTraceback
from torch._inductor import list_mode_options
from torch._subclasses.fake_tensor import FakeTensorMode

from .debug import log, write_dump, write_hints
from .memory import headroom_guard, training_bound
from .options import Options, parse_options
from .passes import pipeline
from .passes.chain import Candidate
from .passes.effects import is_random
from .passes.glue import has_other_compute
from .passes.module_paths import span
from .passes.rerun import rerun_hazard
from .passes.tokens import example, target_name
from .report import ChainReport, format_table, hints_for
from .runtime import fused_loop
from .runtime.errors import brief
from .runtime.ops import call_state
from .runtime.precision import copied, in_float64
from .runtime.tracing import one_at_a_time
from .speed import ORIGINAL, REWRITTEN, SpeedTrial, differentiated, timed_call
from .verify import judge

_graph_counter = itertools.count()


@dataclass
class GraphRecord:
    """One compiled graph: its code before and after, its chains, verification results."""

    index: int
    original_code: str
    rewritten_code: str = ""
    chains: list[ChainReport] = field(default_factory=list)
    programs: list = field(default_factory=list)  # (ChainReport, ChainProgram) of rewritten chains
    calls: int = 0
    verification: list[str] = field(default_factory=list)
    fell_back: bool = False
    inner_error: str | None = None  # why the inner backend could not compile the graph (it then runs eagerly)
    speed: SpeedTrial | None = None  # the rewritten graph timed against the original (policy "auto")
    training_bound: int | None = None  # bytes a differentiated call of the original may hold (seqpar.memory)

    def table(self) -> str:
        return format_table(self.chains)


class SeqparBackend:
    """A torch.compile backend object; ``graphs`` lists what each call compiled."""

    def __init__(self, options: Options | dict | None = None):
        self.options = options if isinstance(options, Options) else parse_options(options)
        self.graphs: list[GraphRecord] = []

    @property
    def trials_running(self) -> bool:
        """Whether a compiled graph's speed trial (policy ``"auto"``, :mod:`seqpar.speed`) has not decided yet:
        until it has, calls alternate between the rewritten and the original graph (timings of the backend's
        steady state start after it)."""
        return any(record.speed is not None and record.speed.kept is None for record in self.graphs)

    def __call__(self, gm: fx.GraphModule, example_inputs):
        kept = []  # chains no size would rewrite, found at this call's sizes, of a graph with symbolic sizes
        if any(map(_symbolic, example_inputs)):
            kept = _chains_kept_at_every_size(gm, example_inputs, self.options)
            if kept is None:
                log.info("seqpar: Dynamo traced a graph with chains and symbolic sizes (a new batch size or "
                         "sequence length); seqpar solves chains of static shapes: the graph is compiled per "
                         "concrete shape at its first call with it")
                return PerShape(self, gm)
        gm.recompile()
        record = GraphRecord(index=next(_graph_counter), original_code=gm.code)
        self.graphs.append(record)
        work = pipeline.copy_graph_module(gm)
        records_autograd = differentiated(gm, example_inputs)
        result = pipeline.run(work, example_inputs, gm, self.options, records_autograd)
        if result.detection_error is not None:
            log.warning("seqpar: chain detection failed on graph %d (%s); compiled unchanged", record.index,
                        result.detection_error)
        record.chains += [_candidate_report(candidate) for candidate in result.candidates]
        # detection may not see through symbolic sizes what it saw at the call's sizes
        for outcome in result.outcomes or [_kept_at_every_size(outcome) for outcome in kept]:
            report = _chain_report(outcome)
            record.chains.append(report)
            if outcome.program is not None:
                record.programs.append((report, outcome.program))
                report.last_solve = _last_solve(outcome.program)
        record.rewritten_code = work.code
        for report in record.chains:
            log.info("seqpar graph %d: %s chain of %d (%s): %s", record.index, report.kind, report.length,
                     report.decision, report.reason)
        if record.programs and not has_other_compute(work):
            compiled = work.forward  # nothing left for the inner backend to compile: run the rewritten graph
        else:
            compiled = self._inner_compile(work, example_inputs, record)
        # Dynamo guards grad mode and the inputs' requires_grad: a graph compiled differentiated stays so.
        if record.programs and self.options.policy == "auto":
            record.speed = SpeedTrial(records_autograd, lambda summary: _decided(record, summary))
        write_dump(self.options.debug_dir, record)
        write_hints(self.options.debug_dir,
                    hints_for([chain for graph in self.graphs for chain in graph.chains], len(self.graphs)))
        return self._wrap(gm, compiled, record)

    def _inner_compile(self, work: fx.GraphModule, example_inputs, record: GraphRecord):
        """The inner backend's compilation of ``work``; where it fails (inductor in torch 2.13 rejects many
        ``scan`` calls), ``work`` itself, run eagerly, with the reason logged and recorded. Dynamo's requests to
        trace the frame again (``RestartAnalysis``) are no failure: they pass through, as from the inner backend
        alone."""
        mode = self.options.mode
        # inductor's mode is its config, as torch.compile applies it (``list_mode_options``)
        config = {} if mode == "default" else {"config_patches": list_mode_options(mode)}
        try:
            return lookup_backend(self.options.inner)(work, example_inputs, **config)
        except RestartAnalysis:  # Dynamo's own control flow (inductor asks it to re-trace with scalars as tensors)
            self.graphs.remove(record)  # the graph is traced again and comes back as a new one
            raise
        except Exception as error:
            if self.options.inner == "eager":
                raise
            record.inner_error = (f"inner backend {self.options.inner!r} failed ({brief(error)}); "
                                  "the graph runs eagerly")
            log.warning("seqpar graph %d: %s", record.index, record.inner_error)
            return work

    def _wrap(self, original: fx.GraphModule, compiled, record: GraphRecord):
        every = self.options.verify
        debug_dir = self.options.debug_dir
        # A second run of a graph that draws random numbers differs from the first: its outputs cannot be compared.
        random_node = next((node for node in original.graph.nodes if is_random(node)), None)

        def run(*args):
            record.calls += 1
            due = every and (record.calls == 1 or (every > 1 and record.calls % every == 0))
            trial = record.speed
            if record.fell_back or (trial is not None and trial.kept == ORIGINAL):
                return original(*args)
            if trial is not None:
                trial.next_call()
            # The chain ops' loop trials (fused_loop) decide first: until then the rewritten graph's time varies.
            timing = (trial is not None and trial.kept is None and record.calls > 1 and not due
                      and not any(fused_loop.deciding(program) for _, program in record.programs))
            if timing and trial.next_form() == ORIGINAL:
                ran, out = _original_in_trial(record, original, args)
                if ran:
                    return out
                timing = False  # the rewritten graph computes this call (the stopped one's frames released)
            if due:
                # the inputs as this call found them, for the graph check's reference runs
                before = copied(args) if record.programs and random_node is None else None
                for _, program in record.programs:
                    call_state(program).thread.check = _check_states
            try:
                if timing:
                    out, seconds = timed_call(compiled, args)
                    trial.timed(REWRITTEN, seconds, out)
                else:
                    out = compiled(*args)
            except torch.OutOfMemoryError as error:
                _hand_back(record, _rerun_reason(record, original, REWRITTEN, error))
            if record.fell_back:  # it ran out of memory: the original graph computes this call
                return original(*args)
            if due and record.programs:
                _record_chain_checks(record)
                out = _check_graph(record, original, args, before, out, random_node)
            if debug_dir:
                write_dump(debug_dir, record)
            return out

        run.seqpar_record = record
        return run


def _original_in_trial(record: GraphRecord, original: fx.GraphModule, args) -> tuple[bool, object]:
    """The speed trial's timed call of the original graph: ``(True, its outputs)``, or ``(False, None)`` where it
    ran out of memory or, on a CPU, might (:mod:`seqpar.memory`): the trial then stops, keeping the rewritten
    graph. A differentiated call that might not fit runs under a :class:`~seqpar.memory.HeadroomGuard`, where the
    graph may run again after a stopped call (:func:`~seqpar.passes.rerun.rerun_hazard`); where it may not, the
    original is not called."""
    trial = record.speed
    guard = None
    if trial.with_backward:
        if record.training_bound is None:
            record.training_bound = training_bound(original.graph)
        guard = headroom_guard(record.training_bound, args)
    hazard = None if guard is None else rerun_hazard(original.graph)
    if hazard is not None:
        trial.out_of_memory(ORIGINAL, (f"the original graph was not run: {guard.shortage(record.training_bound)}, "
                                       f"and a call stopped part-way could not run again ({hazard})"))
        return False, None
    try:
        with guard or contextlib.nullcontext():
            out, seconds = timed_call(original, args)
    except torch.OutOfMemoryError as error:
        trial.out_of_memory(ORIGINAL, _rerun_reason(record, original, ORIGINAL, error))
        return False, None
    trial.timed(ORIGINAL, seconds, out)
    return True, out


def _hand_back(record: GraphRecord, why: str) -> None:
    """The original graph runs from now on: ``why`` to the log and the chains' reasons."""
    log.warning("seqpar graph %d: %s; running the original graph from now on", record.index, why)
    record.fell_back = True
    for report, _ in record.programs:
        report.reason += f"; {why}, original graph used"


def _rerun_reason(record: GraphRecord, original: fx.GraphModule, form: str, error: Exception) -> str:
    """Why the call whose ``form`` ran out of memory runs again in the other form; the error raised again where
    the stopped call may have left a trace a second run would see (:func:`~seqpar.passes.rerun.rerun_hazard`)."""
    what = f"the {form} graph ran out of memory at call {record.calls} ({brief(error)})"
    hazard = rerun_hazard(original.graph)
    if hazard is not None:
        log.warning("seqpar graph %d: %s and cannot run again: %s", record.index, what, hazard)
        raise error
    return what


def _decided(record: GraphRecord, summary: str) -> None:
    """The speed trial's outcome, to the log and the chains' reasons."""
    log.info("seqpar graph %d: %s", record.index, summary)
    for report, _ in record.programs:
        report.reason += f"; graph {summary}"


def _last_solve(program):
    """``last_solve`` of a chain's report: the stats of the program's last call (``None`` before it)."""
    return lambda: call_state(program).last_stats


def _check_graph(record: GraphRecord, original: fx.GraphModule, args, before, out, random_node):
    """The compiled graph's outputs ``out`` against the original graph's, run on ``before`` (copies of the
    call's inputs made before it ran, one set per reference run, so the caller's buffers are updated once, by
    the compiled call). On a mismatch: the original graph's outputs, the inputs it updated in
    place (a buffer) given the values it left, and ``record.fell_back`` set so the original graph runs from
    then on."""
    if random_node is not None:
        record.verification.append(f"call {record.calls}: graph check skipped: {random_node.name} draws random numbers")
        return out
    reference_inputs = copied(before)
    with torch.no_grad():
        expected = original(*reference_inputs)
        verdict = judge(expected, out, lambda: _in_float64(original, before))  # the last run: takes ``before``
    ok, detail = verdict.ok, verdict.detail
    record.verification.append(f"call {record.calls}: graph {'ok' if ok else 'MISMATCH'}: {detail}")
    if ok:
        return out
    _hand_back(record, f"graph verification mismatch at call {record.calls} ({detail})")
    with torch.no_grad():
        for value, reference in zip(args, reference_inputs):
            if isinstance(value, torch.Tensor) and value is not reference and not torch.equal(value, reference):
                value.copy_(reference)
    return expected


def _in_float64(original: fx.GraphModule, args):
    """The original graph's outputs with every floating-point input in float64, or None where it cannot run so."""
    try:
        return original(*in_float64(args))
    except Exception as error:
        log.info("seqpar: no float64 reference for the graph check (%s)", error)
        return None


def _check_states(reference: torch.Tensor, states: torch.Tensor, exact) -> tuple[bool, str]:
    """A chain's solver states against its sequential loop; where they differ, against the loop in float64
    (``exact()``) too (:func:`seqpar.verify.judge`)."""
    verdict = judge(reference, states, exact)
    return verdict.ok, verdict.detail.replace("output 0: ", "")


def _record_chain_checks(record: GraphRecord) -> None:
    """Move the chains' check results into the record; a mismatched chain is reported sequential from now on."""
    for position, (report, program) in enumerate(record.programs):
        this_thread = call_state(program).thread
        if this_thread.check_result is None:
            continue
        (ok, detail), this_thread.check_result = this_thread.check_result, None
        record.verification.append(f"call {record.calls}: chain {position} {'ok' if ok else 'MISMATCH'}: {detail}")
        if not ok:
            report.decision, report.method = "sequential", "sequential"
            report.reason += (
                f"; verification mismatch at call {record.calls} ({detail}): solved sequentially from then on"
            )


class InvalidOptions(ShortenTraceback, ValueError):
    """Bad backend options. A ValueError that Dynamo re-raises as it is (it wraps
    other exceptions from a backend in BackendCompilerFailed)."""

    def __init__(self, message: str):
        super().__init__(message, first_useful_frame=None)


class PerShape:
    """A graph Dynamo traced with symbolic sizes, compiled by ``backend`` once per concrete shape of its inputs.

    Dynamo makes a dim symbolic when a second call changes it (``automatic_dynamic_shapes``): the chains of such
    a graph have no static length or state shape, so the backend specialises instead. At the first call with
    given sizes, strides and ints, a copy of the graph gets static fake values (:func:`static_graph`) and goes
    through the backend as Dynamo's graphs do, with the call's own tensors as example inputs; later calls with
    the same key reuse it. A number Dynamo passes as a 0-d tensor and reads with ``item()`` (``dynamic=True``
    makes every float attribute one: a norm's ``eps``) is part of the key, and the copy reads it as that number
    (as Dynamo's default, ``specialize_float``, compiles it): its fake value is no tensor's shape, and ops such
    as ``layer_norm`` need its value. What each specialisation found is in ``backend.graphs``. After
    ``MAX_SPECIALISATIONS`` keys (a loop over ever new sizes, such as generation with a growing length, would
    otherwise compile without end and keep every compiled graph), further new keys run the graph as Dynamo
    traced it, eager's kernels without a compile, and the log says so once.
    """

    MAX_SPECIALISATIONS = 8

    def __init__(self, backend: "SeqparBackend", gm: fx.GraphModule):
        self.backend, self.gm, self.compiled, self.told = backend, gm, {}, False
        self.numbers = read_as_numbers(gm)

    def __call__(self, *args):
        key = tuple((tuple(arg.shape), arg.stride(), arg.dtype, arg.device) if isinstance(arg, torch.Tensor)
                    else arg for arg in args)
        key += tuple(args[index].item() for index in self.numbers if isinstance(args[index], torch.Tensor))
        compiled = self.compiled.get(key)
        if compiled is None:
            compiled = self._compiled_for(key, args)
        return compiled(*args)

    def _compiled_for(self, key, args):
        """The graph compiled for ``key`` (the call's ``args``): a compile at run time, one at a time in the process
        as Dynamo's (:mod:`seqpar.runtime.tracing`); a thread that waited for another's compile of the same key
        takes it. Past ``MAX_SPECIALISATIONS`` keys: the graph as traced."""
        with one_at_a_time:
            if key in self.compiled:
                return self.compiled[key]
            if len(self.compiled) < self.MAX_SPECIALISATIONS:
                compiled = self.compiled[key] = self.backend(static_graph(self.gm, args, self.numbers), list(args))
                return compiled
        if not self.told:
            self.told = True
            log.info("seqpar: a graph with symbolic sizes met more than %d shapes; new shapes run the graph as "
                     "traced (eager kernels, no chain solved, nothing compiled)", self.MAX_SPECIALISATIONS)
        return self.gm


def _symbolic(value) -> bool:
    """Whether one of Dynamo's example inputs is a symbolic size or a tensor with a symbolic size or stride."""
    if isinstance(value, torch.Tensor):
        return any(isinstance(dim, torch.SymInt) for dim in (*value.shape, *value.stride()))
    return isinstance(value, torch.SymInt)


def _chains_kept_at_every_size(gm: fx.GraphModule, example_inputs,
                               options: Options) -> list[pipeline.ChainOutcome] | None:
    """The chains of the graph Dynamo traced with symbolic sizes, found as :class:`PerShape` would specialise it to
    this call's sizes (their hints), where no size may rewrite any of them; ``None`` where some size may (a
    symbolic graph can hide chains a static one shows: RecurrentGemma's per-step buffer writes at a second
    sequence length). Without hints, the symbolic graph itself is searched. Where no size may rewrite a chain
    (GPT-2's blocks, kept in the graph at every size, in each step of a generation with a growing cache), the graph
    keeps its symbolic sizes: one compile of the inner backend serves every size, as that backend alone would, not
    a compile per size."""
    numbers = read_as_numbers(gm)
    try:
        args = [_hinted(value, index in numbers) for index, value in enumerate(example_inputs)]
        static = static_graph(gm, args, numbers)
    except Exception:  # noqa: BLE001 - a graph whose sizes have no hints, or whose fake run fails
        return pipeline.chains_kept_at_every_size(pipeline.copy_graph_module(gm), options)
    return pipeline.chains_kept_at_every_size(static, options)  # the copy is this search's own


def _kept_at_every_size(outcome: pipeline.ChainOutcome) -> pipeline.ChainOutcome:
    """A chain of a graph kept with its symbolic sizes, its reason saying so (its sizes are one call's)."""
    reason = (f"{outcome.decision.reason}; kept in the graph at every size: the graph keeps its symbolic sizes "
              "(one compile of the inner backend)")
    return replace(outcome, decision=replace(outcome.decision, reason=reason))


def _hinted(value, number: bool):
    """A concrete stand-in of the sizes of one of Dynamo's example inputs: a SymInt's hint; for a fake tensor an
    uninitialised one of its hinted sizes and strides (a number read by ``item()``: its hint)."""
    if isinstance(value, torch.SymInt):
        return int(value.node.hint)
    if not isinstance(value, torch.Tensor):
        return value
    if number:  # its value decides no size: any number will do where Dynamo kept none
        memo = getattr(value, "item_memo", None)
        return torch.tensor(float(memo.node.hint) if memo is not None else 1.0, dtype=value.dtype)
    size = [int(dim.node.hint) if isinstance(dim, torch.SymInt) else dim for dim in value.shape]
    stride = [int(step.node.hint) if isinstance(step, torch.SymInt) else step for step in value.stride()]
    with torch._subclasses.fake_tensor.unset_fake_temporarily():
        return torch.empty_strided(size, stride, dtype=value.dtype, device=value.device,
                                   requires_grad=value.requires_grad)


def read_as_numbers(gm: fx.GraphModule) -> list[int]:
    """The indices of ``gm``'s placeholders that hold a number: a symbolic size (an ``int`` at the call), or a
    0-d tensor read by ``item()`` alone (a float Dynamo made symbolic)."""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    return [index for index, node in enumerate(placeholders)
            if isinstance(example(node), torch.SymInt) or (
                node.users and all(_reads_item(user, node) for user in node.users)
                and isinstance(value := example(node), torch.Tensor) and value.dim() == 0)]


def _reads_item(user: fx.Node, node: fx.Node) -> bool:
    return user.op in ("call_method", "call_function") and target_name(user) == "item" and user.args == (node,)


def static_graph(gm: fx.GraphModule, args, numbers=()) -> fx.GraphModule:
    """A copy of ``gm`` whose nodes' fake values (``example_value``, ``val``) have the static shapes that ``args``
    (one per placeholder: tensors, and ints for symbolic sizes) give them; other meta kept. The placeholders
    ``numbers`` (:func:`read_as_numbers`) are read as their values in ``args``: a size's uses, and each ``item()``
    of a 0-d tensor, replaced by the number (the copy serves only calls with these numbers)."""
    static = pipeline.copy_graph_module(gm)
    placeholders = [node for node in static.graph.nodes if node.op == "placeholder"]
    for index in numbers:
        if not isinstance(args[index], torch.Tensor):
            placeholders[index].replace_all_uses_with(args[index])
            continue
        for reader in list(placeholders[index].users):
            reader.replace_all_uses_with(args[index].item())
            static.graph.erase_node(reader)
    static.recompile()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_args = [mode.from_tensor(arg, static_shapes=True) if isinstance(arg, torch.Tensor) else arg for arg in args]
    for node in static.graph.nodes:
        node.meta.pop("example_value", None)
        node.meta.pop("val", None)
    with mode:  # in the call's grad mode, as Dynamo traced it: the values' requires_grad is what the passes read
        _Annotator(static).run(*fake_args)
    return static


class _Annotator(fx.Interpreter):
    """Runs a graph on fake values and keeps each node's value as its ``example_value`` and ``val``
    (``FakeTensorProp`` drops ``requires_grad``, which says which inputs the chain ops differentiate)."""

    def run_node(self, node: fx.Node):
        value = super().run_node(node)
        node.meta["example_value"] = node.meta["val"] = value
        return value


def seqpar_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """The ``torch_dynamo_backends`` entry point: ``torch.compile(m, backend="seqpar", options=...)``, or
    ``mode=...`` (inductor's mode for the inner backend: the option ``mode``; torch.compile takes one of the two)."""
    try:
        if mode is not None:
            options = {**(options or {}), "mode": mode}
        parsed = parse_options(options)
    except ValueError as error:
        raise InvalidOptions(str(error)) from None
    return SeqparBackend(parsed)(gm, example_inputs)


def _chain_report(outcome: pipeline.ChainOutcome) -> ChainReport:
    """The chain's report; a scan left in the graph (form "unrolled") has form "scan": the inner backend runs it.
    A chain whose rewrite failed is "rejected", with the reason (and a warning)."""
    chain, decision, lyapunov = outcome.chain, outcome.decision, outcome.lyapunov
    report = ChainReport(
        kind=chain.kind,
        length=chain.length,
        state_shape=tuple(chain.state_shape),
        modules=list(chain.modules),
        decision=decision.label,
        reason=decision.reason,
        jacobian=decision.jacobian if decision.method == "parallel" else "",
        method=decision.method,
        adjoint=decision.adjoint,
        form="scan" if chain.origin == "scan" and decision.form == "unrolled" else decision.form,
        lyapunov=None if lyapunov is None or not math.isfinite(lyapunov) else lyapunov,
        origin=chain.origin,
        outputs=len(chain.per_step_outputs),
        step_code=chain.step.code,
        output_code="" if chain.output_step is None else chain.output_step.code,
    )
    if outcome.error is not None:
        report.decision, report.form = "rejected", ""
        report.reason = f"rewrite failed ({outcome.error}); left unchanged"
        log.warning("seqpar: chain at %s: %s", span(chain.modules), report.reason)
    return report


def _candidate_report(candidate: Candidate) -> ChainReport:
    return ChainReport(
        kind=candidate.kind,
        length=candidate.length,
        state_shape=None if candidate.state_shape is None else tuple(candidate.state_shape),
        modules=list(candidate.modules),
        decision="rejected",
        reason=candidate.reason,
        origin=candidate.origin,
    )
