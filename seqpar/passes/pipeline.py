"""The passes, in order: ``gm -> detect -> probe -> decide -> lower -> rewrite -> (gm, outcomes)``.

Each pass states what it needs and what it guarantees (in its module):

0. ``passthrough`` (:func:`~.passthrough.read_returned_inputs`): what a
   body-graph call (a checkpointed block) returns unchanged is read from its
   operand (T5's position bias, passed through every block).
   ``writes`` (:func:`~.writes.sink_buffer_writes`): per-step writes into
   one buffer (``out[:, t] = y``, ``out[:, t].copy_(y)``, ``index_put_``,
   ``index_copy_`` at constant positions) moved after the loop as one write
   of the stacked values, where nothing reads the buffer in between.
1. ``detect`` (:func:`~.detect.find_chains`): chains of isomorphic Markov
   segments and the candidates that did not become chains, with reasons.
   Detection never breaks compilation: a failure leaves the graph unchanged.
2. ``probe`` (:mod:`.probe`): under ``policy="auto"``, each chain's largest
   Lyapunov exponent from one run of the original graph, before any rewrite
   renames nodes.
3. ``decide`` (:func:`~.policy.decide`): per chain and direction, parallel or
   sequential, and the form: the solver, the rolled loop, or left unrolled
   (a rolled loop takes in the expanding ops of the per-step inputs the graph
   computes at every step, and one compiled for cost may run its step
   compiled by inductor, with the producers of its slice inputs taken in:
   :mod:`.absorb`);
   where the step's Jacobian structure can change that
   (:func:`~.policy.needs_structure`), the step is lowered first and its
   structure proven (:func:`~.lower.chain_structure`, the trace the program
   is then built on).
4. ``lower`` (:func:`~.lower.build_chain_program`): the chain's step traced
   into a runtime program carrying the decision.
5. ``rewrite`` (:func:`~.rewrite.rewrite_chain`): the chain's nodes replaced by
   one ``seqpar::chain_solve`` call; later chains that read its states are
   pointed at the replacements. A chain whose lowering or rewrite fails is
   left unchanged, with the reason in its outcome.

Steps 1-5 repeat on the rewritten graph while a round rewrites a chain
(:data:`MAX_ROUNDS`): chains another chain's step read as inputs.

6. ``vectorize`` (:func:`~.vectorize.batch_stacks`), where a chain was
   rewritten: each stack of ``L`` per-step copies of one computation (a
   chain's per-step inputs, another chain's states selected and stacked
   again) computed by one batched computation, so that the inner compiler
   gets ``O(1)`` nodes per chain instead of ``O(L)``.
7. ``stream`` (:func:`~.stream.stream_sequential_chains`), in a graph that
   records no autograd: a sequential chain whose states are read only as its
   last state and by its per-step outputs runs in blocks, its ``L`` states
   never held at once.

The caller owns ``gm`` (a copy of Dynamo's graph) and compiles what is left.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule

from ..runtime.budget import memory_window_reason
from ..runtime.program import ChainProgram
from ..runtime.stream import block_length
from ..runtime.structure import StepStructure
from .absorb import absorb_computed, absorb_producers
from .chain import Candidate, Chain, state_leaves
from .detect import find_chains
from .glue import has_other_compute
from .lower import build_chain_program, chain_structure
from .module_paths import span
from .passthrough import read_returned_inputs
from .policy import Decision, PassOptions, decide, needs_structure, never_rewritten
from .probe import lyapunov_exponent, probe_values
from .rewrite import remap_chain, rewrite_chain
from .stream import stream_sequential_chains
from .vectorize import batch_stacks
from .writes import sink_buffer_writes

log = logging.getLogger("seqpar.passes")


@dataclass
class ChainOutcome:
    """What the passes did with one chain: its decision, the probe's estimate, and the program that solves it
    (``None`` where it was left in the graph, by decision or because lowering failed: ``error`` says why)."""

    chain: Chain
    decision: Decision
    lyapunov: float | None
    program: ChainProgram | None = None
    error: str | None = None


@dataclass
class PipelineResult:
    """The rewritten graph (``gm``, changed in place), the candidates, one outcome per chain, and why detection
    failed (``None`` when it ran)."""

    gm: fx.GraphModule
    candidates: list[Candidate] = field(default_factory=list)
    outcomes: list[ChainOutcome] = field(default_factory=list)
    detection_error: str | None = None


# Detection rounds per graph at most: a round finds the recurrences the previous one read as state-independent
# inputs (RWKV's step carries num, den and a running max: one chain a round).
MAX_ROUNDS = 6


def run(gm: fx.GraphModule, example_inputs, original: fx.GraphModule, options: PassOptions,
        records_autograd: bool = True) -> PipelineResult:
    """Find, decide, lower and rewrite the chains of ``gm`` (in place); ``original`` is the graph the probe runs.
    ``records_autograd``: whether the graph's calls record autograd (where not, a sequential chain read only at
    its end runs without holding its states: :mod:`.stream`).

    Detection repeats on the rewritten graph while a round rewrites a chain:
    a segment whose state is one of several recurrences it carries (RWKV's
    ``num``, with ``den`` and the running ``max`` beside it) reads the others
    as per-step inputs computed outside the chain, which stay an unrolled
    sequential loop until the next round finds them as chains of their own.
    A later round reports the rejected repeats that carry a state and were
    not reported before (its repeats without one are the solved chains'
    per-step glue).
    """
    result = PipelineResult(gm)
    try:
        _before_detection(gm)
    except Exception as error:  # detection must never break compilation
        result.detection_error = f"{type(error).__name__}: {error}"
        return result
    for _ in range(MAX_ROUNDS):
        try:
            chains, candidates = find_chains(gm, min_chain=options.min_chain)
        except Exception as error:
            if not result.outcomes:
                result.detection_error = f"{type(error).__name__}: {error}"
            break
        if result.outcomes:  # a later round: its stateless repeats are the solved chains' per-step glue
            candidates = [candidate for candidate in candidates
                          if candidate.state_shape is not None and candidate not in result.candidates]
        result.candidates += candidates
        if not chains or not any(outcome.program is not None
                                 for outcome in _solve(gm, chains, example_inputs, original, options, result)):
            break
    if any(outcome.program is not None for outcome in result.outcomes):
        try:
            batch_stacks(gm)
        except Exception as error:  # never breaks compilation: each stack is replaced whole or not at all
            log.debug("seqpar: batching stacks failed: %s: %s", type(error).__name__, error)
        if not records_autograd:
            _stream(gm, result.outcomes)
    return result


def _stream(gm: fx.GraphModule, outcomes: list[ChainOutcome]) -> None:
    """:func:`~.stream.stream_sequential_chains` on ``gm``; the streamed chains' reasons say so."""
    try:
        streamed = set(stream_sequential_chains(gm))
    except Exception as error:  # never breaks compilation: each chain is rewritten whole or not at all
        log.debug("seqpar: streaming chains failed: %s: %s", type(error).__name__, error)
        gm.recompile()
        return
    for outcome in outcomes:
        if outcome.program is not None and outcome.program.id in streamed:
            outcome.decision = replace(outcome.decision, reason=(
                f"{outcome.decision.reason}; inference graph: its states are not held (the loop runs in blocks "
                f"of {block_length(outcome.program)} steps, each block's per-step outputs evaluated at once)"))


def _before_detection(gm: fx.GraphModule) -> None:
    """Pass 0: what body-graph calls return unchanged read from their operands, per-step buffer writes sunk."""
    read_returned_inputs(gm)
    sink_buffer_writes(gm)


def chains_kept_at_every_size(work: fx.GraphModule, options: PassOptions) -> list[ChainOutcome] | None:
    """The chains detection (after :func:`_before_detection`, as in :func:`run`) finds in ``work``, each with its
    decision at ``work``'s sizes (no probe: it keeps them whatever the probe says), where no size of its batch or
    state may rewrite any of them (:func:`~.policy.never_rewritten`); ``None`` where some size may. ``work`` is
    changed by those passes: pass a copy (:func:`copy_graph_module`) of a graph that must stay as it is."""
    try:
        _before_detection(work)
        chains, _ = find_chains(work, min_chain=options.min_chain)
    except Exception:  # detection never breaks compilation
        return []
    devices = [_device_type(chain) for chain in chains]
    if not all(never_rewritten(chain, options, device) for chain, device in zip(chains, devices)):
        return None
    return [ChainOutcome(chain, decide(chain, options, device, None), None) for chain, device in zip(chains, devices)]


def _device_type(chain: Chain) -> str:
    return state_leaves(chain.start)[0].meta["example_value"].device.type


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with a copy of ``gm``'s graph (same node names, meta and calling convention), sharing its
    attributes: what the passes rewrite, leaving Dynamo's graph as it was. Its Python code is generated when first
    read or called (torch's ``_LazyGraphModule``, as Dynamo's own graphs): each pass ends with ``recompile()``, and
    generating the code of an unrolled loop's graph takes seconds (2.4 s for RWKV's 1024 steps, once per rewritten
    chain before: a third of the backend's time)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    graph.set_codegen(gm.graph._codegen)
    copy = _LazyGraphModule(gm, graph)
    copy.meta.update(gm.meta)
    return copy


def _solve(gm: fx.GraphModule, chains: list[Chain], example_inputs, original: fx.GraphModule,
           options: PassOptions, result: PipelineResult) -> list[ChainOutcome]:
    """Decide, lower and rewrite one round's ``chains`` (outcomes appended to ``result``); this round's outcomes."""
    values = probe_values(original, example_inputs, chains) if options.policy == "auto" else {}
    probes = [lyapunov_exponent(chain, values) for chain in chains]
    devices = [_device_type(chain) for chain in chains]
    structures = [_structure(chain) if needs_structure(chain, options, probe) else None
                  for chain, probe in zip(chains, probes)]
    decisions = [fuse_producers(chain, decide(chain, options, device, probe, structure), options)
                 for chain, device, probe, structure in zip(chains, devices, probes, structures)]
    rewritten = {
        node
        for chain, decision in zip(chains, decisions)
        if decision.form != "unrolled"
        for segment in chain.nodes
        for node in segment
    }
    standalone = not has_other_compute(gm, ignore=rewritten)  # nothing but chain ops and glue will be left
    replacements, outcomes = {}, []
    for chain, decision, probe in zip(chains, decisions, probes):
        remap_chain(chain, replacements)
        outcome = ChainOutcome(chain, decision, probe)
        index = len(result.outcomes)
        result.outcomes.append(outcome)
        outcomes.append(outcome)
        if decision.form == "unrolled":
            continue
        try:
            program = build_chain_program(chain, decision, options.tol, options.max_iters, standalone=standalone)
            replacements.update(rewrite_chain(gm, chain, program, index))
        except Exception as error:
            outcome.error = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            continue
        outcome.program = program
        outcome.decision = with_solved_window(decision, program)
        gm.recompile()
    return outcomes


def with_solved_window(decision: Decision, program) -> Decision:
    """``decision`` with the window its program solves with, and why, where the device's memory bounded it
    (:func:`~seqpar.runtime.budget.memory_window`: the whole chain's Jacobian blocks do not fit)."""
    window = program.solver_options.get("window")
    if decision.method != "parallel" or window == decision.window:
        return decision
    why = memory_window_reason(program.layout, program.length, program.solve_kind, window)
    return replace(decision, window=window, reason=f"{decision.reason}; {why}")


def fuse_producers(chain: Chain, decision: Decision, options: PassOptions) -> Decision:
    """Where a chain is kept sequential as a rolled loop, the expanding ops computing its per-step inputs at
    every step run in its step (:func:`~.absorb.absorb_computed`: the chain receives their smaller operands).
    Where that loop is compiled (``loop="compiled"``: kept sequential for cost, found contractive) and the inner
    backend is inductor, its loop may run its step compiled by inductor (``loop="fused"``,
    :mod:`seqpar.runtime.fused_loop`, timed against the generated loop), and the producers of its slice inputs
    move into its step where that saves memory (:func:`~.absorb.absorb_producers`)."""
    if (decision.form, decision.method) != ("rolled", "sequential"):
        return decision
    computed = absorb_computed(chain)
    if computed:
        decision = replace(decision, reason=f"{decision.reason}; the ops computing its per-step inputs at every step "
                           f"({', '.join(computed)}) run in its step")
    if (decision.loop, options.inner) != ("compiled", "inductor"):
        return decision
    absorbed = absorb_producers(chain)
    taken = f"the ops computing its per-step inputs ({', '.join(absorbed)}) run in the step; " if absorbed else ""
    return replace(decision, loop="fused", reason=f"{decision.reason}; fused loop: {taken}the step compiled by "
                   "inductor, timed against the generated loop on the first calls (the faster kept)")


def _structure(chain: Chain) -> StepStructure | None:
    """The chain's step structure (:func:`~.lower.chain_structure`), ``None`` where its step cannot be lowered
    (the lowering pass then says why)."""
    try:
        return chain_structure(chain)
    except Exception as error:
        log.debug("seqpar: no step structure for the chain at %s: %s: %s", span(chain.modules),
                  type(error).__name__, error)
        return None
