"""Cut a graph into repeated segments: candidate periods, repeated regions, validated plans.

``Detector(gm, min_chain).find()`` returns :class:`Plan` records: runs of
``L >= min_chain`` consecutive segments ``seq[begin + l p : begin + (l+1) p]``
(``seq``: the graph's nodes without placeholders and output) such that
segment ``l``'s state-dependent nodes compute ``s_{l+1} = f(s_l, x_l, *shared)``
with the same ``f``:
  * they read values of earlier segments only through the carried state
    ``s_l``: one tensor, or a fixed tuple of tensors ("leaves"), each made by
    segment ``l-1`` at the same offset (``state_offsets``; ``starts`` for
    segment 0) with the same shape and dtype in every segment;
  * they sit at the same offsets (``dep_offsets``) in every segment, with the
    same argument structure, the same literals (or arithmetic operands listed
    as a per-step ``"constant"`` input) and no side effects (:mod:`.effects`)
    but in-place writes to values of their own segment that nothing reads
    afterwards, which the step computes out of place (:mod:`.inplace`);
  * every other value they read is a classified :class:`PlanInput` (a
    placeholder per segment, a slice ``P[a + l]`` of one tensor
    (:mod:`.slices`), a state-independent value, a literal, or one value all
    segments share); after the run, only a segment's state (``used_outside``)
    and its per-step outputs (``output_offsets``: tensors a segment computes
    besides its state, such as a readout appended to a list, read after the
    run) are read.
Plans never overlap. Repeats rejected by a check come back as
:class:`Rejection` with the reason.

How: each node gets a token (:func:`~seqpar.passes.tokens.node_token`).
Candidate periods ``p`` are the most frequent distances between equal tokens;
for each, runs of positions ``i`` with ``token[i] == token[i+p]`` and
arguments that correspond (same node, both placeholders, or shifted by ``p``)
give repeated regions. Each region is cut into segments of ``p`` nodes at the
phases where the fewest values cross the boundary (the phase that ends where
the region does first: a loop's step 0 can differ from the others, so the
region begins inside it, and extension adds it), then checked segment by
segment, splitting it where a check fails. The carried state is what the
next segment reads of a segment where the segment reads earlier values: each
such value alone, or all of them that depend on the state as one tuple. Overlapping plans are resolved by
covered nodes. All of it is linear in the graph size per candidate period.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import Node

from .effects import BATCHNORM_TRAINING, is_random, may_vary, mutates, side_effect
from .inplace import Aliases, inplace_reason
from .module_paths import varying_path
from .slices import as_slice
from .tokens import example, flatten_args, is_number, node_token, subgraph_call, target_name, value_signature

# Candidate periods examined per graph (the most frequent token distances).
MAX_PERIODS = 48
# Segment phases validated per repeated region (those with the fewest live values, the phases whose last
# segment ends where the region does first).
MAX_PHASES = 4


_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
               torch.div, torch.true_divide}


def scalar_source(n: Node, a: Node) -> Node | None:
    """The 0-d tensor ``t`` when ``n`` reads ``a = t.item()`` as an operand of ``+ - * /`` and reading ``t``
    instead computes the same, else ``None``.

    Dynamo reads a float argument that changed between calls from a 0-d float64 tensor (``item``, a symbolic
    float); a chain's step reads tensors. ``x op t`` equals ``x op float(t)`` where ``x`` is a float32 or float64
    tensor and the result keeps its dtype: a 0-d operand does not promote a tensor of its kind, and both forms
    round ``t`` to ``x``'s dtype before the op. Not for half or bfloat16 (their ops keep a Python number in
    float32), nor as ``alpha`` or ``rounding_mode``."""
    if not (a.op in ("call_method", "call_function") and getattr(a.target, "__name__", a.target) == "item"
            and len(a.args) == 1 and a.args[0].__class__ is Node):
        return None
    source, result = example(a.args[0]), example(n)
    if not (isinstance(source, torch.Tensor) and source.dim() == 0 and source.is_floating_point()):
        return None
    if n.op != "call_function" or n.target not in _ARITHMETIC or n.kwargs.get("rounding_mode") is not None:
        return None
    operands = [example(arg) if arg.__class__ is Node else arg for arg in n.args[:2] if arg is not a]
    return a.args[0] if (
        len(n.args) == 2 and sum(arg is a for arg in n.args) == 1 and isinstance(result, torch.Tensor)
        and result.dtype in (torch.float32, torch.float64) and all(
            isinstance(operand, torch.Tensor) and operand.dtype == result.dtype for operand in operands)
    ) else None


_SYMBOLIC_NUMBER = (
    " but a number Dynamo made symbolic (a float or int argument that changed between calls): a chain reads "
    "tensors; pass the number as a tensor, or set torch._dynamo.config.specialize_float (specialize_int) = True "
    "for a graph per value"
)


@dataclass
class PlanInput:
    """A value the step reads besides the state, seen across the segments (slots: where segment 0 reads it)."""

    kind: str  # "parameter" | "slice" | "computed" | "constant" | "shared"
    slots: list[tuple[int, int]]  # (offset in segment, leaf index)
    nodes: list[Node] = field(default_factory=list)  # per segment (or [node] when shared, [P] for a slice)
    values: list[Any] = field(default_factory=list)
    start: int = 0  # "slice": segment l reads views(P.select(dim, start + stride * l))
    dim: int = 0
    stride: int = 1
    views: list[Node] = field(default_factory=list)  # "slice": segment 0's [select, *views] (slices.Slice.chain)


@dataclass
class Plan:
    """A validated run of ``length`` segments of ``period`` nodes from ``seq[begin]``, before the step is built.

    The carried state has one leaf per entry of ``starts`` (one for a tensor
    state, ``k`` for a tuple state): leaf ``i`` starts as ``starts[i]`` and
    segment ``l``'s node at offset ``state_offsets[i]`` is its next value;
    ``state_slots`` maps the argument slots where segment 0 reads a leaf to it.
    """

    period: int
    begin: int  # index in the node sequence of segment 0's first node
    length: int
    starts: list[Node]
    state_offsets: list[int]
    state_slots: dict[tuple[int, int], int]
    dep_offsets: list[int]  # offsets of the state-dependent nodes (same in every segment)
    inputs: list[PlanInput]
    used_outside: list[int]
    output_offsets: list[int] = field(default_factory=list)  # per-step outputs: tensors read after the run

    @property
    def end(self) -> int:
        return self.begin + self.length * self.period


@dataclass
class Rejection:
    """A repeat of ``count`` segments of ``period`` nodes from ``seq[begin]`` that is no chain, and why.

    ``starts``: the carried state's start nodes as far as validation got (may be empty).
    """

    begin: int
    end: int
    period: int
    count: int
    reason: str
    starts: list[Node]


@dataclass
class Attempt:
    """The result of validating segments from one phase: the longest valid prefix, and why it ends."""

    plan: Plan | None
    valid: int  # segments that passed
    fail_at: int | None = None
    reason: str | None = None
    starts: list[Node] = field(default_factory=list)


class _Invalid(Exception):
    """Segment ``segment`` of a run fails a check, for ``reason`` (ends :meth:`Detector._validate_run`)."""

    def __init__(self, segment: int, reason: str):
        super().__init__(reason)
        self.segment, self.reason = segment, reason


@dataclass
class _SegmentReads:
    """What the state-dependent nodes of one segment read, by argument slot ``(offset, leaf index)``."""

    dep_offsets: list[int] = field(default_factory=list)  # offsets of the nodes on the state path
    state_slots: dict[tuple[int, int], int] = field(default_factory=dict)  # slot -> the state leaf it reads
    internal: dict[tuple[int, int], int] = field(default_factory=dict)  # slot -> offset of a node of the segment
    inputs: dict[tuple[int, int], Node] = field(default_factory=dict)  # slot -> a value off the state path
    literals: dict[tuple[int, int], Any] = field(default_factory=dict)  # slot -> a number


class _Run:
    """A run of segments from ``seq[b]`` being validated with one carried state, and what it has read."""

    def __init__(self, p: int, b: int, state: list[tuple[Node, int]],
                 slot_leaf: dict[tuple[int, int], tuple[Node, int]]):
        self.p, self.b = p, b
        self.starts = [a0 for a0, _ in state]
        self.offsets = [q for _, q in state]  # per leaf: the offset of its next value in a segment
        self.on_state_path: set[Node] = set(self.starts)
        # which leaf a slot reads: in segment 0 by the slot (two leaves may start as one node),
        # later by the node (the previous segment's outputs are distinct nodes)
        self.leaf_of_slot = {slot: state.index(leaf) for slot, leaf in slot_leaf.items() if leaf in state}
        self.leaf_of_start = {s0: i for i, s0 in reversed(list(enumerate(self.starts)))}
        self.state_in: dict[Node, int] = {}  # the previous segment's next values -> leaf
        self.first: _SegmentReads | None = None  # segment 0's reads, the model of the others
        self.inputs: dict[tuple[int, int], list[Node]] = {}  # slot -> the value each valid segment reads there
        self.literals: dict[tuple[int, int], list] = {}  # slot -> the literal of each valid segment

    def leaf_read(self, k: int, a: Node, slot: tuple[int, int]) -> int | None:
        """The state leaf that segment ``k`` reads as ``a`` at ``slot``, ``None`` where ``a`` is no state."""
        if k == 0:
            return self.leaf_of_slot.get(slot, self.leaf_of_start[a]) if a in self.leaf_of_start else None
        return self.state_in.get(a)


class Detector:
    """The repeated segments of one graph; :meth:`find` returns them as plans."""

    def __init__(self, gm: fx.GraphModule, min_chain: int):
        self.min_chain = min_chain
        self.graph = gm.graph
        self._aliases: Aliases | None = None
        self.seq: list[Node] = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
        self.pos: dict[Node, int] = {n: i for i, n in enumerate(self.seq)}
        self.leaves: dict[Node, list] = {n: flatten_args((n.args, n.kwargs), []) for n in self.seq}
        tokens: dict[Any, int] = {}
        self.tok: list[int] = [tokens.setdefault(node_token(n), len(tokens)) for n in self.seq]
        self.crossing = self._crossing()

    # ---- structure ------------------------------------------------------- #

    def _crossing(self) -> list[int]:
        """``crossing[k]``: tensors made before position ``k`` and still read at or after it.

        A value that is a tuple of tensors (an LSTM cell's ``(h, c)``) counts as
        its tensors, as it does once its items are taken.
        """
        n = len(self.seq)
        diff = [0] * (n + 2)
        for i, u in enumerate(self.seq):
            if u.op == "get_attr":
                continue
            last = max((self.pos.get(w, n) for w in u.users), default=i)
            if last > i:
                value = example(u)
                tensors = sum(isinstance(v, torch.Tensor) for v in value) if isinstance(value, (tuple, list)) else 1
                weight = max(tensors, 1)
                diff[i + 1] += weight
                diff[min(last, n) + 1] -= weight
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

    def _longest_run(self, p: int, b: int, count: int) -> Attempt:
        """The longest valid run of the segments ``seq[b + k p : b + (k+1) p]``, ``k < count``.

        The carried state is found from what segment 1 reads of segment 0
        where segment 0 reads a value made before it: each such value alone
        (a tensor state), then all of them that depend on the state as one
        tuple state; the candidate state with the most valid segments wins.
        """
        carried, slot_leaf = self._carried_values(p, b)
        if not carried:
            return Attempt(None, 1, 1, "the segments do not read each other: no carried state")
        candidates = [[leaf] for leaf in carried]
        joint = self._state_dependent(p, b, carried)
        if len(joint) > 1 and len({q for _, q in joint}) == len(joint):
            candidates.append(joint)
        best = None
        for state in candidates:
            attempt = self._validate_run(p, b, count, state, slot_leaf)
            if best is None or attempt.valid > best.valid:
                best = attempt
        return best

    def _carried_values(self, p: int, b: int) -> tuple[list[tuple[Node, int]], dict[tuple[int, int], tuple[Node, int]]]:
        """The values segment 0 reads from before it where segment 1 reads a value of segment 0.

        Returns ``(carried, slot_leaf)``: ``carried`` lists ``(start, offset of its next value in a
        segment)``; ``slot_leaf`` maps segment 0's argument slots ``(offset, leaf index)`` that read
        a start to its entry.
        """
        seq, pos, leaves = self.seq, self.pos, self.leaves
        carried: list[tuple[Node, int]] = []
        slot_leaf: dict[tuple[int, int], tuple[Node, int]] = {}
        for o in range(p):
            for j, (a0, a1) in enumerate(zip(leaves[seq[b + o]], leaves[seq[b + p + o]])):
                if a1.__class__ is Node and b <= pos.get(a1, -1) < b + p and a0.__class__ is Node:
                    q = pos.get(a0)
                    if q is None or q < b:
                        leaf = (a0, pos[a1] - b)
                        if leaf not in carried:
                            carried.append(leaf)
                        slot_leaf[(o, j)] = leaf
        return carried, slot_leaf

    def _state_dependent(self, p: int, b: int, carried: list[tuple[Node, int]]) -> list[tuple[Node, int]]:
        """The leaves of ``carried`` whose next value in segment 0 depends on the carried starts (a fixpoint)."""
        seq, pos, leaves = self.seq, self.pos, self.leaves
        while carried:
            dep = {a0 for a0, _ in carried}
            for i in range(min(pos.get(a0, -1) for a0 in dep) + 1, b + p):
                if any(a.__class__ is Node and a in dep for a in leaves[seq[i]]):
                    dep.add(seq[i])
            kept = [(a0, q) for a0, q in carried if seq[b + q] in dep]
            if len(kept) == len(carried):
                return kept
            carried = kept
        return carried

    def _validate_run(self, p: int, b: int, count: int, state: list[tuple[Node, int]],
                      slot_leaf: dict[tuple[int, int], tuple[Node, int]]) -> Attempt:
        """The longest valid prefix of ``count`` segments from ``seq[b]`` carrying ``state``, as a plan.

        ``state``: per leaf, its start node and the offset of its next value in a
        segment. Segment by segment: no side effects (:meth:`_side_effect_reason`),
        what its state-dependent nodes read (:meth:`_read_segment`), then segment 0
        checked as the model of the others (:meth:`_check_first_segment`) or a later
        segment against it (:meth:`_check_like_first`). The first failure ends the
        run; the valid segments before it become a plan (:meth:`_attempt`).
        """
        run = _Run(p, b, state, slot_leaf)
        try:
            for s0 in run.starts:
                if not isinstance(example(s0), torch.Tensor):
                    raise _Invalid(0, f"the carried value {s0.name} is not a tensor")
            run.on_state_path = self._state_path_before(run.starts, b)
            for k in range(count):
                reason = self._side_effect_reason(b + k * p, p)
                if reason:
                    raise _Invalid(k, reason)
                reads = self._read_segment(run, k)
                if k == 0:
                    self._check_first_segment(run, reads, count)
                    run.first = reads
                else:
                    self._check_like_first(run, reads, k)
                for key, a in reads.inputs.items():
                    run.inputs.setdefault(key, []).append(a)
                for key, v in reads.literals.items():
                    run.literals.setdefault(key, []).append(v)
                run.state_in = {self.seq[b + k * p + q]: i for i, q in enumerate(run.offsets)}
        except _Invalid as invalid:
            return self._attempt(run, invalid.segment, invalid.reason)
        return self._attempt(run, count, None) if count >= 2 else Attempt(None, count, None, None, run.starts)

    def _state_path_before(self, starts: list[Node], b: int) -> set[Node]:
        """The starts and the nodes between them and ``seq[b]`` that depend on them."""
        seq, pos, leaves = self.seq, self.pos, self.leaves
        dep = set(starts)
        for i in range(min(pos.get(s0, -1) for s0 in starts) + 1, b):
            if any(a.__class__ is Node and a in dep for a in leaves[seq[i]]):
                dep.add(seq[i])
        return dep

    def _side_effect_reason(self, base: int, p: int) -> str | None:
        """A side effect anywhere in the segment at ``base`` (the BatchNorm reason wins); in-place ops are
        checked per node by :meth:`_read_segment`."""
        reasons = [r for r in (side_effect(self.seq[base + o], False, in_place=False) for o in range(p)) if r]
        if not reasons:
            return None
        return BATCHNORM_TRAINING if BATCHNORM_TRAINING in reasons else reasons[0]

    def _read_segment(self, run: _Run, k: int) -> _SegmentReads:
        """What segment ``k``'s state-dependent nodes read, slot by slot; adds them to the run's state path.

        Raises :class:`_Invalid` for an in-place write off the state path (or one
        the step may not compute out of place), a side effect on the state path,
        or a read of an earlier segment's value other than the carried state.
        """
        seq, pos, p = self.seq, self.pos, run.p
        base = run.b + k * p
        dep = run.on_state_path
        reads = _SegmentReads()
        for o in range(p):
            n = seq[base + o]
            lv = self.leaves[n]
            if not any(a.__class__ is Node and a in dep for a in lv):
                if mutates(n):
                    raise _Invalid(k, f"{n.name} ({target_name(n)}) mutates a tensor in place off the state path "
                                      "(only the step's own values may be written in place)")
                continue
            reason = side_effect(n, True, in_place=False) or \
                (self._inplace_reason(n, base, run.starts if k == 0 else list(run.state_in)) if mutates(n) else None)
            if reason:
                raise _Invalid(k, reason)
            dep.add(n)
            reads.dep_offsets.append(o)
            invoke = subgraph_call(n) is not None  # its body (argument 0) is no input
            for j, a in enumerate(lv):
                if a.__class__ is Node:
                    if a in dep:
                        leaf = run.leaf_read(k, a, (o, j))
                        if leaf is not None:
                            reads.state_slots[(o, j)] = leaf
                            continue
                        q = pos.get(a, -1)
                        if not base <= q < base + o:
                            raise _Invalid(k, f"{n.name} in segment {k} reads {a.name}, a value from an "
                                              f"earlier segment, not through the carried state")
                        reads.internal[(o, j)] = q - base
                    elif not (invoke and j == 0):
                        reads.inputs[(o, j)] = scalar_source(n, a) or a
                elif is_number(a):
                    reads.literals[(o, j)] = a
        return reads

    def _check_first_segment(self, run: _Run, reads: _SegmentReads, count: int) -> None:
        """Segment 0 reads the state, only tensors besides it, hands exactly the state to segment 1,
        and keeps each leaf's shape and dtype; raises :class:`_Invalid` otherwise."""
        seq, base = self.seq, run.b
        if not reads.state_slots:
            raise _Invalid(0, "the first segment does not read the carried value")
        for key, a in reads.inputs.items():
            if a.op != "get_attr" and not isinstance(example(a), torch.Tensor):
                raise _Invalid(0, f"{seq[base + key[0]].name} reads {a.name}, which is not a tensor"
                                  + _SYMBOLIC_NUMBER * isinstance(example(a), (torch.SymFloat, torch.SymInt)))
        if count > 1:
            reason = self._carried_reason(run.p, base, reads.dep_offsets, run.offsets)
            if reason:
                raise _Invalid(1, reason)
        for s0, q in zip(run.starts, run.offsets):
            before, after = value_signature(example(s0)), value_signature(example(seq[base + q]))
            if before != after:
                raise _Invalid(0, f"the carried value changes from {before} to {after} in the first segment")

    def _check_like_first(self, run: _Run, reads: _SegmentReads, k: int) -> None:
        """Segment ``k`` reads as segment 0 does: the same state path, per-step inputs of the same
        shape, the same literals (or ones that may vary); raises :class:`_Invalid` otherwise."""
        seq, first = self.seq, run.first
        base = run.b + k * run.p
        if reads.dep_offsets != first.dep_offsets or reads.state_slots != first.state_slots \
                or reads.internal != first.internal or reads.inputs.keys() != run.inputs.keys():
            raise _Invalid(k, f"segment {k} is not isomorphic to segment 0 on the state path")
        for key, a in reads.inputs.items():
            a0 = run.inputs[key][0]
            if a is not a0 and value_signature(example(a)) != value_signature(example(a0)):
                raise _Invalid(k, f"per-step input {a.name} of segment {k} has shape "
                                  f"{value_signature(example(a))}, segment 0 has {value_signature(example(a0))}")
        for key, v in reads.literals.items():
            v0 = run.literals[key][0]
            if (v != v0 or type(v) is not type(v0)) and not may_vary(seq[run.b + key[0]], key[1]):
                raise _Invalid(k, f"{seq[base + key[0]].name}: the literal {v0!r} of segment 0 is {v!r} "
                                  f"in segment {k}; only arithmetic operands may differ per step")

    def _attempt(self, run: _Run, fail_at: int, reason: str | None) -> Attempt:
        """The attempt of a run whose first ``fail_at`` segments are valid (``reason``: why the next is not;
        ``None`` when all are): the plan of the valid segments where at least 2 remain after trimming."""
        valid = fail_at
        plan, trimmed = self._plan(run, valid) if valid >= 2 else (None, None)
        if plan is not None:
            valid = plan.length
        elif reason is None:  # every segment was valid, but values besides the state leave them
            reason = trimmed
        return Attempt(plan, valid, fail_at, reason, run.starts)

    def _inplace_reason(self, node: Node, base: int, state: list[Node]) -> str | None:
        """Why the in-place ``node`` of the segment at ``base`` (reading ``state``) may not run out of place."""
        if self._aliases is None:
            self._aliases = Aliases(self.graph)
        return inplace_reason(node, self._aliases, self.pos, base, state)

    def _carried_reason(self, p: int, base: int, dep_offsets: list[int], offsets: list[int]) -> str | None:
        """Why the segment at ``base`` does not hand exactly the carried state to the next one, or ``None``."""
        seq, pos = self.seq, self.pos
        nxt = base + p
        outs = [o for o in dep_offsets if any(nxt <= pos.get(u, -1) < nxt + p for u in seq[base + o].users)]
        if not outs:
            return "segment 1 does not read segment 0"
        if sorted(outs) == sorted(offsets):
            return None
        names = ", ".join(seq[base + o].name for o in outs)
        carried = ", ".join(seq[base + q].name for q in offsets)
        return (f"segment 1 reads {len(outs)} values of segment 0 ({names}); a chain carries one state from "
                f"segment to segment (here {carried})")

    def _plan(self, run: _Run, length: int) -> tuple[Plan | None, str | None]:
        """``(plan, None)``: the first ``length`` valid segments of ``run``, trimmed before the first
        segment with a non-state value read after the segments that cannot be a per-step output, with
        their inputs classified; ``(None, why)`` where fewer than 2 remain."""
        p, b = run.p, run.b
        dep_offsets = run.first.dep_offsets
        length, used_outside, output_offsets, trimmed = self._trim_outside_reads(
            p, b, length, dep_offsets, run.offsets
        )
        if length < 2:
            return None, trimmed
        inputs = self._classify_inputs(p, b, length, run.inputs, run.literals)
        return Plan(p, b, length, list(run.starts), list(run.offsets), dict(run.first.state_slots), dep_offsets,
                    inputs, used_outside, output_offsets), None

    def _trim_outside_reads(self, p: int, b: int, length: int, dep_offsets: list[int],
                            state_offsets: list[int]) -> tuple[int, list[int], list[int], str | None]:
        """``(length, used_outside, output_offsets, why)``: the segments before the first one with a value
        read after the run that is neither its state nor a per-step output, the segments (but the last) whose
        state is read after it, the offsets of the per-step outputs read after it, and why it was trimmed.

        A per-step output is a tensor (not a tuple of values) a segment computes from its state besides the
        next state: the run serves it for every step, computed at the solved states."""
        seq = self.seq
        trimmed, used_outside, outputs = None, [], set()
        while length >= 2:
            end = b + length * p
            used_outside, outputs, bad = [], set(), None
            for k in range(length):
                base = b + k * p
                for o in dep_offsets:
                    n = seq[base + o]
                    if any(self.pos.get(u, len(seq)) >= end for u in n.users):
                        if o in state_offsets:
                            if k < length - 1 and used_outside[-1:] != [k]:
                                used_outside.append(k)
                        elif isinstance(example(n), torch.Tensor):
                            outputs.add(o)
                        else:
                            bad = k
                            trimmed = (f"{n.name} of segment {k}, not the carried state, is read after the "
                                       "segments and is not a tensor (a per-step output must be one)")
                            break
                if bad is not None:
                    break
            if bad is None:
                break
            length = bad
        return length, used_outside, sorted(outputs), trimmed

    def _classify_inputs(self, p: int, b: int, length: int, slots: dict[tuple[int, int], list[Node]],
                         literals: dict[tuple[int, int], list]) -> list[PlanInput]:
        """The values the first ``length`` segments read besides the state, as :class:`PlanInput` records:
        literals that differ per segment ("constant"), one value for all ("shared"), rows of one tensor
        ("slice"), placeholders ("parameter") or other per-segment values ("computed")."""
        inputs: list[PlanInput] = []
        by_nodes: dict[tuple, PlanInput] = {}
        memo: dict[int, bool] = {}
        keys = sorted(set(slots) | {key for key, vals in literals.items()
                                    if any(v != vals[0] or type(v) is not type(vals[0]) for v in vals[:length])})
        for key in keys:
            if key in literals:
                inputs.append(PlanInput("constant", [key], values=literals[key][:length]))
                continue
            nodes = slots[key][:length]
            first = nodes[0]
            if all(x is first for x in nodes) or self._invariant(p, b, length, nodes, memo):
                ident: tuple = ("shared", first)
                kind, nodes = "shared", [first]
            else:
                ident = tuple(nodes)
                kind = "parameter" if all(x.op == "placeholder" for x in nodes) else "computed"
            found = as_slice(nodes) if kind == "computed" else None
            if found is not None:
                ident = ("slice", found.source, found.dim, found.start, found.stride, tuple(found.chain))
            existing = by_nodes.get(ident)
            if existing is not None:
                existing.slots.append(key)
            elif found is not None:
                by_nodes[ident] = entry = PlanInput("slice", [key], nodes=[found.source], start=found.start,
                                                    dim=found.dim, stride=found.stride, views=found.chain)
                inputs.append(entry)
            else:
                by_nodes[ident] = entry = PlanInput(kind, [key], nodes=nodes)
                inputs.append(entry)
        return inputs

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
        ok = not is_random(first) and first.op != "call_module"
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
            attempt = self._longest_run(p, b + k0 * p, count - k0)
            if attempt.plan is not None and attempt.plan.length >= self.min_chain:
                plans.append(attempt.plan)
            if attempt.fail_at is None or attempt.reason is None:
                break
            failures.append((k0 + attempt.fail_at, attempt.reason, attempt.starts))
            k0 += max(attempt.fail_at, 1)
        return plans, failures

    def _module_score(self, p: int, b: int, count: int) -> int:
        if count < 3:
            return 0
        seg = b + p
        paths = {varying_path(self.seq[seg + o], self.seq[seg + p + o]) for o in range(p)}
        paths.discard(None)
        return len(paths)

    def _region(self, p: int, r0: int, r1: int):
        """The best segmentation of the repeated region ``seq[r0:r1]`` with period ``p``."""
        phases = [f for f in range(p) if r0 + f + self.min_chain * p <= r1]
        if not phases:
            return None
        lowest = min(self.crossing[r0 + f + p] for f in phases)
        phases = [f for f in phases if self.crossing[r0 + f + p] == lowest]
        # a loop's first step may differ from the others (Dynamo computes a value there the later steps read), so
        # the region can begin inside it; its last step ends the region: try the phase that ends there first
        phases = sorted(phases, key=lambda f: (r1 - r0 - f) % p != 0)[:MAX_PHASES]
        best = None
        for f in phases:
            b = r0 + f
            count = (r1 - b) // p
            plans, failures = self._cover(p, b, count)
            covered = sum(plan.length for plan in plans)
            state_last = all(max(plan.state_offsets) == plan.dep_offsets[-1] for plan in plans)
            leaves = max((len(plan.starts) for plan in plans), default=0)  # the smaller state wins a tie
            score = (covered, -leaves, -self._module_score(p, b, count), b + count * p - r1, state_last, -f)
            if best is None or score > best[0]:
                best = (score, p, b, count, plans, failures)
        return best

    def find(self) -> tuple[list[Plan], list[Rejection]]:
        """Non-overlapping plans in graph order, and the repeats no plan came of (with reasons)."""
        queue: list[tuple[Plan, tuple[int, int, int]]] = []
        rejected: list[Rejection] = []
        for p in self._periods():
            for r0, r1 in self._runs(p):
                result = self._region(p, r0, r1)
                if result is None:
                    continue
                _, p_, b, count, plans, failures = result
                queue.extend((plan, (p, r0, r1)) for plan in plans)
                if not plans and failures:
                    _, reason, starts = failures[0]
                    rejected.append(Rejection(b, b + count * p_, p_, count, reason, starts))
        # resolve overlaps: most covered nodes first, then the shorter period; a plan
        # that overlaps a taken one is re-segmented in what is left of its region
        taken: list[Plan] = []
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
        return taken, rejected


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

