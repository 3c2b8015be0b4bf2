"""Outputs of a body-graph call that return one of its inputs, read from that input instead.

A block run under activation checkpointing (``tag_activation_checkpoint``) is
one call of a body graph; what the block returns unchanged, its body returns
as one of its placeholders (Dynamo refuses such an ``invoke_subgraph`` body:
no aliasing there). T5's blocks return
``(hidden, position_bias)``, the bias passed through from block 0: the call
``out_l = body(h_{l-1}, bias_{l-1}, ..)`` then reads ``bias_l = out_l[1]``,
and the chain's state would be the pair. When the body's output ``k`` is its
placeholder ``p`` (the call's operand ``a_p``), ``out[k]`` is ``a_p`` itself
(the same tensor: the body returns it, it computes nothing), so

    getitem(call, k)  ->  a_p

and every block reads block 0's bias: a shared input, the state the hidden
states alone. :func:`read_returned_inputs` does this for every such output
of every body-graph call in the graph, and then calls a copy of the body
without those outputs where the call's result is read only by getitems:
Dynamo prunes the outputs nothing reads from a body it traces (the last
block's bias), and the bodies of all blocks should stay alike.
"""

from __future__ import annotations

import copy
import operator

import torch.fx as fx

from .tokens import subgraph_body, subgraph_call


def read_returned_inputs(gm: fx.GraphModule) -> int:
    """Point the readers of every ``getitem(call, k)`` whose body returns its placeholder as output ``k`` at the
    call's operand for it, and drop the getitem; returns how many were redirected (``gm`` recompiled if anything
    changed: a getitem redirected, or a call given a body without the outputs it returns unchanged)."""
    redirected = pruned = 0
    copies: dict[tuple[str, frozenset[int]], str] = {}  # (body, outputs dropped) -> the copy's name on gm
    for node in list(gm.graph.nodes):
        returned, count = _returned_operands(node)
        if not returned:
            continue
        for user in list(node.users):
            if _reads_output(user, node) and user.args[1] in returned:
                user.replace_all_uses_with(returned[user.args[1]])
                gm.graph.erase_node(user)
                redirected += 1
        if all(_reads_output(user, node) for user in node.users) and len(returned) < count:
            _call_without_outputs(gm, node, frozenset(returned), copies)
            pruned += 1
    if redirected or pruned:
        gm.recompile()
    return redirected


def _reads_output(user: fx.Node, call: fx.Node) -> bool:
    """Whether ``user`` is ``getitem(call, k)``."""
    return user.op == "call_function" and user.target is operator.getitem and user.args[0] is call


def _call_without_outputs(gm: fx.GraphModule, call: fx.Node, dropped: frozenset[int], copies: dict) -> None:
    """Make ``call`` call a copy of its body that returns all but its outputs ``dropped`` (read by nothing now),
    registered on ``gm`` under a name of its own (the body may be shared, also with the graph ``gm`` was copied
    from; calls of one body share its copy, through ``copies``), and renumber the getitems of the outputs kept."""
    old = call.args[0]
    name = copies.get((old.target, dropped))
    if name is None:
        body = subgraph_body(call)
        pruned = fx.GraphModule(body, copy.deepcopy(body.graph))
        (output,) = [n for n in pruned.graph.nodes if n.op == "output"]
        output.args = (tuple(value for k, value in enumerate(output.args[0]) if k not in dropped),)
        pruned.recompile()
        name = f"{old.target}_kept"
        while hasattr(gm, name):
            name += "_"
        gm.add_submodule(name, pruned)
        copies[old.target, dropped] = name
    with gm.graph.inserting_after(old):  # where Dynamo puts a body's get_attr: the calls' segments stay alike
        call.update_arg(0, gm.graph.get_attr(name))
    if not old.users:
        gm.graph.erase_node(old)
    for user in list(call.users):
        user.update_arg(1, user.args[1] - sum(k < user.args[1] for k in dropped))
    value = call.meta.get("example_value")
    if isinstance(value, (tuple, list)):
        call.meta["example_value"] = type(value)(v for k, v in enumerate(value) if k not in dropped)


def _returned_operands(node: fx.Node) -> tuple[dict[int, fx.Node], int]:
    """``({k: operand}, n)``: the outputs ``k`` of a body-graph call ``node`` that are its body's placeholders,
    and how many outputs its body returns (``({}, 0)`` where ``node`` is not such a call)."""
    first = subgraph_call(node)
    body = subgraph_body(node)
    if first is None or body is None:
        return {}, 0
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    operands = node.args[first:]
    if len(placeholders) != len(operands):
        return {}, 0
    (results,) = [n.args[0] for n in body.graph.nodes if n.op == "output"]
    if not isinstance(results, (tuple, list)):
        return {}, 0
    position = {placeholder: index for index, placeholder in enumerate(placeholders)}
    returned = {k: operands[position[value]] for k, value in enumerate(results)
                if isinstance(value, fx.Node) and value in position and isinstance(operands[position[value]], fx.Node)}
    return returned, len(results)
