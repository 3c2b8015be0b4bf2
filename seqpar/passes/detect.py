"""Detection: find chains of isomorphic Markov segments in a Dynamo FX graph.

``find_chains(gm)`` returns every maximal run of ``L >= min_chain`` consecutive
segments ``S_0 .. S_{L-1}`` of ``gm``'s graph such that segment ``l`` computes

    s_{l+1} = f(s_l, x_l, *shared)        s_l: a tensor, or a fixed tuple of tensors

with the same ``f`` for every ``l``: ``S_l`` reads values of earlier segments
only through ``s_l`` (the output of ``S_{l-1}``, or the chain's ``start``),
its per-step inputs ``x_l`` (placeholders that differ per segment: layer
parameters; rows ``P[a + l]`` of one stacked tensor; literals that differ per
segment: coefficients; and state-independent values computed in or before the
segment: ``W x_t``) and values every segment shares (an RNN's ``U``). A tuple state (an LSTM's
``(h, c)``) has every tensor made by the previous segment, with the same
shapes in every segment, and the same leading batch dims in every tensor.

Guarantees for each returned :class:`~seqpar.passes.chain.Chain`:
  * ``chain.step(s_l, *x_l, *shared)`` computes exactly what ``nodes[l]``
    compute: the nodes are copied from segment 0 (``call_method`` becomes the
    ``torch.Tensor`` function, calls of body graphs (``invoke_subgraph``,
    activation checkpointing) are inlined, the
    views a segment takes of a slice input's row are taken by the step), and
    a segment added by extension computes the same with other nodes;
  * no node of ``nodes[l]`` has side effects (in-place ops, global state,
    random draws, ``call_module``, higher-order ops other than calls of a
    body graph without side effects);
  * of a segment's nodes, only ``outputs[l]`` (``used_outside`` lists which)
    and per-step outputs (``per_step_outputs``: tensors computed besides the
    state, ``output_step`` computes them) are read after the chain; hoisted
    per-step values (``"computed"``) and shared values do not depend on
    ``start`` and are left in the graph;
  * every tensor of a tuple state has the chain's ``batch_ndim`` leading batch
    dims and the same dtype, so the state packs into ``(N, w)`` per batch
    element.
Repeated structures rejected for one of these reasons (or whose step cannot be
built) come back as :class:`~seqpar.passes.chain.Candidate` with the reason.
Segments that compute the step with other nodes join the chain at its ends
(:mod:`.extend`): the inlined first call of a ``nested_compile_region``, T5's
block 0 (it computes the position bias the others share), and a
last step that lacks a value Dynamo dropped (an ``nn.LSTMCell`` loop
returning ``h`` loses the last ``c``: ``None`` in the last output).

Calls of ``torch.ops.higher_order.scan`` (a loop Dynamo kept rolled) are
chains too (:mod:`.scan`), merged into the result in graph order.

The work is split by job: :mod:`.segments` cuts the graph into validated
segments (plans), :mod:`.step` builds the step function of a plan,
:mod:`.batch_dims` finds the batch dims the step keeps independent,
:mod:`.kinds` names the chain and :mod:`.extend` extends it; this module
turns plans into records.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch.fx.node import Node

from .batch_dims import step_facts
from .chain import Candidate, Chain, ChainInput, as_state, values_reason
from .effects import BATCHNORM_TRAINING
from .extend import extend_chains
from .kinds import chain_kind, guess_kind
from .module_paths import varying_path
from .scan import find_scan_chains
from .segments import Detector, Plan, Rejection
from .step import build_output_step, build_step
from .tokens import example

log = logging.getLogger(__name__)

__all__ = ["BATCHNORM_TRAINING", "Unsupported", "find_chains"]


class Unsupported(Exception):
    """A plan the backend cannot solve as a chain; the message is the candidate's reason."""


def find_chains(gm: fx.GraphModule, *, min_chain: int = 4) -> tuple[list[Chain], list[Candidate]]:
    """The chains of at least ``min_chain`` steps in ``gm``, and the rejected repeats.

    ``gm`` is a Dynamo graph (parameters as placeholders, loops unrolled,
    ``example_value`` meta). The graph is not modified. Chains are returned in
    graph order and never overlap. Runs of one segment less are searched too
    and kept where extension makes them long enough (T5's stacks: block 0
    computes the position bias the other blocks share, so the run of equal
    segments starts at block 1 and block 0 joins by extension).
    """
    min_chain = max(2, int(min_chain))
    detector = Detector(gm, max(2, min_chain - 1))
    plans, rejected = detector.find()
    seq = detector.seq
    chains, built = [], []
    for plan in plans:
        try:
            chains.append(_chain(plan, seq, gm))
            built.append(plan)
        except Unsupported as error:
            rejected.append(Rejection(plan.begin, plan.end, plan.period, plan.length, str(error), plan.starts))
        except Exception as error:  # a step we cannot build is a candidate, never a crash
            log.debug("seqpar: could not build the step of a chain", exc_info=True)
            rejected.append(Rejection(plan.begin, plan.end, plan.period, plan.length,
                                      f"could not build the step function: {error}", plan.starts))
    extend_chains(chains, gm)
    long_enough = [chain.length >= min_chain for chain in chains]
    chains = [chain for chain, keep in zip(chains, long_enough) if keep]
    built = [plan for plan, keep in zip(built, long_enough) if keep]
    candidates, kept = [], []
    rejected.sort(key=lambda r: -(r.end - r.begin))
    for r in rejected:
        overlaps = [t for t in built if not (r.end <= t.begin or t.end <= r.begin)] + \
                   [k for k in kept if not (r.end <= k[0] or k[1] <= r.begin)]
        if r.count < min_chain or overlaps:
            continue
        kept.append((r.begin, r.end))
        if not _from_associative_scan(seq[r.begin: r.end]):
            candidates.append(_candidate(r, seq))
    scanned = _associative_scan_length(seq)
    if scanned:
        candidates.append(Candidate(kind="recurrent", length=scanned, modules=[], state_shape=None,
                                    reason=ASSOCIATIVE_SCAN_REASON))
    scan_chains, scan_candidates = find_scan_chains(gm, min_chain=min_chain)
    if scan_chains:
        order = {node: index for index, node in enumerate(seq)}
        chains = sorted(chains + scan_chains, key=lambda chain: order[chain.nodes[0][0]])
    candidates += scan_candidates
    log.debug("seqpar: %d chains, %d candidates in a graph of %d nodes", len(chains), len(candidates), len(seq))
    return chains, candidates


def _chain(plan: Plan, seq: list[Node], gm: fx.GraphModule) -> Chain:
    """The record of ``plan``; raises :class:`Unsupported` for a tuple state that cannot be packed or values the chain
    op does not take (:func:`~.chain.values_reason`)."""
    p, b = plan.period, plan.begin
    nodes = [[seq[b + k * p + o] for o in plan.dep_offsets] for k in range(plan.length)]
    outputs = [as_state([seq[b + k * p + q] for q in plan.state_offsets]) for k in range(plan.length)]
    per_step = [
        ChainInput(inp.kind, nodes=list(inp.nodes), start=inp.start, dim=inp.dim, stride=inp.stride)
        if inp.kind != "constant"
        else ChainInput("constant", values=list(inp.values))
        for inp in plan.inputs if inp.kind != "shared"
    ]
    shared = [inp.nodes[0] for inp in plan.inputs if inp.kind == "shared"]
    values = [example(s0) for s0 in plan.starts]
    described = [f"{s0.name} {tuple(value.shape)} {value.dtype}" for s0, value in zip(plan.starts, values)]
    if len({value.dtype for value in values}) > 1:
        raise Unsupported(f"the tensors of the tuple state have different dtypes ({', '.join(described)}); "
                          "they must pack into one tensor")
    step = build_step(plan, seq, gm)
    shapes = [tuple(value.shape) for value in values]
    facts = step_facts(step, shapes)
    apart = [i for i, k in enumerate(facts.leaf_batch_ndims) if k > facts.shared_ndim]
    if apart:
        raise Unsupported(
            f"tuple state with different batch dims ({', '.join(described)}): the step keeps the leading "
            f"{facts.leaf_batch_ndims[apart[0]]} dim(s) of {plan.starts[apart[0]].name} independent, which the "
            "other tensors do not have; every tensor of a tuple state needs the same leading batch dims"
        )
    output_step, reads_next = build_output_step(plan, seq, gm) if plan.output_offsets else (None, False)
    chain = Chain(
        kind=chain_kind(per_step, facts),
        start=as_state(plan.starts),
        outputs=outputs,
        nodes=nodes,
        step=step,
        per_step=per_step,
        shared=shared,
        modules=_segment_modules(seq, p, b, plan.length, plan.dep_offsets),
        state_shape=as_state(shapes),
        state_dtype=values[0].dtype,
        batch_ndim=facts.batch_ndim,
        used_outside=list(plan.used_outside),
        per_step_outputs=_per_step_outputs(plan, seq, nodes),
        output_step=output_step,
        outputs_read_next=reads_next,
    )
    reason = values_reason(chain)
    if reason is not None:
        raise Unsupported(reason)
    return chain


def _per_step_outputs(plan: Plan, seq: list[Node], nodes: list[list[Node]]) -> list[list[Node | None]]:
    """Per output offset of ``plan``, its node in every segment where a node outside the chain reads it
    (``None`` elsewhere)."""
    members = {member for segment in nodes for member in segment}
    p, b = plan.period, plan.begin
    found = [[seq[b + k * p + o] for k in range(plan.length)] for o in plan.output_offsets]
    return [[node if any(user not in members for user in node.users) else None for node in row] for row in found]


ASSOCIATIVE_SCAN_REASON = (
    "torch's associative_scan, inlined by Dynamo: the recurrence already runs in O(log L) depth, its levels "
    "are no chain (transformers' Mamba takes this path under torch.compile; config.use_associative_scan=False "
    "gives seqpar its reference loop, solved with its per-step outputs)"
)


def _from_associative_scan(nodes: list[Node]) -> bool:
    """Whether every node comes from ``torch._higher_order_ops.associative_scan`` (by its stack trace)."""
    return bool(nodes) and all("associative_scan" in (node.meta.get("stack_trace") or "") for node in nodes)


def _associative_scan_length(seq: list[Node]) -> int:
    """The length of the longest ``associative_scan`` Dynamo inlined into the graph, 0 if none: the largest
    leading size of the values its nodes make (it moves the scanned dim first, then halves it level by level).
    Reported whatever ``min_chain`` is: its ``log2 L`` levels are never a chain of ``min_chain`` segments."""
    sizes = [value.shape[0] for node in seq if _from_associative_scan([node])
             if isinstance(value := example(node), torch.Tensor) and value.dim() > 0]
    return max(sizes, default=0)


def _candidate(rejection: Rejection, seq: list[Node]) -> Candidate:
    p, b, starts = rejection.period, rejection.begin, rejection.starts
    shapes = [tuple(value.shape) for value in map(example, starts) if isinstance(value, torch.Tensor)]
    return Candidate(
        kind=guess_kind(seq[b: b + p], starts, seq[b + p: b + 2 * p] if rejection.count > 1 else None),
        length=rejection.count,
        modules=_segment_modules(seq, p, b, rejection.count, list(range(p))),
        state_shape=as_state(shapes) if shapes and len(shapes) == len(starts) else None,
        reason=rejection.reason,
    )


def _segment_modules(seq: list[Node], p: int, b: int, count: int, offsets: list[int]) -> list[str]:
    """Per segment, the module that differs from a neighbouring segment's (``layers.3``), or ``""``."""
    modules = []
    for k in range(count):
        other = k + 1 if k + 1 < count else k - 1
        path = ""
        for o in offsets:
            found = varying_path(seq[b + k * p + o], seq[b + other * p + o]) if other >= 0 else None
            if found:
                path = found
                break
        modules.append(path)
    return modules
