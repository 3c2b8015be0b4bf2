"""In-place ops a step may compute out of place: ``relu_``, ``out += identity``, ``nn.ReLU(inplace=True)``.

A ResNet block writes in place to values it has just made (``bn(conv(x))``);
replacing such a write ``m = op_(a, ...)`` by its out-of-place twin
``op(a, ...)`` (:func:`~seqpar.passes.effects.out_of_place`) changes no value
any node reads when nothing can see the old value of ``a`` after ``m``.
:func:`inplace_reason` returns ``None`` only when, reading aliasing from the
nodes' example values (tensors that share a storage alias; Dynamo records
views and in-place results that way):

  * every alias of ``a`` (``a`` itself, views of it, earlier in-place results
    on it) is made inside the segment, so the write reaches no graph input,
    parameter or buffer, no attribute, no value of an earlier segment and not
    the carried state;
  * every alias made before ``m`` is read by nothing after ``m`` (``m``'s
    own result and what is made from it are the new value), and every node
    that reads one, or that one reads, has an example value (else an unseen
    view could escape);
  * the twin computes a tensor of ``m``'s shape and dtype (``a += b`` may
    promote where ``a.add(b)`` does; ``a.eq_(b)`` keeps ``a``'s dtype,
    ``a.eq(b)`` is bool).

Otherwise it says why, naming the node and what it writes to. The step then
calls the twin (:mod:`.step`); the graph keeps ``m`` until the chain replaces it.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.node import Node
from torch.multiprocessing.reductions import StorageWeakRef

from .effects import out_of_place
from .tokens import call_arg, example, target_name, value_signature


class Aliases:
    """The nodes of a graph whose example values share a storage, by storage."""

    def __init__(self, graph: fx.Graph):
        self._by_storage: dict[StorageWeakRef, list[Node]] = {}
        for node in graph.nodes:
            for key in storages(example(node)):
                self._by_storage.setdefault(key, []).append(node)

    def of(self, node: Node) -> list[Node] | None:
        """The nodes that alias ``node``'s tensor (``node`` included), or ``None`` where it has none."""
        key = tensor_storage(node)
        return None if key is None else self._by_storage.get(key, [])


def tensor_storage(node: Node) -> StorageWeakRef | None:
    """The storage of ``node``'s value where that is one strided tensor, else ``None`` (unknown)."""
    keys = storages(example(node))
    return keys[0] if len(keys) == 1 and isinstance(example(node), torch.Tensor) else None


def inplace_reason(node: Node, aliases: Aliases, pos: dict[Node, int], begin: int, state: list[Node]) -> str | None:
    """Why the in-place ``node`` of the segment that starts at ``pos == begin`` may not be computed out of
    place, or ``None`` (see the module docstring); ``state``: the nodes the segment reads as the carried state."""
    name = target_name(node)
    what = f"{node.name} ({name}) mutates"
    twin = out_of_place(node.op, node.target, node.args, node.kwargs)
    target = call_arg(node, 0, "input")
    if twin is None or target.__class__ is not Node:
        return f"{what} a tensor in place and has no out-of-place form"
    found = aliases.of(target)
    if found is None:
        return f"{what} {target.name} in place, and what {target.name} aliases is unknown (no example value)"
    at = pos[node]
    for alias in found:
        if alias in state:
            return f"{what} the carried state {alias.name} in place"
        if alias.op in ("placeholder", "get_attr"):
            return f"{what} {target.name} in place, which is (a view of) {alias.name}: a graph input, parameter, " \
                   "buffer or attribute"
        where = pos.get(alias, -1)
        if where < begin:
            return f"{what} {target.name} in place, which is (a view of) {alias.name}, made before the segment"
        if where >= at:
            continue  # the new value, or made from it
        for user in alias.users:
            if user is not node and pos.get(user, len(pos)) > at:
                return f"{what} {target.name} in place, and {user.name} reads {alias.name} afterwards"
        unknown = [n for n in (*alias.users, *alias.all_input_nodes) if example(n) is None]
        if unknown:
            return f"{what} {target.name} in place, and whether {unknown[0].name} aliases it is unknown " \
                   "(no example value)"
    return _twin_reason(node, twin, what)


def _twin_reason(node: Node, twin: tuple, what: str) -> str | None:
    """Why ``twin`` (the out-of-place call) does not compute a tensor like ``node``'s, or ``None``."""
    op, target, args, kwargs = twin
    try:
        args, kwargs = fx.node.map_arg((args, kwargs), example)
        function = getattr(torch.Tensor, target) if op == "call_method" else target
        with torch.no_grad():
            value = function(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - any failure means we cannot tell
        return f"{what} a tensor in place, and its out-of-place form failed on example values: {error}"
    expected, got = value_signature(example(node)), value_signature(value)
    if got != expected:
        return f"{what} a tensor in place, and its out-of-place form computes {got}, not {expected}"
    return None


def storages(value) -> list[StorageWeakRef]:
    """The storages of the tensors in an example value (a tensor, or a tuple/list of them)."""
    items = value if isinstance(value, (tuple, list)) else [value]
    keys = []
    for item in items:
        if isinstance(item, torch.Tensor) and item.layout == torch.strided:
            try:
                keys.append(StorageWeakRef(item.untyped_storage()))
            except (RuntimeError, NotImplementedError):
                pass
    return keys
