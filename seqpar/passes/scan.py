"""Chains declared as ``torch.ops.higher_order.scan`` calls (a loop over stacked layers or a sequence).

A model that keeps its ``L`` layers stacked and runs them with torch's
``scan`` (``seqpar.scan_layers`` builds one from an ``nn.Sequential``)
reaches the Dynamo graph as one call

    carries, ys = scan(combine_fn, init, xs, additional_inputs)
    (s_{l+1}, y_l) = combine_fn(s_l, xs[l], *additional_inputs)

with ``xs`` already moved to dim 0 and flipped for ``reverse=True`` by Dynamo.
That is a chain with no unrolled segments: Dynamo traced the step once (a
1024-layer MLP in under a second, where the unrolled loop takes ~20 s).

``find_scan_chains(gm, min_chain)`` returns a :class:`~seqpar.passes.chain.Chain`
per scan with at least ``min_chain`` steps whose body has no side effects.
Guarantees for each: ``step(s_l, *xs_l, *additional)`` is the body's
next-carry part (nodes copied as :mod:`.step` copies a segment); every ``xs``
leaf is a ``"slice"`` input on dim 0, every additional input is shared;
``nodes == [[scan, *its getitems, *dead nodes after unread ones]]``; ``outputs[-1]`` holds the getitems of
the final carry (``None`` where nothing reads one) and ``outputs[l]`` for
``l < L - 1`` are ``None`` (a scan shows no intermediate carries);
``all_states`` holds the getitems of per-step outputs ``y_l`` that are the
carry ``s_{l+1}`` (``clone`` of it, as scan asks): the op's stacked states
serve them. A scan whose read ``y_l`` is anything else, whose length is
symbolic or short, or whose body draws random numbers or mutates comes back
as a :class:`~seqpar.passes.chain.Candidate` with the reason, and stays in
the graph for the inner backend.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.node import Node

from .batch_dims import step_facts
from .chain import Candidate, Chain, ChainInput, as_state, values_reason
from .effects import side_effect
from .kinds import chain_kind
from .module_paths import module_path
from .step import inline_body, state_placeholder, state_tensors
from .tokens import VALUE_COPIES, example, target_name


class _Rejected(Exception):
    """A scan that is not a chain; the message is the candidate's reason."""


def is_scan(node: Node) -> bool:
    return (node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator)
            and target_name(node) == "scan")


def find_scan_chains(gm: fx.GraphModule, *, min_chain: int = 4) -> tuple[list[Chain], list[Candidate]]:
    """The scan calls of ``gm`` that are chains of at least ``min_chain`` steps, and the rejected ones."""
    chains, candidates = [], []
    for node in gm.graph.nodes:
        if not is_scan(node):
            continue
        modules = _modules(node)
        try:
            chains.append(_scan_chain(gm, node, max(2, int(min_chain)), modules))
        except _Rejected as error:
            init = node.args[1] if len(node.args) > 1 else []
            shapes = [tuple(example(s0).shape) for s0 in init]
            per_layer = any(isinstance(example(x), torch.nn.Parameter) for x in node.args[2]) \
                if len(node.args) > 2 else False
            candidates.append(Candidate(
                kind="layers" if per_layer else "recurrent", length=_length(node) or 0, modules=modules,
                state_shape=shapes[0] if len(shapes) == 1 else tuple(shapes), reason=str(error), origin="scan",
            ))
    return chains, candidates


def _length(scan: Node) -> int | None:
    xs = scan.args[2] if len(scan.args) > 2 else None
    length = example(xs[0]).shape[0] if xs else None
    return length if isinstance(length, int) else None


def _modules(scan: Node) -> list[str]:
    path = module_path(scan)
    return [".".join(path) if path else ""] * (_length(scan) or 0)


def _scan_chain(gm: fx.GraphModule, scan: Node, min_chain: int, modules: list[str]) -> Chain:
    if len(scan.args) != 4 or scan.kwargs:
        raise _Rejected("scan call without the (body, init, xs, additional_inputs) arguments of torch 2.13")
    body_node, init, xs, additional = scan.args
    length = _length(scan)
    if length is None:
        raise _Rejected("scan over a symbolic number of steps; left to the inner backend")
    if length < min_chain:
        raise _Rejected(f"scan of {length} steps, shorter than min_chain={min_chain}")
    body = gm.get_submodule(body_node.target)
    for node in body.graph.nodes:
        reason = side_effect(node, on_state=True)
        if reason is not None:
            raise _Rejected(f"scan body: {reason}")
    carries = len(init)
    body_outputs = list(body.graph.output_node().args[0])
    readers, dead = _output_readers(scan)
    finals = [readers.get(i) for i in range(carries)]
    stacked = [None] * carries
    for j, output in enumerate(body_outputs[carries:]):
        reader = readers.get(carries + j)
        if reader is None:
            continue
        leaf = _copied_carry(output, body_outputs[:carries])
        if leaf is None:
            raise _Rejected(f"scan's per-step output {j} is not its carry (nor a copy of it); "
                            "only the carries are solved for, so the scan is left to the inner backend")
        if stacked[leaf] is not None:
            raise _Rejected(f"two per-step outputs of the scan copy its carry {leaf}; left to the inner backend")
        stacked[leaf] = reader
    step = _build_step(body, init, xs, additional)
    shapes = [tuple(example(s0).shape) for s0 in init]
    dtypes = {example(s0).dtype for s0 in init}
    if len(dtypes) > 1:
        raise _Rejected("the tensors of the scan's carry have different dtypes; they must pack into one tensor")
    facts = step_facts(step, shapes)
    if any(k > facts.shared_ndim for k in facts.leaf_batch_ndims):
        raise _Rejected("the tensors of the scan's carry have different batch dims")
    per_step = [ChainInput("slice", nodes=[x], dim=0, start=0, stride=1) for x in xs]
    chain = Chain(
        kind=chain_kind(per_step, facts),
        start=as_state(list(init)),
        outputs=[as_state([None] * carries)] * (length - 1) + [as_state(finals)],
        nodes=[sorted({scan, *readers.values(), *dead}, key=_position(scan))],
        step=step,
        per_step=per_step,
        shared=list(additional),
        modules=modules,
        state_shape=as_state(shapes),
        state_dtype=dtypes.pop(),
        batch_ndim=facts.batch_ndim,
        all_states=as_state(stacked) if any(node is not None for node in stacked) else None,
        origin="scan",
    )
    reason = values_reason(chain)
    if reason is not None:
        raise _Rejected(f"{reason}; left to the inner backend")
    return chain


def _output_readers(scan: Node) -> tuple[dict[int, Node], list[Node]]:
    """``({i: getitem(scan, i)}, dead)`` for the scan's outputs the graph reads; ``dead``: getitems whose
    value nothing uses (Dynamo leaves e.g. ``movedim`` of an unused output), with the dead nodes after
    them, erased with the scan. Anything else reading the scan is rejected."""
    readers, dead = {}, []
    for user in scan.users:
        if user.op != "call_function" or user.target is not operator.getitem or not isinstance(user.args[1], int):
            raise _Rejected(f"{user.name} reads the scan's outputs other than by index")
        if user.args[1] in readers:
            raise _Rejected(f"scan output {user.args[1]} is read twice")
        tail = _dead_tail(user)
        if tail is None:
            readers[user.args[1]] = user
        else:
            dead += [user, *tail]
    return readers, dead


def _dead_tail(node: Node) -> list[Node] | None:
    """Every node reading ``node``, directly or not, when none is an output or has an effect; else ``None``."""
    tail = []
    for user in node.users:
        if user.op not in ("call_function", "call_method") or user.is_impure() or side_effect(user, True):
            return None
        below = _dead_tail(user)
        if below is None:
            return None
        tail += [user, *below]
    return tail


def _position(scan: Node):
    order = {node: index for index, node in enumerate(scan.graph.nodes)}
    return order.__getitem__


def _copied_carry(output: Node, carry_outputs: list[Node]) -> int | None:
    """Which carry ``output`` is (through copies, :data:`~.tokens.VALUE_COPIES`: scan forbids a per-step output
    that aliases the carry, so models clone it), or ``None``."""
    while output.__class__ is Node:
        if output in carry_outputs:
            return carry_outputs.index(output)
        if output.op not in ("call_function", "call_method") or target_name(output) not in VALUE_COPIES:
            return None
        output = output.args[0]
    return None


def _build_step(body: fx.GraphModule, init, xs, additional) -> fx.GraphModule:
    """``step(state, *xs_l, *additional) -> next state``: the body with the per-step outputs dropped."""
    graph = fx.Graph()
    state = state_placeholder(graph, init)
    operands = []
    for index, x in enumerate(xs):
        placeholder = graph.placeholder(f"x{index}_{x.name}")
        placeholder.meta = {"example_value": example(x)[0]}
        operands.append(placeholder)
    for index, node in enumerate(additional):
        placeholder = graph.placeholder(f"shared{index}_{node.name}")
        placeholder.meta = dict(node.meta)
        operands.append(placeholder)
    operands = state_tensors(graph, state, init) + operands
    outputs = inline_body(graph, body, operands)[: len(init)]
    graph.output(outputs[0] if len(init) == 1 else tuple(outputs))
    graph.lint()
    step = fx.GraphModule(body, graph, class_name="SeqparScanStep")
    step.recompile()
    return step
