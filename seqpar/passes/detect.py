"""Detection: find chains of isomorphic Markov segments in a Dynamo FX graph.

``find_chains(gm)`` returns every maximal run of ``L >= min_chain`` consecutive
segments ``S_0 .. S_{L-1}`` of ``gm``'s graph such that segment ``l`` computes

    s_{l+1} = f(s_l, x_l, *shared)        s_l: a tensor of shape ``state_shape``

with the same ``f`` for every ``l``: ``S_l`` reads values of earlier segments
only through ``s_l`` (the output of ``S_{l-1}``, or the chain's ``start``),
its per-step inputs ``x_l`` (placeholders that differ per segment: layer
parameters; literals that differ per segment: coefficients; and
state-independent values computed in or before the segment: ``W x_t``) and
values every segment shares (an RNN's ``U``).

Guarantees for each returned :class:`~seqpar.passes.chain.Chain`:
  * ``chain.step(s_l, *x_l, *shared)`` computes exactly what ``nodes[l]``
    compute: the nodes are copied from segment 0 (``call_method`` becomes the
    ``torch.Tensor`` function, ``invoke_subgraph`` calls are inlined);
  * no node of ``nodes[l]`` has side effects (in-place ops, global state,
    random draws, ``call_module``, higher-order ops other than
    ``invoke_subgraph``);
  * only ``outputs[l]`` of a segment is read after the chain (``used_outside``
    lists which); hoisted per-step values (``"computed"``) and shared values
    do not depend on ``start`` and are left in the graph.
Repeated structures rejected for one of these reasons come back as
:class:`~seqpar.passes.chain.Candidate` with the reason.

How: each non-placeholder node gets a token (op, target, argument structure
with numbers abstracted, output shape and dtype). Candidate periods ``p`` are
the distances between equal tokens; for each, runs of positions ``i`` with
``token[i] == token[i+p]`` and arguments that correspond (same node, both
placeholders, or shifted by ``p``) give repeated regions. Each region is cut
into segments of ``p`` nodes at the phases where the fewest values cross the
boundary, then checked segment by segment (one carried state, same
dependence structure, side effects, literals), splitting it where a check
fails. Overlapping results are resolved by covered nodes. All of it is linear
in the graph size per candidate period.
"""

from __future__ import annotations

import functools
import logging
import operator
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.fx.node import Node

from .chain import Candidate, Chain, ChainInput

log = logging.getLogger(__name__)

__all__ = ["find_chains"]

# Candidate periods examined per graph (the most frequent token distances).
MAX_PERIODS = 48
# Segment phases validated per repeated region (those with the fewest live values).
MAX_PHASES = 4

BATCHNORM_TRAINING = "BatchNorm in training mode updates running statistics; chain left sequential"


def find_chains(gm: fx.GraphModule, *, min_chain: int = 4) -> tuple[list[Chain], list[Candidate]]:
    """The chains of at least ``min_chain`` steps in ``gm``, and the rejected repeats.

    ``gm`` is a Dynamo graph (parameters as placeholders, loops unrolled,
    ``example_value`` meta). The graph is not modified. Chains are returned in
    graph order and never overlap.
    """
    return _Detector(gm, max(2, int(min_chain))).run()


# --------------------------------------------------------------------------- #
# Argument structure
# --------------------------------------------------------------------------- #

_NODE = "<node>"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sig(arg):
    """Hashable structure of an argument: nodes and numbers abstracted."""
    if isinstance(arg, Node):
        return _NODE
    if isinstance(arg, (tuple, list)):
        return ("seq", tuple(_sig(a) for a in arg))
    if isinstance(arg, dict):
        return ("dict", tuple((k, _sig(v)) for k, v in arg.items()))
    if isinstance(arg, slice):
        return ("slice", _sig(arg.start), _sig(arg.stop), _sig(arg.step))
    if _is_number(arg):
        return type(arg).__name__
    try:
        hash(arg)
        return arg
    except TypeError:
        return repr(arg)


def _flatten(arg, out: list) -> list:
    """Leaves of an argument structure, in a fixed order (matches :func:`_rebuild`)."""
    if isinstance(arg, (tuple, list)):
        for a in arg:
            _flatten(a, out)
    elif isinstance(arg, dict):
        for a in arg.values():
            _flatten(a, out)
    elif isinstance(arg, slice):
        _flatten(arg.start, out)
        _flatten(arg.stop, out)
        _flatten(arg.step, out)
    else:
        out.append(arg)
    return out


def _rebuild(arg, leaf: Callable[[int, Any], Any], counter: list[int]):
    """``arg`` with leaf ``j`` (in :func:`_flatten` order) replaced by ``leaf(j, value)``."""
    if isinstance(arg, (tuple, list)):
        items = [_rebuild(a, leaf, counter) for a in arg]
        return tuple(items) if isinstance(arg, tuple) else items
    if isinstance(arg, dict):
        return {k: _rebuild(v, leaf, counter) for k, v in arg.items()}
    if isinstance(arg, slice):
        return slice(_rebuild(arg.start, leaf, counter), _rebuild(arg.stop, leaf, counter),
                     _rebuild(arg.step, leaf, counter))
    index = counter[0]
    counter[0] += 1
    return leaf(index, arg)


def _val_sig(value):
    """Shape and dtype of an ``example_value`` (hashable)."""
    if isinstance(value, torch.Tensor):
        return (tuple(d if isinstance(d, int) else str(d) for d in value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(_val_sig(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value if not _is_number(value) else type(value).__name__
    return type(value).__name__


def _example(node: Node):
    return node.meta.get("example_value", node.meta.get("val"))


# --------------------------------------------------------------------------- #
# Targets: names, side effects
# --------------------------------------------------------------------------- #


def _target_name(node: Node) -> str:
    if node.op == "call_method":
        return node.target
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[-1]
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", str(target))


def _is_invoke_subgraph(node: Node) -> bool:
    return (node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator)
            and _target_name(node) == "invoke_subgraph")


def _arg(node: Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


_RANDOM = {
    "rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm", "normal",
    "bernoulli", "multinomial", "poisson", "native_dropout", "rrelu",
}
_DROPOUTS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
             "feature_dropout"}
_GLOBAL_STATE = {
    "_set_grad_enabled", "set_grad_enabled", "_enter_autocast", "_exit_autocast", "manual_seed", "seed",
    "set_rng_state", "_record_function_enter", "_record_function_enter_new", "_record_function_exit",
    "set_default_dtype", "_set_deterministic_algorithms", "print",
}
_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift, operator.setitem, operator.delitem,
}
_INPLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
                    "__imatmul__", "__iand__", "__ior__", "__ixor__", "__setitem__", "__delitem__"}


def _side_effect(node: Node, on_state: bool) -> str | None:
    """Why ``node`` may not be inside a chain, or ``None``."""
    if node.op == "call_module":
        return f"{node.name} calls module {node.target}, which detection cannot see into"
    if node.op not in ("call_function", "call_method"):
        return None
    name = _target_name(node)
    if name == "batch_norm" and _arg(node, 5, "training", False) is True:
        return BATCHNORM_TRAINING
    if isinstance(node.target, torch._ops.HigherOrderOperator) and name != "invoke_subgraph":
        return f"{node.name} is a torch.ops.higher_order.{name} call"
    if name in _GLOBAL_STATE or name.startswith("_set_"):
        return f"{node.name} ({name}) changes global state"
    if (node.target in _INPLACE_OPERATORS or name in _INPLACE_DUNDERS or node.kwargs.get("inplace") is True
            or (name.endswith("_") and not name.startswith("_"))):
        return f"{node.name} ({name}) mutates a tensor in place"
    if on_state and (name in _RANDOM or (name in _DROPOUTS and _arg(node, 2, "training", True) is True)):
        return f"{node.name} ({name}) draws random numbers on the state path"
    return None


def _is_random(node: Node) -> bool:
    name = _target_name(node) if node.op in ("call_function", "call_method") else ""
    return name in _RANDOM or (name in _DROPOUTS and _arg(node, 2, "training", True) is True)


# Ops whose Python-number operands may become 0-d tensors (per-step "constant" inputs).
_ARITHMETIC = {
    "add", "sub", "mul", "truediv", "div", "true_divide", "rsub", "pow", "lerp", "maximum", "minimum",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
    "__pow__", "__rpow__",
}


def _may_vary(node: Node, leaf: int) -> bool:
    """Whether leaf ``leaf`` of ``node`` may differ between steps (a top-level arithmetic operand)."""
    if node.op not in ("call_function", "call_method") or _target_name(node) not in _ARITHMETIC:
        return False
    args = node.args
    return leaf < len(args) and all(not isinstance(a, (tuple, list, dict, slice)) for a in args[: leaf + 1])


# --------------------------------------------------------------------------- #
# Module paths
# --------------------------------------------------------------------------- #

_GETATTR = re.compile(r"getattr\(([^()]*?), '([^']*)'\)")


@functools.lru_cache(maxsize=4096)
def _normalise_path(path: str) -> str:
    while True:
        new = _GETATTR.sub(r"\1.\2", path)
        if new == path:
            break
        path = new
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    path = path.replace("._modules.", ".")
    path = re.sub(r"^L\.[A-Za-z_]\w*", "", path)  # L['self'] after the rewrites above
    return path.strip(".")


def _module_path(node: Node) -> list[str] | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    entry = list(stack.values())[-1]
    path = entry[0] if isinstance(entry, tuple) else str(entry)
    path = _normalise_path(path)
    return path.split(".") if path else []


def _varying_path(a: Node, b: Node) -> str | None:
    """``a``'s module path cut after the first component where ``b``'s differs."""
    pa, pb = _module_path(a), _module_path(b)
    if pa is None or pb is None:
        return None
    for i, (x, y) in enumerate(zip(pa, pb)):
        if x != y:
            return ".".join(pa[: i + 1])
    return None


# --------------------------------------------------------------------------- #
# Plans: a validated run of segments, before the step is built
# --------------------------------------------------------------------------- #


@dataclass
class _Input:
    kind: str  # "parameter" | "computed" | "constant" | "shared"
    slots: list[tuple[int, int]]  # (offset in segment, leaf index)
    nodes: list[Node] = field(default_factory=list)  # per segment (or [node] when shared)
    values: list[Any] = field(default_factory=list)


@dataclass
class _Plan:
    period: int
    begin: int  # index in the node sequence of segment 0's first node
    length: int
    s0: Node
    state_offset: int
    dep_offsets: list[int]  # offsets of the state-dependent nodes (same in every segment)
    inputs: list[_Input]
    used_outside: list[int]

    @property
    def end(self) -> int:
        return self.begin + self.length * self.period


@dataclass
class _Attempt:
    plan: _Plan | None
    valid: int  # segments that passed
    fail_at: int | None = None
    reason: str | None = None
    s0: Node | None = None


# --------------------------------------------------------------------------- #
# The detector
# --------------------------------------------------------------------------- #


class _Detector:
    def __init__(self, gm: fx.GraphModule, min_chain: int):
        self.gm = gm
        self.min_chain = min_chain
        self.seq: list[Node] = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
        self.pos: dict[Node, int] = {n: i for i, n in enumerate(self.seq)}
        self.leaves: dict[Node, list] = {}
        tokens: dict[Any, int] = {}
        self.tok: list[int] = []
        for n in self.seq:
            self.leaves[n] = _flatten((n.args, n.kwargs), [])
            target = n.target if n.op != "call_function" or _hashable(n.target) else repr(n.target)
            key = (n.op, target, _sig(n.args), _sig(n.kwargs), _val_sig(_example(n)))
            self.tok.append(tokens.setdefault(key, len(tokens)))
        self.crossing = self._crossing()

    # ---- structure ------------------------------------------------------- #

    def _crossing(self) -> list[int]:
        """``crossing[k]``: values made before position ``k`` and still read at or after it."""
        n = len(self.seq)
        diff = [0] * (n + 2)
        for i, u in enumerate(self.seq):
            if u.op == "get_attr":
                continue
            last = max((self.pos.get(w, n) for w in u.users), default=i)
            if last > i:
                diff[i + 1] += 1
                diff[min(last, n) + 1] -= 1
        out, running = [], 0
        for k in range(n + 1):
            running += diff[k]
            out.append(running)
        return out

    def _periods(self) -> list[int]:
        last_seen: dict[int, int] = {}
        counts: Counter = Counter()
        for i, t in enumerate(self.tok):
            j = last_seen.get(t)
            if j is not None:
                counts[i - j] += 1
            last_seen[t] = i
        n = len(self.seq)
        periods = [p for p, c in counts.most_common() if c >= self.min_chain - 1 and p * self.min_chain <= n]
        return sorted(periods[:MAX_PERIODS])

    def _pair_ok(self, i: int, p: int) -> bool:
        """Whether node ``i + p`` reads what node ``i`` reads, one period later."""
        pos = self.pos
        for a, b in zip(self.leaves[self.seq[i]], self.leaves[self.seq[i + p]]):
            if a.__class__ is not Node or a is b:
                continue
            pa, pb = pos.get(a), pos.get(b)
            if pa is None and pb is None:  # two placeholders
                continue
            before_a = pa is None or pa < i
            if pb is not None and (pa is not None and pb - pa == p or pb >= i and before_a):
                continue  # shifted by one period, or the first read of the carried value
            if before_a and (pb is None or pb < i):
                continue  # values from before: shared or per-step (validation decides)
            return False
        return True

    def _runs(self, p: int) -> list[tuple[int, int]]:
        tok, n = self.tok, len(self.tok)
        need = (self.min_chain - 1) * p
        runs, i = [], 0
        while i < n - p:
            if tok[i] != tok[i + p] or not self._pair_ok(i, p):
                i += 1
                continue
            start = i
            while i < n - p and tok[i] == tok[i + p] and self._pair_ok(i, p):
                i += 1
            if i - start >= need:
                runs.append((start, i + p))
        return runs

    # ---- validation ------------------------------------------------------ #

    def _analyse(self, p: int, b: int, count: int) -> _Attempt:
        """The longest valid prefix of the segments ``seq[b + k p : b + (k+1) p]``, ``k < count``."""
        seq, pos, leaves = self.seq, self.pos, self.leaves
        starts: list[Node] = []
        for o in range(p):
            for a0, a1 in zip(leaves[seq[b + o]], leaves[seq[b + p + o]]):
                if a1.__class__ is Node and b <= pos.get(a1, -1) < b + p and a0.__class__ is Node:
                    q = pos.get(a0)
                    if (q is None or q < b) and a0 not in starts:
                        starts.append(a0)
        if not starts:
            return _Attempt(None, 1, 1, "the segments do not read each other: no carried state")
        best = None
        for s0 in starts:
            attempt = self._analyse_from(p, b, count, s0)
            if best is None or attempt.valid > best.valid:
                best = attempt
        return best

    def _analyse_from(self, p: int, b: int, count: int, s0: Node) -> _Attempt:
        seq, pos, leaves = self.seq, self.pos, self.leaves

        def fail(k: int, reason: str) -> _Attempt:
            valid = k
            plan = self._plan(p, b, valid, s0, state_offset, dep0, slots, literals) if valid >= 2 else None
            if plan is not None:
                valid = plan.length
            return _Attempt(plan, valid, k, reason, s0)

        state_offset, dep0, sslots0 = -1, [], set()
        slots: dict[tuple[int, int], list[Node]] = {}
        literals: dict[tuple[int, int], list] = {}
        example0 = _example(s0)
        if not isinstance(example0, torch.Tensor):
            return fail(0, f"the carried value {s0.name} is not a tensor")
        dep = {s0}
        for i in range(pos.get(s0, -1) + 1, b):
            n = seq[i]
            if any(a.__class__ is Node and a in dep for a in leaves[n]):
                dep.add(n)
        state_in = s0
        internal0: dict = {}
        for k in range(count):
            base = b + k * p
            # side effects anywhere in the segment (the BatchNorm reason wins)
            reasons = [r for r in (_side_effect(seq[base + o], False) for o in range(p)) if r]
            if reasons:
                return fail(k, BATCHNORM_TRAINING if BATCHNORM_TRAINING in reasons else reasons[0])
            dep_offsets, sslots, internal = [], set(), {}
            local_slots, local_lits = {}, {}
            for o in range(p):
                n = seq[base + o]
                lv = leaves[n]
                if not any(a.__class__ is Node and a in dep for a in lv):
                    continue
                reason = _side_effect(n, True)
                if reason:
                    return fail(k, reason)
                dep.add(n)
                dep_offsets.append(o)
                invoke = _is_invoke_subgraph(n)
                for j, a in enumerate(lv):
                    if a.__class__ is Node:
                        if a in dep:
                            if a is state_in:
                                sslots.add((o, j))
                            else:
                                q = pos.get(a, -1)
                                if not base <= q < base + o:
                                    return fail(k, f"{n.name} in segment {k} reads {a.name}, a value from an "
                                                   f"earlier segment, not through the carried state")
                                internal[(o, j)] = q - base
                        elif not (invoke and j == 0):
                            local_slots[(o, j)] = a
                    elif _is_number(a):
                        local_lits[(o, j)] = a
            if k == 0:
                if not sslots:
                    return fail(0, "the first segment does not read the carried value")
                dep0, sslots0, internal0 = dep_offsets, sslots, internal
                for key, a in local_slots.items():
                    if a.op != "get_attr" and not isinstance(_example(a), torch.Tensor):
                        return fail(0, f"{seq[base + key[0]].name} reads {a.name}, which is not a tensor")
                if count > 1:
                    nxt = base + p
                    outs = [o for o in dep_offsets
                            if any(nxt <= pos.get(u, -1) < nxt + p for u in seq[base + o].users)]
                    if len(outs) != 1:
                        names = ", ".join(seq[base + o].name for o in outs)
                        return fail(1, f"segment 1 reads {len(outs)} values of segment 0 ({names}); "
                                       f"a chain carries exactly one" if outs else
                                       "segment 1 does not read segment 0")
                    state_offset = outs[0]
                    out0 = _example(seq[base + state_offset])
                    if _val_sig(out0) != _val_sig(example0):
                        return fail(0, f"the carried value changes from {_val_sig(example0)} to "
                                       f"{_val_sig(out0)} in the first segment")
            else:
                if dep_offsets != dep0 or sslots != sslots0 or internal != internal0 \
                        or local_slots.keys() != slots.keys():
                    return fail(k, f"segment {k} is not isomorphic to segment 0 on the state path")
                for key, a in local_slots.items():
                    a0 = slots[key][0]
                    if a is not a0 and _val_sig(_example(a)) != _val_sig(_example(a0)):
                        return fail(k, f"per-step input {a.name} of segment {k} has shape "
                                       f"{_val_sig(_example(a))}, segment 0 has {_val_sig(_example(a0))}")
                for key, v in local_lits.items():
                    v0 = literals[key][0]
                    if (v != v0 or type(v) is not type(v0)) and not _may_vary(seq[b + key[0]], key[1]):
                        return fail(k, f"{seq[base + key[0]].name}: the literal {v0!r} of segment 0 is {v!r} "
                                       f"in segment {k}; only arithmetic operands may differ per step")
            for key, a in local_slots.items():
                slots.setdefault(key, []).append(a)
            for key, v in local_lits.items():
                literals.setdefault(key, []).append(v)
            if state_offset >= 0:
                state_in = seq[base + state_offset]
        return fail(count, None) if count >= 2 else _Attempt(None, count, None, None, s0)

    def _plan(self, p, b, length, s0, state_offset, dep_offsets, slots, literals) -> _Plan | None:
        """Classify the inputs of ``length`` valid segments; trim at non-state values used later."""
        seq = self.seq
        while length >= 2:
            end = b + length * p
            used_outside, bad = [], None
            for k in range(length):
                base = b + k * p
                for o in dep_offsets:
                    n = seq[base + o]
                    if any(self.pos.get(u, len(seq)) >= end for u in n.users):
                        if o != state_offset:
                            bad = k
                            break
                        if k < length - 1:
                            used_outside.append(k)
                if bad is not None:
                    break
            if bad is None:
                break
            length = bad
        if length < 2:
            return None
        inputs: list[_Input] = []
        by_nodes: dict[tuple, _Input] = {}
        memo: dict[int, bool] = {}
        keys = sorted(set(slots) | {key for key, vals in literals.items()
                                    if any(v != vals[0] or type(v) is not type(vals[0]) for v in vals[:length])})
        for key in keys:
            if key in literals:
                inputs.append(_Input("constant", [key], values=literals[key][:length]))
                continue
            nodes = slots[key][:length]
            first = nodes[0]
            if all(x is first for x in nodes) or self._invariant(p, b, length, nodes, memo):
                ident: tuple = ("shared", first)
                kind, nodes = "shared", [first]
            else:
                ident = tuple(nodes)
                kind = "parameter" if all(x.op == "placeholder" for x in nodes) else "computed"
            existing = by_nodes.get(ident)
            if existing is not None:
                existing.slots.append(key)
            else:
                by_nodes[ident] = entry = _Input(kind, [key], nodes=nodes)
                inputs.append(entry)
        return _Plan(p, b, length, s0, state_offset, dep_offsets, inputs, used_outside)

    def _invariant(self, p: int, b: int, length: int, nodes: list[Node], memo: dict[int, bool]) -> bool:
        """Whether ``nodes`` (one per segment) are the same computation on the same values."""
        q = self.pos.get(nodes[0], -1) - b
        if not 0 <= q < p:
            return False
        if any(self.pos.get(x, -1) != b + k * p + q for k, x in enumerate(nodes)):
            return False
        if q in memo:
            return memo[q]
        memo[q] = False  # cycles cannot happen; this guards recursion on odd input
        first = nodes[0]
        ok = not _is_random(first) and first.op != "call_module"
        columns = list(zip(*(self.leaves[x] for x in nodes)))
        for column in columns:
            if not ok:
                break
            a0 = column[0]
            if a0.__class__ is Node:
                if all(a is a0 for a in column):
                    ok = self.pos.get(a0, -1) < b  # a value made before the run
                else:
                    ok = all(a.__class__ is Node for a in column) and self._invariant(p, b, length, list(column), memo)
            else:
                ok = all(a == a0 and type(a) is type(a0) for a in column)
        memo[q] = ok
        return ok

    # ---- regions, phases, cover ----------------------------------------- #

    def _cover(self, p: int, b: int, count: int):
        plans, failures = [], []
        k0 = 0
        while count - k0 >= self.min_chain:
            attempt = self._analyse(p, b + k0 * p, count - k0)
            if attempt.plan is not None and attempt.plan.length >= self.min_chain:
                plans.append(attempt.plan)
            if attempt.fail_at is None or attempt.reason is None:
                break
            failures.append((k0 + attempt.fail_at, attempt.reason, attempt.s0))
            k0 += max(attempt.fail_at, 1)
        return plans, failures

    def _module_score(self, p: int, b: int, count: int) -> int:
        if count < 3:
            return 0
        seg = b + p
        paths = {_varying_path(self.seq[seg + o], self.seq[seg + p + o]) for o in range(p)}
        paths.discard(None)
        return len(paths)

    def _region(self, p: int, r0: int, r1: int):
        """The best segmentation of the repeated region ``seq[r0:r1]`` with period ``p``."""
        phases = [f for f in range(p) if r0 + f + self.min_chain * p <= r1]
        if not phases:
            return None
        lowest = min(self.crossing[r0 + f + p] for f in phases)
        phases = [f for f in phases if self.crossing[r0 + f + p] == lowest][:MAX_PHASES]
        best = None
        for f in phases:
            b = r0 + f
            count = (r1 - b) // p
            plans, failures = self._cover(p, b, count)
            covered = sum(plan.length for plan in plans)
            state_last = all(plan.state_offset == plan.dep_offsets[-1] for plan in plans)
            score = (covered, -self._module_score(p, b, count), b + count * p - r1, state_last, -f)
            if best is None or score > best[0]:
                best = (score, p, b, count, plans, failures)
        return best

    def run(self) -> tuple[list[Chain], list[Candidate]]:
        queue: list[tuple[_Plan, tuple[int, int, int]]] = []
        rejected: list[tuple[int, int, int, int, str, Node | None]] = []  # (begin, end, period, count, ...)
        for p in self._periods():
            for r0, r1 in self._runs(p):
                result = self._region(p, r0, r1)
                if result is None:
                    continue
                _, p_, b, count, plans, failures = result
                queue.extend((plan, (p, r0, r1)) for plan in plans)
                if not plans and failures:
                    _, reason, s0 = failures[0]
                    rejected.append((b, b + count * p_, p_, count, reason, s0))
        # resolve overlaps: most covered nodes first, then the shorter period; a plan
        # that overlaps a taken one is re-segmented in what is left of its region
        taken: list[_Plan] = []
        while queue:
            queue.sort(key=lambda item: (-(item[0].end - item[0].begin), item[0].period, item[0].begin))
            plan, (p, r0, r1) = queue.pop(0)
            if all(plan.end <= t.begin or t.end <= plan.begin for t in taken):
                taken.append(plan)
                continue
            for s, e in _free_intervals(r0, r1, [(t.begin, t.end) for t in taken]):
                if (s, e) != (r0, r1) and e - s >= self.min_chain * p:
                    result = self._region(p, s, e)
                    if result is not None:
                        queue.extend((pl, (p, s, e)) for pl in result[4])
        taken.sort(key=lambda pl: pl.begin)
        chains = []
        for plan in taken:
            try:
                chains.append(self._chain(plan))
            except Exception as error:  # a step we cannot build is a candidate, never a crash
                log.debug("seqpar: could not build the step of a chain", exc_info=True)
                rejected.append((plan.begin, plan.end, plan.period, plan.length,
                                 f"could not build the step function: {error}", plan.s0))
        candidates, kept = [], []
        rejected.sort(key=lambda r: -(r[1] - r[0]))
        for begin, end, p, count, reason, s0 in rejected:
            overlaps = [t for t in taken if not (end <= t.begin or t.end <= begin)] + \
                       [r for r in kept if not (end <= r[0] or r[1] <= begin)]
            if overlaps:
                continue
            kept.append((begin, end))
            candidates.append(self._candidate(p, begin, count, reason, s0))
        log.debug("seqpar: %d chains, %d candidates in a graph of %d nodes", len(chains), len(candidates),
                  len(self.seq))
        return chains, candidates

    # ---- results ---------------------------------------------------------- #

    def _segment_modules(self, p: int, b: int, count: int, offsets: list[int]) -> list[str]:
        seq = self.seq
        modules = []
        for k in range(count):
            other = k + 1 if k + 1 < count else k - 1
            path = ""
            for o in offsets:
                found = _varying_path(seq[b + k * p + o], seq[b + other * p + o]) if other >= 0 else None
                if found:
                    path = found
                    break
            modules.append(path)
        return modules

    def _candidate(self, p, b, count, reason, s0) -> Candidate:
        nodes = self.seq[b: b + p]
        example = _example(s0) if s0 is not None else None
        shape = tuple(example.shape) if isinstance(example, torch.Tensor) else None
        return Candidate(
            kind=_guess_kind(nodes, s0),
            length=count,
            modules=self._segment_modules(p, b, count, list(range(p))),
            state_shape=shape,
            reason=reason,
        )

    def _chain(self, plan: _Plan) -> Chain:
        seq, p, b = self.seq, plan.period, plan.begin
        nodes = [[seq[b + k * p + o] for o in plan.dep_offsets] for k in range(plan.length)]
        outputs = [seq[b + k * p + plan.state_offset] for k in range(plan.length)]
        per_step = [
            ChainInput(inp.kind, nodes=list(inp.nodes)) if inp.kind != "constant"
            else ChainInput("constant", values=list(inp.values))
            for inp in plan.inputs if inp.kind != "shared"
        ]
        shared = [inp.nodes[0] for inp in plan.inputs if inp.kind == "shared"]
        step = self._build_step(plan)
        example = _example(plan.s0)
        facts = _step_facts(step, example.ndim)
        has_parameters = any(inp.kind == "parameter" for inp in per_step)
        if not has_parameters:
            # shared weights: a denoiser if it reads per-step coefficients (literals or
            # scalars/vectors such as table[i]) or is a conv/attention network; else an RNN
            coefficients = any(inp.kind == "constant" or (inp.kind == "computed"
                               and (_ndim(_example(inp.nodes[0])) or 0) <= 1) for inp in per_step)
            kind = "denoise" if coefficients or facts.attention or facts.convolution else "recurrent"
        elif facts.attention:
            kind = "transformer"
        elif facts.residual:
            kind = "residual"
        else:
            kind = "layers"
        return Chain(
            kind=kind,
            start=plan.s0,
            outputs=outputs,
            nodes=nodes,
            step=step,
            per_step=per_step,
            shared=shared,
            modules=self._segment_modules(p, b, plan.length, plan.dep_offsets),
            state_shape=tuple(example.shape),
            state_dtype=example.dtype,
            batch_ndim=facts.batch_ndim,
            used_outside=list(plan.used_outside),
        )

    def _build_step(self, plan: _Plan) -> fx.GraphModule:
        """``step(state, *per_step, *shared) -> next state``, copied from segment 0."""
        seq, b = self.seq, plan.begin
        graph = fx.Graph()
        state = graph.placeholder("state")
        state.meta = dict(plan.s0.meta)
        slot_map: dict[tuple[int, int], Node] = {}
        per_step = [inp for inp in plan.inputs if inp.kind != "shared"]
        shared = [inp for inp in plan.inputs if inp.kind == "shared"]
        for index, inp in enumerate(per_step):
            source = inp.nodes[0] if inp.nodes else None
            ph = graph.placeholder(f"x{index}_{source.name}" if source is not None else f"x{index}_constant")
            if source is not None:
                ph.meta = dict(source.meta)
            else:
                ph.meta["example_value"] = torch.tensor(inp.values[0])
            for key in inp.slots:
                slot_map[key] = ph
        for index, inp in enumerate(shared):
            ph = graph.placeholder(f"shared{index}_{inp.nodes[0].name}")
            ph.meta = dict(inp.nodes[0].meta)
            for key in inp.slots:
                slot_map[key] = ph
        env: dict[Node, Any] = {plan.s0: state}
        for o in plan.dep_offsets:
            n = seq[b + o]

            def leaf(j, a, o=o):
                mapped = slot_map.get((o, j))
                if mapped is not None:
                    return mapped
                if a.__class__ is Node:
                    return a if a.op == "get_attr" else env[a]
                return a

            args, kwargs = _rebuild((n.args, n.kwargs), leaf, [0])
            env[n] = _emit(graph, n, args, kwargs, self.gm)
        graph.output(env[seq[b + plan.state_offset]])
        graph.lint()
        step = fx.GraphModule(torch.nn.Module(), graph, class_name="SeqparStep")
        step.recompile()
        return step

def _free_intervals(r0: int, r1: int, used: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``[r0, r1)`` outside every interval of ``used``."""
    out, start = [], r0
    for b, e in sorted(used):
        if e <= start or b >= r1:
            continue
        if b > start:
            out.append((start, b))
        start = max(start, e)
    if start < r1:
        out.append((start, r1))
    return out


# --------------------------------------------------------------------------- #
# Building the step
# --------------------------------------------------------------------------- #


def _hashable(value) -> bool:
    try:
        hash(value)
        return True
    except TypeError:
        return False


def _emit(graph: fx.Graph, n: Node, args, kwargs, root: torch.nn.Module):
    """Copy ``n`` into ``graph`` with mapped arguments; returns a node or a tuple of nodes."""
    if _is_invoke_subgraph(n):
        body = root.get_submodule(n.args[0].target)
        return _inline(graph, body, list(args[2:]))
    if n.op == "call_function" and n.target is operator.getitem and isinstance(args[0], tuple):
        return args[0][args[1]]
    if n.op == "call_method":
        function = getattr(torch.Tensor, n.target, None)
        new = (graph.call_function(function, args, kwargs) if callable(function)
               else graph.call_method(n.target, args, kwargs))
    else:
        new = graph.create_node(n.op, n.target, args, kwargs, name=n.name)
    new.meta = dict(n.meta)
    return new


def _inline(graph: fx.Graph, body: fx.GraphModule, operands: list):
    """Copy ``body``'s nodes into ``graph``; returns the tuple of its outputs."""
    env: dict[Node, Any] = {}
    operands = iter(operands)
    for n in body.graph.nodes:
        if n.op == "placeholder":
            env[n] = next(operands)
        elif n.op == "output":
            out = n.args[0]
            return tuple(env[x] if x.__class__ is Node else x for x in out) if isinstance(out, (tuple, list)) \
                else (env[out],)
        elif n.op == "get_attr":
            env[n] = n
        else:
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda x: env[x] if x.op != "get_attr" else x)
            env[n] = _emit(graph, n, args, kwargs, body)
    raise ValueError("invoke_subgraph body has no output")


# --------------------------------------------------------------------------- #
# What the step does: batch dims, attention, residual
# --------------------------------------------------------------------------- #

_POINTWISE = {
    "add", "sub", "mul", "truediv", "div", "true_divide", "rsub", "neg", "pos", "pow", "floordiv", "mod",
    "abs", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "sin", "cos", "tan",
    "tanh", "sinh", "cosh", "asin", "acos", "atan", "sigmoid", "relu", "gelu", "silu", "mish", "elu", "selu",
    "celu", "leaky_relu", "softplus", "hardtanh", "relu6", "hardswish", "hardsigmoid", "logsigmoid",
    "tanhshrink", "softsign", "softshrink", "hardshrink", "erf", "erfc", "square", "clamp", "clamp_min",
    "clamp_max", "clip", "where", "maximum", "minimum", "lerp", "addcmul", "addcdiv", "reciprocal", "sign",
    "float", "double", "half", "bfloat16", "to", "type", "type_as", "contiguous", "clone", "detach",
    "dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d", "nan_to_num",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
    "__neg__", "__pow__", "__rpow__", "glu_", "logit", "xlogy", "copysign", "atan2", "hypot", "fmod",
    "remainder", "sgn", "trunc", "floor", "ceil", "round", "frac", "expand", "expand_as", "masked_fill",
    "threshold",
}
_MATMUL = {"matmul", "mm", "bmm", "__matmul__", "__rmatmul__"}
_REDUCTIONS = {"sum", "mean", "amax", "amin", "var", "std", "logsumexp", "norm", "prod", "nansum", "nanmean"}
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze", "view_as", "reshape_as"}
_ATTENTION = {"scaled_dot_product_attention", "multi_head_attention_forward", "_transformer_encoder_layer_fwd",
              "_native_multi_head_attention"}
_CONVS = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "convolution"}
_POOLS = {"max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
          "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool2d",
          "interpolate", "upsample", "upsample_nearest2d", "upsample_bilinear2d"}


@dataclass
class _StepFacts:
    batch_ndim: int
    attention: bool
    residual: bool
    convolution: bool


def _ndim(value) -> int | None:
    return value.ndim if isinstance(value, torch.Tensor) else None


def _dim(d, ndim):
    return d + ndim if isinstance(d, int) and d < 0 else d


def _step_facts(step: fx.GraphModule, state_ndim: int) -> _StepFacts:
    """Batch dims the step keeps independent, and what kind of block it is.

    Tracks, for each state-dependent value, which of its dims carry which state
    dim ("labels"). A label survives an op only if the op treats that dim
    elementwise (pointwise ops, contractions over other dims, normalisations
    over other dims, dim-preserving reshapes); unknown ops drop all labels.
    ``batch_ndim`` is the largest ``k < state_ndim`` with labels ``0..k-1``
    intact at dims ``0..k-1`` of the output.
    """
    destroyed: set[int] = set()
    labels: dict[Node, Any] = {}
    attention = residual = convolution = False
    state = None

    def lab(x):
        return labels.get(x) if x.__class__ is Node else None

    def present(value, acc):
        if isinstance(value, list):
            for v in value:
                present(v, acc)
        elif isinstance(value, tuple):
            acc.update(l for l in value if l is not None)
        return acc

    def align(ndim, operands):
        out = [None] * ndim
        owner = [False] * ndim
        for labs in operands:
            off = ndim - len(labs)
            for i, l in enumerate(labs):
                at = off + i
                if at < 0:
                    if l is not None:
                        destroyed.add(l)
                    continue
                if not owner[at]:
                    out[at], owner[at] = l, True
                elif out[at] != l:
                    for x in (out[at], l):
                        if x is not None:
                            destroyed.add(x)
                    out[at] = None
        return tuple(out)

    def without(labs, dims):
        dims = {_dim(d, len(labs)) for d in dims}
        for d in dims:
            if isinstance(d, int) and 0 <= d < len(labs) and labs[d] is not None:
                destroyed.add(labs[d])
        return tuple(None if i in dims else l for i, l in enumerate(labs))

    def reshape(labs, shape_in, shape_out):
        out = [None] * len(shape_out)
        prefix_in = [1]
        for s in shape_in:
            prefix_in.append(prefix_in[-1] * s)
        prefix_out = [1]
        for s in shape_out:
            prefix_out.append(prefix_out[-1] * s)
        for i, l in enumerate(labs):
            if l is None:
                continue
            hit = [j for j in range(len(shape_out))
                   if prefix_out[j] == prefix_in[i] and shape_out[j] == shape_in[i]]
            if len(hit) == 1:
                out[hit[0]] = l
            else:
                destroyed.add(l)
        return tuple(out)

    for n in step.graph.nodes:
        if n.op == "placeholder":
            if state is None:
                state = n
                labels[n] = tuple(range(state_ndim))
            continue
        if n.op == "output":
            result = lab(n.args[0])
            break
        flat = _flatten((n.args, n.kwargs), [])
        dep_args = [a for a in flat if a.__class__ is Node and labels.get(a) is not None]
        if not dep_args:
            continue
        name = _target_name(n)
        value = _example(n)
        ndim = _ndim(value)
        first = lab(n.args[0]) if n.args else None
        inputs_present = set()
        for a in dep_args:
            present(labels[a], inputs_present)
        out: Any = None
        if name in _ATTENTION:
            attention = True
        if name in _CONVS:
            convolution = True
        if name in ("add", "__add__", "__radd__", "sub", "__sub__") and state in dep_args and len(dep_args) == 2:
            residual = True
        tensors_ok = all(isinstance(labels[a], tuple) for a in dep_args)
        if not tensors_ok and not (n.target is operator.getitem and isinstance(first, list)):
            out = None
        elif n.target is operator.getitem and isinstance(first, list):
            out = first[n.args[1]] if isinstance(n.args[1], int) and n.args[1] < len(first) else None
        elif name in _POINTWISE and ndim is not None:
            out = align(ndim, [labels[a] for a in dep_args])
        elif name == "batch_norm" and ndim is not None and len(dep_args) == 1 and first is not None:
            out = first if _arg(n, 5, "training", False) is not True else None
        elif name == "linear" and first is not None and len(dep_args) == 1:
            out = first[:-1] + (None,)
            without(first, [-1])
        elif name in _MATMUL and ndim is not None and len(n.args) >= 2:
            a_l, b_l = lab(n.args[0]), lab(n.args[1])
            if name == "__rmatmul__":
                a_l, b_l = b_l, a_l
            a_v, b_v = (_example(x) if x.__class__ is Node else None for x in n.args[:2])
            if name == "__rmatmul__":
                a_v, b_v = b_v, a_v
            if a_l is not None and b_l is None and len(a_l) >= 2:
                without(a_l, [-1])
                out = align(ndim - 1, [a_l[:-1]]) + (None,) if _ndim(b_v) and _ndim(b_v) >= 2 else None
            elif b_l is not None and a_l is None and len(b_l) >= 2:
                without(b_l, [-2])
                out = align(ndim - 2, [b_l[:-2]]) + (None, b_l[-1])
            elif a_l is not None and b_l is not None and len(a_l) >= 2 and len(b_l) >= 2:
                attention = True
                without(a_l, [-1])
                without(b_l, [-2])
                out = align(ndim - 2, [a_l[:-2], b_l[:-2]]) + (a_l[-2], b_l[-1])
        elif name in ("layer_norm", "rms_norm") and first is not None and len(dep_args) == 1:
            shape = _arg(n, 1, "normalized_shape")
            k = len(shape) if isinstance(shape, (tuple, list)) else 1
            out = without(first, list(range(-k, 0)))
        elif name in ("group_norm", "instance_norm") and first is not None and len(dep_args) == 1:
            keep = 1 if name == "group_norm" else 2
            out = without(first, list(range(keep, len(first))))
        elif name in ("softmax", "log_softmax", "normalize", "cumsum") and first is not None and len(dep_args) == 1:
            d = _arg(n, 1 if name != "normalize" else 2, "dim", None if name != "normalize" else 1)
            out = without(first, [d]) if isinstance(d, int) else None
        elif name in _REDUCTIONS and first is not None and len(dep_args) == 1 and ndim is not None:
            d = _arg(n, 1, "dim")
            if isinstance(d, int):
                d = [d]
            if isinstance(d, (tuple, list)) and all(isinstance(x, int) for x in d):
                dims = {_dim(x, len(first)) for x in d}
                kept = without(first, list(dims))
                out = kept if ndim == len(first) else tuple(l for i, l in enumerate(kept) if i not in dims)
        elif name in ("transpose", "swapaxes", "swapdims") and first is not None and len(n.args) >= 3:
            d0, d1 = _dim(n.args[1], len(first)), _dim(n.args[2], len(first))
            lst = list(first)
            lst[d0], lst[d1] = lst[d1], lst[d0]
            out = tuple(lst)
        elif name == "permute" and first is not None:
            dims = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (tuple, list)) else n.args[1:]
            if len(dims) == len(first):
                out = tuple(first[_dim(d, len(first))] for d in dims)
        elif name == "t" and first is not None and len(first) == 2:
            out = (first[1], first[0])
        elif name in _RESHAPES and first is not None and ndim is not None:
            shape_in = _example(n.args[0]).shape
            out = reshape(first, list(shape_in), list(value.shape))
        elif name in ("chunk", "split", "unbind", "tensor_split") and first is not None \
                and isinstance(value, (tuple, list)):
            d = _arg(n, 2 if name != "unbind" else 1, "dim", 0)
            kept = without(first, [d])
            if name == "unbind":
                kept = tuple(l for i, l in enumerate(kept) if i != _dim(d, len(first)))
            out = [kept for _ in value]
        elif name in ("cat", "concat", "stack") and ndim is not None:
            parts = [lab(x) for x in n.args[0]] if isinstance(n.args[0], (tuple, list)) else []
            d = _dim(_arg(n, 1, "dim", 0), ndim)
            dep_parts = [x for x in parts if x is not None]
            if dep_parts and all(len(x) == len(dep_parts[0]) for x in dep_parts) and len(dep_parts) == len(parts):
                if name == "stack":
                    dep_parts = [x[:d] + (None,) + x[d:] for x in dep_parts]
                out = without(align(ndim, dep_parts), [d])
        elif name in _CONVS and first is not None and len(dep_args) == 1 and ndim is not None and ndim >= 3:
            out = (first[0],) + (None,) * (ndim - 1)
        elif name in _POOLS and first is not None and len(dep_args) == 1 and ndim is not None and ndim >= 3:
            out = (first[0], first[1]) + (None,) * (ndim - 2)
        elif name == "multi_head_attention_forward" and isinstance(value, (tuple, list)):
            q, k, v = (lab(x) for x in n.args[:3])
            dep_qkv = [x for x in (q, k, v) if x is not None]
            if len(dep_qkv) == 3 and all(len(x) == 3 for x in dep_qkv):
                batch = align(1, [x[1:2] for x in dep_qkv])[0]
                out = [(None, batch, None), (batch, None, None)]
        elif name == "scaled_dot_product_attention" and ndim is not None:
            dep_qkv = [lab(x) for x in n.args[:3] if lab(x) is not None]
            if dep_qkv and all(len(x) == ndim for x in dep_qkv):
                out = align(ndim - 2, [x[:-2] for x in dep_qkv]) + (None, None)
        elif name == "_transformer_encoder_layer_fwd" and first is not None and len(first) == 3:
            out = (first[0], None, None)
        if out is None:
            out = [None] * len(value) if isinstance(value, (tuple, list)) else None
        # labels that vanish or repeat have been mixed
        out_present = present(out, set())
        destroyed.update(inputs_present - out_present)
        if isinstance(out, tuple):
            seen = Counter(l for l in out if l is not None)
            destroyed.update(l for l, c in seen.items() if c > 1)
        labels[n] = out if out is not None else (None,) * (ndim or 0)
        if out is None and ndim is None:
            labels[n] = [None]
    else:
        result = None
    batch = 0
    if isinstance(result, tuple):
        while batch < min(state_ndim - 1, len(result)) and result[batch] == batch and batch not in destroyed:
            batch += 1
    return _StepFacts(batch, attention, residual, convolution)


def _guess_kind(nodes: list[Node], s0: Node | None) -> str:
    names = {_target_name(n) for n in nodes if n.op in ("call_function", "call_method")}
    if names & _ATTENTION or ("softmax" in names and names & _MATMUL):
        return "transformer"
    if s0 is not None and any(_target_name(n) in ("add", "__add__", "sub") and s0 in n.args for n in nodes
                              if n.op in ("call_function", "call_method")):
        return "residual"
    has_params = any(a.op == "placeholder" for n in nodes for a in n.all_input_nodes)
    return "layers" if has_params else "recurrent"
