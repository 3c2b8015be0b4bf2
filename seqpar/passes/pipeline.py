"""The passes, in order: ``gm -> detect -> probe -> decide -> lower -> rewrite -> (gm, outcomes)``.

Each pass states what it needs and what it guarantees (in its module):

0. ``writes`` (:func:`~.writes.sink_buffer_writes`): per-step writes into
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
   sequential, and the form: the solver, the rolled loop, or left unrolled;
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

The caller owns ``gm`` (a copy of Dynamo's graph) and compiles what is left.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch.fx as fx

from ..runtime.program import ChainProgram
from ..runtime.structure import StepStructure
from .chain import Candidate, Chain, state_leaves
from .detect import find_chains
from .glue import has_other_compute
from .lower import build_chain_program, chain_structure
from .module_paths import span
from .policy import Decision, PassOptions, decide, needs_structure
from .probe import lyapunov_exponent, probe_values
from .rewrite import remap_chain, rewrite_chain
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


def run(gm: fx.GraphModule, example_inputs, original: fx.GraphModule, options: PassOptions) -> PipelineResult:
    """Find, decide, lower and rewrite the chains of ``gm`` (in place); ``original`` is the graph the probe runs."""
    result = PipelineResult(gm)
    try:
        sink_buffer_writes(gm)
        chains, result.candidates = find_chains(gm, min_chain=options.min_chain)
    except Exception as error:  # detection must never break compilation
        result.detection_error = f"{type(error).__name__}: {error}"
        return result
    if not chains:
        return result
    values = probe_values(original, example_inputs, chains) if options.policy == "auto" else {}
    probes = [lyapunov_exponent(chain, values) for chain in chains]
    devices = [state_leaves(chain.start)[0].meta["example_value"].device.type for chain in chains]
    structures = [_structure(chain) if needs_structure(chain, options, probe) else None
                  for chain, probe in zip(chains, probes)]
    decisions = [decide(chain, options, device, probe, structure)
                 for chain, device, probe, structure in zip(chains, devices, probes, structures)]
    rewritten = {
        node
        for chain, decision in zip(chains, decisions)
        if decision.form != "unrolled"
        for segment in chain.nodes
        for node in segment
    }
    standalone = not has_other_compute(gm, ignore=rewritten)  # nothing but chain ops and glue will be left
    replacements = {}
    for index, (chain, decision, probe) in enumerate(zip(chains, decisions, probes)):
        remap_chain(chain, replacements)
        outcome = ChainOutcome(chain, decision, probe)
        result.outcomes.append(outcome)
        if decision.form == "unrolled":
            continue
        try:
            program = build_chain_program(chain, decision, options.tol, options.max_iters, standalone=standalone)
            replacements.update(rewrite_chain(gm, chain, program, index))
        except Exception as error:
            outcome.error = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            continue
        outcome.program = program
        gm.recompile()
    return result


def _structure(chain: Chain) -> StepStructure | None:
    """The chain's step structure (:func:`~.lower.chain_structure`), ``None`` where its step cannot be lowered
    (the lowering pass then says why)."""
    try:
        return chain_structure(chain)
    except Exception as error:
        log.debug("seqpar: no step structure for the chain at %s: %s: %s", span(chain.modules),
                  type(error).__name__, error)
        return None
