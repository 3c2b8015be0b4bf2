"""In a graph that records no autograd, a sequential chain read only at its end runs without holding its states.

Needs: a rewritten graph (:mod:`.rewrite`, after :mod:`.vectorize`) that
records no autograd (Dynamo guards grad mode and the inputs'
``requires_grad``: a differentiated call compiles another graph). Guarantees:
each ``seqpar::chain_solve`` call of a program kept sequential whose states
``(L, N, w)`` are read only as the last one (``select(states, 0, L - 1)``)
and by the chain's ``seqpar::chain_outputs`` call becomes one
``seqpar::chain_stream`` call giving ``[s_L, Y^1, .., Y^J]`` (the loop run in
blocks, :mod:`seqpar.runtime.stream`): the same values without the ``L``
states eager's loop never holds. A chain whose states anything else reads
(a scan's stacked carries, an intermediate state, another chain's inputs),
or a chain solved in parallel (its solver needs every state), is left as it
is. ``graph.lint()`` passes and the new nodes carry fake values.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx

from ..runtime.ops import program_by_id, with_layer_groups
from ..runtime.stream import trace_blocks
from .rewrite import annotate_new_nodes

log = logging.getLogger("seqpar.passes")
_seqpar = torch.ops.seqpar


def stream_sequential_chains(gm: fx.GraphModule) -> list[int]:
    """Rewrite (in place) the chain calls of ``gm`` that qualify (see the module); the ids of their programs."""
    graph = gm.graph
    streamed, created = [], []
    for solve in [node for node in graph.nodes if node.target is _seqpar.chain_solve.default]:
        program = program_by_id(solve.args[0])
        reads = _end_reads(solve, program.length) if program.method == "sequential" else None
        if reads is None:
            continue
        finals, outputs = reads
        try:
            _trace_blocks(program, solve)
        except Exception as error:  # the chain keeps its chain_solve call, as in a differentiated graph
            log.debug("seqpar: chain of %d steps not streamed: %s: %s", program.length, type(error).__name__, error)
            continue
        with graph.inserting_after(solve):  # its inputs are the solve's: every reader of the states follows
            stream = graph.call_function(_seqpar.chain_stream.default, solve.args, solve.kwargs)
        with graph.inserting_after(stream):
            final = graph.call_function(operator.getitem, (stream, 0))
        created += [stream, final]
        for select in finals:
            select.replace_all_uses_with(final)
            graph.erase_node(select)
        if outputs is not None:
            for read in list(outputs.users):
                read.update_arg(0, stream)
                read.update_arg(1, read.args[1] + 1)
            graph.erase_node(outputs)
        graph.erase_node(solve)
        streamed.append(program.id)
    if streamed:
        graph.lint()
        annotate_new_nodes(gm, created)
        gm.recompile()
    return streamed


def _trace_blocks(program, solve: fx.Node) -> None:
    """:func:`~seqpar.runtime.stream.trace_blocks` on empty tensors shaped like one row of each per-step input
    of the solve (a layer parameter group's row: its first parameter; nothing stacked)."""
    def empty(node: fx.Node, lead=(), skip: int = 0) -> torch.Tensor:
        """An empty tensor like ``node``'s value, its first ``skip`` dims replaced by ``lead``."""
        value = node.meta.get("example_value", node.meta.get("val"))
        return torch.empty((*lead, *value.shape[skip:]), dtype=value.dtype, device=value.device)

    _, _, xs, shared, layer_params = solve.args
    leaves = with_layer_groups(program, [empty(node, (1,), 1) for node in xs], layer_params,
                               lambda group: empty(group[0], (1,)))
    trace_blocks(program, leaves, [empty(node) for node in shared])


def _end_reads(solve: fx.Node, length: int) -> tuple[list[fx.Node], fx.Node | None] | None:
    """``(selects of the last state, the chain_outputs call or None)`` where these are all that read the states
    ``solve`` returns (each output of chain_outputs read by an integer ``getitem``), else ``None``."""
    finals, outputs = [], []
    for user in solve.users:
        if user.target is torch.ops.aten.select.int and user.args[1:] in ((0, length - 1), (0, -1)):
            finals.append(user)
        elif (user.target is _seqpar.chain_outputs.default and user.args[2] is solve
              and (user.args[:2], user.args[3:]) == (solve.args[:2], solve.args[2:])):
            outputs.append(user)
        else:
            return None
    if len(outputs) > 1 or any(read.target is not operator.getitem or not isinstance(read.args[1], int)
                               for node in outputs for read in node.users):
        return None
    return finals, (outputs[0] if outputs else None)
