"""``seqpar.distributed.solve_chain``: one chain's steps split over the ranks of a process group.

Rank ``p`` holds the steps ``l = o_p + 1 .. o_p + L_p`` (its share of the
per-step inputs; rank 0 the first) and the states they produce. One Newton
iteration (:mod:`seqpar.runtime.newton`, in its update form)

    d_l = A_l d_{l-1} + (F_l - s_l),      F_l = f(s_{l-1}, x_l),  A_l = J_l, diag J_l or I,

runs on every rank at once: each evaluates its steps and blocks at its
current states (its first step at its *entry state*, the previous rank's last
state), reduces its block of the system to the affine map of its boundary
``d_out = Phi d_in + e`` (:mod:`.boundary`), and the ranks all-gather those
``P`` maps (``N (w^2 + w)`` values each, independent of ``L``) together with
the status of the previous update; every rank folds the maps before it into
its own ``d_in`` and solves its block from it, and adds the scanned update to
its entry state exactly as its left neighbour adds it to its last state (the
two stay equal bit for bit). One all-gather of ``P`` rows per iteration,
nothing of size ``L`` on the wire; convergence is seen one exchange late (one
linearisation more than on one device). A rank whose share's blocks exceed
the device's memory bound (:mod:`seqpar.runtime.budget`) takes them in runs
(:mod:`.runs`): the same iterations, its blocks evaluated again for the update.

As on one device, positions before the global *start* (the first position
whose update is above tolerance) are final and not updated, and the state at
the start becomes exact at each iteration (``f`` of an exact state), so the
start advances by at least one per iteration; an affine chain with exact
blocks is solved by its first iteration. When the iterations do not converge
in ``max_iters`` or a value goes non-finite, the ranks finish the chain from
the start *rank after rank*: each runs its remaining steps with the exact
sequential loop and broadcasts its last state to the next: the sequential
result, and the reason logged on every rank.

Gradients (implicit differentiation, :mod:`seqpar.runtime.adjoint`): the
adjoint recursion ``lam_{l-1} = g_{l-1} + J_l^T lam_l`` is split the same way,
right to left with the transposed maps ``Phi^T`` (one all-gather of ``P``
maps), then each rank's parameter and input gradients are one batched VJP of
its own steps. ``adjoint="sequential"`` (wide states), or maps that are not
finite, run it rank after rank from the last. ``s0`` and ``shared`` are the
same on every rank; their gradients are those of the sum of all ranks' losses,
on every rank (``s0``'s from rank 0, ``shared``'s summed over the ranks): do
not all-reduce them again. Backward is collective: every rank calls it (a rank
without inputs that require grad still returns states that do, when any rank's
do).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree

from ..runtime.adjoint import adjoint_in_runs, adjoint_solve
from ..runtime.chain import plain_loop, prepare_chain, without_elements
from ..runtime.newton import Tolerance, evaluate_all, first_above, tolerance_ratios
from ..runtime.pcr import solve_affine_recurrence
from ..runtime.sequential import continue_sequentially
from ..runtime.spec import accumulation_dtype, default_max_iters
from ..runtime.stats import SolveStats
from .boundary import apply_map, block_product, entry_values, fold_entry
from .group import Ranks
from .runs import adjoint_boundary_in_runs, linearised_in_runs, share_run, update_in_runs

log = logging.getLogger("seqpar.distributed")

OPTIONS = ("jacobian", "tol", "max_iters", "length", "batch_ndim", "adjoint", "forward", "return_stats")
NOT_ACROSS_RANKS = {
    "damping": "the Levenberg-Marquardt step couples neighbouring positions in a tridiagonal solve",
    "window": "a sliding window walks the chain from its start",
}
_KINDS = ("identity", "diag", "full")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@torch.compiler.disable  # collectives and host decisions: inside a compiled function it runs as it is
def solve_chain(step, s0, xs, shared=(), *, group=None, **solver_options):
    """This rank's states of the chain ``s_l = step(s_{l-1}, x_l, *shared)`` whose steps are split over ``group``.

    Called on every rank of ``group`` (default: the world) with the same
    ``step``, ``s0`` (the chain's initial state) and ``shared``; ``xs`` is this
    rank's contiguous share of the per-step inputs (rank 0 the first steps;
    shares may be uneven, each at least one step). Returns this rank's states
    stacked on dim 0, like :func:`seqpar.solve_chain` for its share,
    differentiable w.r.t. ``s0``, ``xs`` and ``shared`` (see the module doc for
    what the gradients of ``s0`` and ``shared`` mean).

    ``solver_options``: those of :func:`seqpar.solve_chain` (``jacobian``,
    ``tol``, ``max_iters``: iterations before the rank-after-rank sequential
    finish, default 40, at most the chain's length; ``length`` for a rank
    without ``xs``; ``batch_ndim``, ``adjoint``, ``forward``: ``"sequential"``
    runs rank after rank from the start; ``return_stats``: also return this
    rank's :class:`~seqpar.runtime.SolveStats`). ``damping``, ``window`` and
    ``jacobian="estimate"`` are not available across ranks (``ValueError``).
    A rank may pass a step of its own (a chain whose steps differ by share)
    where the state's shape and dtype, the Jacobian kinds and the proven
    structure (affine or not) agree. Bad arguments on any rank raise
    ``ValueError`` on every rank (an ``s0``, ``shared`` or step structure
    that differs between ranks too; values by a float64 fingerprint),
    as do higher-order gradients (``create_graph=True``), which are not
    available across ranks. An ``s0`` without elements (a batch of 0) on
    every rank gives each rank the plain loop of its steps (empty states,
    zero gradients), as on one device.
    """
    ranks = Ranks(group, what="seqpar.distributed.solve_chain")
    return_stats = solver_options.pop("return_stats", False)
    prepared = _prepared(ranks, step, s0, xs, shared, solver_options)
    if prepared is None:  # a state without elements on every rank: nothing to solve, nothing to exchange
        return plain_loop(step, s0, xs, shared, solver_options.get("length"), solver_options.get("batch_ndim"),
                          return_stats)
    chain, packed_s0, xs_leaves, shared, dummy = prepared
    states = _DistributedChain.apply(chain, packed_s0, *xs_leaves, *shared, *dummy)
    result = chain.program.layout.unpack(states)
    return (result, chain.stats) if return_stats else result


@dataclass
class _Chain:
    """One call's split chain: this rank's program, every rank's first global position ``offsets[p]``
    (``offsets[P]`` the chain's length), the run options, and which gradients the ranks agreed on."""

    ranks: Ranks
    program: object
    offsets: list
    tol: Tolerance
    max_iters: int
    method: str
    s0_grad: bool
    shared_grads: tuple
    xs_count: int
    stats: SolveStats | None = None

    @property
    def offset(self) -> int:
        return self.offsets[self.ranks.rank]

    @property
    def total(self) -> int:
        return self.offsets[-1]

    def rank_of(self, position: int) -> int:
        """The rank holding the global (0-based) ``position``."""
        return max(rank for rank in range(self.ranks.size) if self.offsets[rank] <= position)


def _prepared(ranks, step, s0, xs, shared, options):
    """Validate on every rank, agree (one all-gather of a fixed row), and build this rank's :class:`_Chain`.

    The row: the local length, the state's size, dtype and solve kinds, the
    number of ``shared`` tensors and which require grad, float64
    fingerprints of ``s0`` and ``shared``, and the gradient flags. Any
    rank's error, or a difference between ranks, raises on every rank.
    ``None`` where ``s0`` has no elements (a batch of 0) on every rank: each
    rank's states are then its steps' plain loop, exact (there are no values
    to pass between ranks) and without any further exchange.
    """
    failure = row = None
    prepared = None
    try:
        prepared, row = _prepare_locally(ranks, step, s0, xs, shared, options)
    except Exception as error:  # noqa: BLE001 - every rank must learn of it at the collective below
        failure = error
    device = s0.device if isinstance(s0, torch.Tensor) else torch.device("cpu")
    rows = ranks.gather(row, _AGREEMENT_WIDTH, device, failure)
    table = rows.tolist()
    empty = [rank for rank, other in enumerate(table) if other[_EMPTY]]
    if empty:
        if len(empty) == ranks.size:
            return None
        raise ValueError(f"seqpar.distributed.solve_chain: s0 has no elements (a batch of 0) on ranks {empty} but "
                         "not on the others; every rank must pass the same s0")
    program, packed_s0, xs_leaves, shared, tol, max_iters, method = prepared
    mine = table[ranks.rank]
    for rank, other in enumerate(table):
        for name, (start, stop) in _AGREED.items():
            if other[start:stop] != mine[start:stop]:
                raise ValueError(f"seqpar.distributed.solve_chain: {name} differs between rank {rank} and rank "
                                 f"{ranks.rank}; every rank must pass the same {name}")
    lengths = [int(other[0]) for other in table]
    offsets = [sum(lengths[:rank]) for rank in range(ranks.size + 1)]
    max_iters = min(max_iters or default_max_iters(offsets[-1], None), offsets[-1])
    wants_grad = [bool(other[_GRAD]) for other in table]
    enabled = [bool(other[_GRAD_ENABLED]) for other in table]
    any_grad = any(wants_grad)
    if any_grad and not all(enabled):
        off = [rank for rank, on in enumerate(enabled) if not on]
        raise ValueError(f"seqpar.distributed.solve_chain: ranks {off} run with gradients disabled while others need "
                         "them; backward is collective, so every rank must record the solve")
    shared_grads = tuple(tensor.requires_grad for tensor in shared)
    chain = _Chain(ranks, program, offsets, tol, max_iters, method, any(bool(other[_S0_GRAD]) for other in table),
                   shared_grads, len(xs_leaves))
    dummy = ()
    if any_grad and not wants_grad[ranks.rank]:  # the states must require grad here too: backward is collective
        dummy = (torch.zeros((), device=device, requires_grad=True),)
    return chain, packed_s0, xs_leaves, shared, dummy


# The agreement row: [length, N, w, dtype, solve kind, adjoint kind, parallel adjoint, #shared, shared grad
#   pattern, s0 fingerprint (2), shared fingerprint (2), wants grad, grad enabled, s0 requires grad,
#   max_iters (-1: default), forward, atol, rtol, affine, no elements (then every other entry 0)]
_AGREED = {
    "state shape and dtype": (1, 4), "jacobian and adjoint": (4, 7), "shared tensors": (7, 9),
    "s0 (values)": (9, 11), "shared (values)": (11, 13), "solver options (max_iters, forward, tol)": (16, 20),
    "step structure (affine: one linear solve)": (20, 21),
}
_GRAD, _GRAD_ENABLED, _S0_GRAD, _EMPTY = 13, 14, 15, 21
_AGREEMENT_WIDTH = 22


def _prepare_locally(ranks, step, s0, xs, shared, options):
    """``(prepared, row)``: this rank's program, packed inputs and options (``None`` where ``s0`` has no elements)
    and its agreement row (see :func:`_prepared`)."""
    unknown = sorted(set(options) - set(OPTIONS) - set(NOT_ACROSS_RANKS))
    if unknown:
        raise ValueError(f"unknown solver option(s) {unknown}; valid options: {', '.join(OPTIONS)}")
    for name, why in NOT_ACROSS_RANKS.items():
        if options.get(name) is not None:
            raise ValueError(f"{name} is not available across ranks ({why}); solve without it")
    if options.get("jacobian") == "estimate":
        raise ValueError("jacobian='estimate' is not available across ranks; use 'full', 'diag' or 'identity'")
    for leaf in pytree.tree_leaves(xs):
        if isinstance(leaf, torch.Tensor) and leaf.ndim and leaf.shape[0] == 0:
            raise ValueError(f"rank {ranks.rank} holds no steps (xs of length 0); every rank needs at least one")
    if without_elements(s0):
        row = torch.zeros(_AGREEMENT_WIDTH, dtype=torch.float64)
        row[_EMPTY] = 1
        return None, row
    method = options.get("forward", "parallel")
    program, packed_s0, xs_leaves, shared = prepare_chain(
        step, s0, xs, shared, jacobian=options.get("jacobian", "auto"), tol=options.get("tol"),
        max_iters=options.get("max_iters"), damping=None, window=None, length=options.get("length"),
        batch_ndim=options.get("batch_ndim"), adjoint=options.get("adjoint", "auto"), forward=method,
    )
    tol = program.solver_options["tol"]
    shared_pattern = sum(2.0 ** (index % 50) for index, tensor in enumerate(shared) if tensor.requires_grad)
    wants_grad = torch.is_grad_enabled() and any(
        tensor.requires_grad for tensor in (packed_s0, *xs_leaves, *shared)
    )
    row = torch.tensor([
        program.length, *packed_s0.shape, _DTYPES.index(packed_s0.dtype),
        _KINDS.index(program.solve_kind), _KINDS.index(program.adjoint_kind), program.adjoint == "parallel",
        len(shared), shared_pattern, *_fingerprint([packed_s0]), *_fingerprint(shared),
        wants_grad, torch.is_grad_enabled(), packed_s0.requires_grad,
        -1 if options.get("max_iters") is None else options["max_iters"], method == "sequential", tol.atol, tol.rtol,
        program.one_linear_solve, False,
    ], dtype=torch.float64)
    return (program, packed_s0, xs_leaves, shared, tol, options.get("max_iters"), method), row


def _fingerprint(tensors) -> tuple[float, float]:
    """Two float64 sums that differ, in practice, when any value differs: ``sum x`` and ``sum (1 + i mod 7) x``
    over the values in order (non-finite values counted as large finite ones)."""
    plain = weighted = 0.0
    for tensor in tensors:
        values = torch.nan_to_num(tensor.detach().to(torch.float64).flatten(), nan=1e300)
        weights = torch.arange(values.numel(), dtype=torch.float64, device=values.device).remainder_(7).add_(1)
        plain += float(values.sum())
        weighted += float((values * weights).sum())
    return plain, weighted


class _DistributedChain(torch.autograd.Function):
    """This rank's states (forward: :func:`_forward`) and the gradients of its inputs (:func:`_backward`).
    Inputs after ``s0``: the ``xs`` leaves, ``shared``, and possibly a dummy that makes the states require grad."""

    @staticmethod
    def forward(ctx, chain, s0, *tensors):
        xs_leaves = list(tensors[:chain.xs_count])
        shared = list(tensors[chain.xs_count:chain.xs_count + len(chain.shared_grads)])
        with torch.no_grad():
            states, s_in, chain.stats = _forward(chain, s0, xs_leaves, shared)
        ctx.chain = chain
        ctx.dummies = len(tensors) - len(xs_leaves) - len(shared)
        ctx.save_for_backward(s_in, states, *xs_leaves, *shared)
        return states

    @staticmethod
    def backward(ctx, grad_states):
        chain = ctx.chain
        s_in, states, *inputs = ctx.saved_tensors
        xs_leaves, shared = inputs[:chain.xs_count], inputs[chain.xs_count:]
        higher_order = torch.is_grad_enabled()  # create_graph=True: refused on every rank (never silent zeros)
        with torch.no_grad():
            grad_s0, grad_xs, grad_shared = _backward(chain, s_in, states, list(xs_leaves), list(shared),
                                                      grad_states.contiguous(), higher_order)
        return (None, grad_s0, *grad_xs, *grad_shared, *([None] * ctx.dummies))


def _forward(chain, s0, xs_leaves, shared):
    """``(states (L_p, N, w), entry state (N, w), stats)`` of this rank (see the module doc).

    Iteration ``k`` linearises at the current states from the start ``a_k``
    (positions before it final) and exchanges, in one all-gather, every
    rank's boundary map and the status of update ``k - 1`` (first position
    above tolerance, largest ratio, finiteness); then every rank applies
    update ``k``. So convergence is seen one exchange late: the update that
    converged is followed by one linearisation that is not used, and a
    last, status-only exchange follows the last update. The start moves on
    by at least one per iteration (the state at ``a_k`` becomes exact,
    ``f`` of final states) and past the positions the previous update found
    converged. Each rank's entry state is the previous rank's last state
    bit for bit: both add the same scanned update to the same value.
    """
    ranks, program = chain.ranks, chain.program
    length, total, offset, rank = program.length, chain.total, chain.offset, ranks.rank
    kind = program.solve_kind
    work = accumulation_dtype(s0.dtype)
    batch, width = s0.shape
    map_width = _map_width(kind, batch, width)
    stats = SolveStats(length=length, jacobian=program.jacobian, structure=program.step_structure.label)
    states = s0.unsqueeze(0).expand(length, batch, width).clone()
    s_in = s0.clone()  # the entry state: s0 on rank 0, the previous rank's last state
    start = last_start = 0  # global: positions before ``start`` are final; ``last_start``: the last update's
    status = failure = None  # the last update's status row (None before the first); a local error to report
    reason = "forward='sequential'" if chain.method == "sequential" else None
    while reason is None:
        updating = start < total and stats.iterations < chain.max_iters and not (
            program.one_linear_solve and stats.iterations == 1)  # an affine chain's one solve is the solution
        first = min(max(start - offset, 0), length)  # this rank's first active position
        start_rank = chain.rank_of(min(start, total - 1))
        local = None
        if failure is None and updating and first < length:
            try:
                local = _linearised(program, kind, work, s_in, states, first, xs_leaves, shared,
                                    with_map=rank > start_rank)
                stats.evaluations += _evaluated(local, length)
                stats.jacobian_evaluations += 0 if kind == "identity" else _evaluated(local, length)
            except Exception as error:  # noqa: BLE001 - every rank learns of it at the collective
                failure = error
        row = torch.cat([_NO_UPDATE.to(s0.device) if status is None else status,
                         local.map_row if local is not None else torch.zeros(map_width + batch * width,
                                                                             dtype=torch.float64,
                                                                             device=s0.device)])
        rows = ranks.gather(row, _STATUS + map_width + batch * width, s0.device, failure)
        if status is not None:
            stats.residual = float(torch.nan_to_num(rows[:, 1], nan=0.0).max())
            if not bool(rows[:, 2].all()):
                reason, start = f"non-finite values at iteration {stats.iterations}", last_start
                break
            reached = int(rows[:, 0].min())  # the first position above tolerance after the last update
            if reached >= total or start >= total or program.one_linear_solve:
                break
            if not updating:
                reason = f"did not converge in {chain.max_iters} iterations"
                start = max(last_start + 1, reached)
                break
            next_start = max(start + 1, reached)
        else:
            next_start = start + 1
        maps = [None if other < start_rank else _map_of(rows[other, _STATUS:], kind, batch, width, work)
                for other in range(ranks.size)]
        entries = entry_values(maps, kind) + [None]
        try:
            if local is not None:
                status = _update(states, local, entries[rank], entries[rank + 1], chain, (xs_leaves, shared),
                                 exact_first=rank == start_rank and (first < length - 1 or rank == ranks.size - 1))
                if local.run is not None and entries[rank] is not None:  # the blocks evaluated again
                    stats.evaluations += _evaluated(local, length)
                    stats.jacobian_evaluations += _evaluated(local, length)
            else:
                status = _frozen_status(states, chain)
            if entries[rank] is not None:
                s_in = (s_in.to(work) + entries[rank]).to(s0.dtype)
        except Exception as error:  # noqa: BLE001
            failure = error
        stats.iterations += 1
        last_start, start = start, next_start
    stats.converged = reason is None
    if reason is not None:
        stats.fallback = reason
        log.info("seqpar.distributed: chain of %d steps over %d ranks: %s; finishing rank after rank from step %d",
                 total, ranks.size, reason, start + 1)
        s_in = _finish_sequentially(chain, s0, s_in, xs_leaves, shared, states, start, stats)
    return states, s_in, stats


_STATUS = 3  # a status row: [first position above tolerance (global; the chain's length if none), largest, finite]
_NO_UPDATE = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)


def _map_width(kind: str, batch: int, width: int) -> int:
    """Values of ``Phi`` in a rank's map row: ``N w^2`` (full), ``N w`` (diag), 0 (identity)."""
    return {"full": batch * width * width, "diag": batch * width, "identity": 0}[kind]


@dataclass
class _Linearised:
    """One rank's linearisation from its first active position ``first``: the step at that position ``F_a``,
    the blocks ``A`` (``None``: identity, or not kept), ``c = F - s`` and ``e`` (the update from a zero entry
    update), all from ``first`` on, and its map row ``(Phi, e_last)`` as float64. ``run``: positions per run
    where the blocks exceed the device's memory and are evaluated again for the update (:mod:`.runs`), with the
    entry state ``s_in`` they were evaluated from."""

    first: int
    first_value: torch.Tensor
    A: torch.Tensor | None
    c: torch.Tensor
    e: torch.Tensor
    map_row: torch.Tensor
    run: int | None = None
    s_in: torch.Tensor | None = None


def _evaluated(local: _Linearised, length: int) -> int:
    """Positions one evaluation of a linearisation covers: all ``length``, or in runs those from its first
    active position, whole runs."""
    return length if local.run is None else -(-(length - local.first) // local.run) * local.run


def _linearised(program, kind, work, s_in, states, first, xs_leaves, shared, *, with_map) -> _Linearised:
    """Evaluate the steps (and blocks) at ``(s_in, s_1, .., s_{L-1})`` and reduce the active positions to their
    map; ``with_map=False``: ``Phi`` is not needed (the entry update is exactly zero) and sent as zeros. Blocks
    beyond the device's memory bound: in runs (:func:`.runs.linearised_in_runs`)."""
    map_width = _map_width(kind, *states.shape[1:])
    run = share_run(program, kind)
    if run is not None:
        first_value, c, e, Phi = linearised_in_runs(program, kind, work, s_in, states, xs_leaves, shared, first, run,
                                                    with_map=with_map)
        return _Linearised(first, first_value, None, c, e, _map_row(Phi, e[-1], map_width), run, s_in)
    prev = torch.cat([s_in.unsqueeze(0), states[:-1]])
    values = evaluate_all(program, kind, prev, xs_leaves, shared)
    values, A = (values, None) if kind == "identity" else values
    values, A = values[first:], None if A is None else A[first:].to(work)
    c = values.to(work) - states[first:].to(work)
    e = solve_affine_recurrence(A, c, kind)
    Phi = block_product(A, kind) if with_map else None
    return _Linearised(first, values[0], A, c, e, _map_row(Phi, e[-1], map_width))


def _map_row(Phi, last, map_width):
    """A map ``(Phi, last)`` as one float64 row; ``Phi=None`` (not needed, or identity blocks): zeros."""
    head = torch.zeros(map_width, dtype=torch.float64, device=last.device) if Phi is None else Phi.flatten()
    return torch.cat([head.to(torch.float64), last.flatten().to(torch.float64)])


def _map_of(row, kind, batch, width, work):
    """``(Phi, e)`` of a gathered map row, in ``work``."""
    map_width = _map_width(kind, batch, width)
    shape = {"full": (batch, width, width), "diag": (batch, width)}.get(kind)
    Phi = None if shape is None else row[:map_width].view(shape).to(work)
    return Phi, row[map_width:].view(batch, width).to(work)


def _update(states, local, d_in, d_out, chain, inputs, *, exact_first):
    """Apply this rank's update from its entry update ``d_in`` (``None``: zero); its last state gets the scanned
    ``d_out`` the next rank adds to its entry state (the same sum, bit for bit). ``inputs``: the ``xs`` leaves
    and ``shared`` (a linearisation in runs evaluates its blocks again). Returns the status row."""
    first, program = local.first, chain.program
    kind = program.solve_kind
    last = states[-1].clone()
    if d_in is None:
        update = local.e
    elif local.run is None:
        update = solve_affine_recurrence(local.A, fold_entry(local.c, local.A, kind, d_in), kind)
    else:
        update = update_in_runs(program, kind, local.c.dtype, local.s_in, states, *inputs, first, local.run, local.c,
                                d_in)
    new = states[first:].to(update.dtype) + update
    states[first:] = new.to(states.dtype)
    if exact_first:
        states[first] = local.first_value  # f of final states: exact, not s + (F - s)
    if d_out is not None:
        states[-1] = (last.to(d_out.dtype) + d_out).to(states.dtype)
    ratios = tolerance_ratios(update, new, chain.tol).flatten(1).amax(dim=1)
    above = first_above(ratios)
    position = chain.total if above == ratios.shape[0] else chain.offset + first + above
    largest = float(torch.nan_to_num(ratios, nan=0.0).max())
    finite = bool(torch.isfinite(update).all())
    return torch.tensor([position, largest, finite], dtype=torch.float64, device=states.device)


def _frozen_status(states, chain):
    """The status row of a rank none of whose positions is active: nothing above tolerance, finite."""
    return torch.tensor([chain.total, 0.0, 1.0], dtype=torch.float64, device=states.device)


def _finish_sequentially(chain, s0, s_in, xs_leaves, shared, states, start, stats):
    """The states from global position ``start`` on by the exact loop, rank after rank: each rank runs its
    remaining steps from its entry state and broadcasts its last state to the next. Returns the entry state."""
    ranks, program = chain.ranks, chain.program
    batch, width = s0.shape
    for source in range(chain.rank_of(start), ranks.size):
        failure = None
        if ranks.rank == source:
            first = max(start - chain.offset, 0)
            try:
                continue_sequentially(program, s_in, xs_leaves, shared, states, first)
                stats.sequential_steps = program.length - first
                stats.evaluations += program.length - first
            except Exception as error:  # noqa: BLE001
                failure = error
        last = ranks.broadcast(states[-1] if ranks.rank == source else None, batch * width, source, s0.device,
                               failure)
        if ranks.rank == source + 1:
            s_in = last.view(batch, width).to(s0.dtype)
    return s_in


def _backward(chain, s_in, states, xs_leaves, shared, grad_states, higher_order=False):
    """``(d s0, [d xs leaves], [d shared])`` of this rank: the adjoint split over the ranks (module doc).
    ``higher_order`` (``create_graph=True``): a ``ValueError`` on every rank (the gradient would not be
    differentiable again: its graph would silently miss the chain)."""
    ranks, program = chain.ranks, chain.program
    batch, width = s_in.shape
    failure = result = None
    if higher_order:
        failure = ValueError("seqpar.distributed.solve_chain: higher-order gradients (create_graph=True) are not "
                             "available across ranks; differentiate once, or solve on one device "
                             "(seqpar.solve_chain records the loop for them)")
    if program.adjoint == "parallel":
        result, failure = _parallel_adjoint(chain, s_in, states, xs_leaves, shared, grad_states, failure)
    else:
        ranks.gather(None, 0, s_in.device, failure)  # agreed before the rank-after-rank adjoint
    if result is None and failure is None:  # sequential adjoint, or maps that are not finite
        result = _adjoint_rank_after_rank(chain, s_in, states, xs_leaves, shared, grad_states)
    ranks.gather(None, 0, s_in.device, failure)  # a rank that failed above raises everywhere here
    grad_in, grad_xs, grad_shared = result
    grad_s0 = None
    if chain.s0_grad:
        grad_s0 = ranks.broadcast(grad_in if ranks.rank == 0 else None, batch * width, 0, s_in.device)
        grad_s0 = grad_s0.view(batch, width).to(s_in.dtype)
    summed = []
    for tensor, wanted, grad in zip(shared, chain.shared_grads, grad_shared):
        if not wanted:
            summed.append(None)
            continue
        total = torch.zeros_like(tensor) if grad is None else grad.clone()
        summed.append(ranks.sum(total))
    return grad_s0, list(grad_xs), summed


def _parallel_adjoint(chain, s_in, states, xs_leaves, shared, grad_states, failure=None):
    """The adjoint by the ranks' transposed maps: ``(result, failure)``; ``result=None`` without a failure when
    some map is not finite (the caller runs it rank after rank then, on every rank alike). ``failure``: this
    rank's reason not to run it, raised on every rank at the first exchange. Blocks beyond the device's memory
    bound: in runs (:mod:`.runs`; the last rank's gradients, from a zero entry, before the exchange)."""
    ranks, program = chain.ranks, chain.program
    kind = program.adjoint_kind
    work = accumulation_dtype(grad_states.dtype)
    batch, width = s_in.shape
    map_width = _map_width(kind, batch, width)
    run = share_run(program, kind)
    summary = result = None
    try:
        if failure is not None:
            raise failure
        d = Phi = None
        if run is None:
            prev = torch.cat([s_in.unsqueeze(0), states[:-1]])
            _, J = program.full_jacobians(prev, xs_leaves, shared)
            lam = solve_affine_recurrence(J, grad_states, kind, reverse=True)  # from lam_in = 0
            if ranks.rank > 0:  # what this rank hands its left neighbour: J_0^T lam_0 + Phi^T lam_in
                d = apply_map(J[0].to(work), lam[0].to(work), kind, transpose=True)
                Phi = block_product(J.to(work), kind) if ranks.rank < ranks.size - 1 else None
        elif ranks.rank == ranks.size - 1:  # its lam_in is zero: its gradients need nothing from the exchange
            result = adjoint_in_runs(program, s_in, states, xs_leaves, shared, grad_states, run)
            d = result[0].to(work)
        elif ranks.rank > 0:
            d, Phi = adjoint_boundary_in_runs(program, kind, work, s_in, states, xs_leaves, shared, grad_states, run)
        if ranks.rank > 0:
            summary = _map_row(Phi, d, map_width)
    except Exception as error:  # noqa: BLE001
        failure = error
    rows = ranks.gather(summary, map_width + batch * width, s_in.device, failure)
    if not bool(torch.isfinite(rows).all()):
        log.info("seqpar.distributed: the adjoint's boundary maps are not finite; solving it rank after rank")
        return None, None
    if result is not None:
        return result, None
    maps = [None if other == 0 else _map_of(rows[other], kind, batch, width, work) for other in range(ranks.size)]
    lam_in = entry_values(maps, kind, reverse=True)[ranks.rank]
    try:
        g = grad_states if lam_in is None else fold_entry(grad_states, None, kind, lam_in.to(grad_states.dtype),
                                                          reverse=True)
        if run is not None:
            return adjoint_in_runs(program, s_in, states, xs_leaves, shared, g, run), None
        if lam_in is not None:
            lam = solve_affine_recurrence(J, g, kind, reverse=True)
        grad_prev, grad_xs, grad_shared = program.steps_vjp(prev, xs_leaves, shared, lam)
        return (grad_prev[0], list(grad_xs), list(grad_shared)), None
    except Exception as error:  # noqa: BLE001
        return None, error


def _adjoint_rank_after_rank(chain, s_in, states, xs_leaves, shared, grad_states):
    """The adjoint rank after rank, the last rank first, each solving its own steps' recursion from the
    ``dLoss/d(entry state)`` of the rank after it (:func:`~seqpar.runtime.adjoint.adjoint_solve`: its blocks by
    PCR, or ``L`` VJPs for a sequential adjoint) and handing its own to the rank before."""
    ranks, program = chain.ranks, chain.program
    batch, width = s_in.shape
    lam_in, result = None, None
    for source in reversed(range(ranks.size)):
        failure = None
        if ranks.rank == source:
            try:
                g = grad_states if lam_in is None else fold_entry(grad_states, None, "full", lam_in, reverse=True)
                result = adjoint_solve(program, s_in, xs_leaves, shared, states, g)
            except Exception as error:  # noqa: BLE001
                failure = error
        handed = ranks.broadcast(result[0] if ranks.rank == source and failure is None else None, batch * width,
                                 source, s_in.device, failure)
        if ranks.rank == source - 1:
            lam_in = handed.view(batch, width).to(grad_states.dtype)
    return result
