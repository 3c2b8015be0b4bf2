"""seqpar.distributed.solve_chain over 2 and 4 gloo ranks spawned by the tests themselves.

Every scenario runs on every rank of one spawned group (``seqpar.testing.ranks.run_ranks``: file store, 60 s on
every collective, 300 s in all, processes killed after); each rank builds the whole problem from fixed seeds,
solves its share across the group and compares with the sequential loop of the whole chain, run locally.

Tolerances: float64 chains are solved to ``|ds| <= 1e-10 (1 + |s|)`` and Newton converges quadratically, so
states and gradients (the exact adjoint at that solution) equal the loop to ~1e-15 relative; 1e-12 leaves room
for the conditioning of 24-40 steps. The chaotic logistic map (Lyapunov exponent ~0.5 a step) amplifies rounding
by up to e^{0.5 L}: its states are compared to 1e-6. float32: 1e-5 relative (the float32 tolerance).
"""

from __future__ import annotations

import time

import pytest
import torch

from seqpar.testing.ranks import run_ranks, run_ranks_once

F64 = 1e-12
GENERATOR_SEED = 0


def share(length, world, rank, counts=None):
    counts = counts or [length // world + (1 if r < length % world else 0) for r in range(world)]
    start = sum(counts[:rank])
    return start, start + counts[rank]


def loop(step, s0, xs, shared=()):
    """The chain's states by the plain loop (differentiable), ``(L, *s0.shape)``."""
    states, s = [], s0
    for index in range(xs[0].shape[0]):
        s = step(s, tuple(x[index] for x in xs), *shared)
        states.append(s)
    return torch.stack(states)


def mlp_step(s, x, U):
    W, b = x
    return torch.tanh(s @ W.T + b + 0.1 * s @ U)


def mlp_problem(length=24, batch=3, width=4, dtype=torch.float64, seed=GENERATOR_SEED):
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(length, width, width, dtype=dtype, generator=generator) * 0.5
    b = torch.randn(length, width, dtype=dtype, generator=generator)
    U = torch.randn(width, width, dtype=dtype, generator=generator) * 0.3
    s0 = torch.randn(batch, width, dtype=dtype, generator=generator)
    cotangent = torch.randn(length, batch, width, dtype=dtype, generator=generator)
    return W, b, U, s0, cotangent


def mlp_case(rank, world, counts=None, s0_grad=True, xs_grad=True, shared_grad=True, **options):
    """States and every gradient of a tanh chain with a shared matrix, against the loop's."""
    import seqpar.distributed as sd

    W, b, U, s0, cotangent = mlp_problem()
    first, stop = share(W.shape[0], world, rank, counts)
    mine = [t.clone().requires_grad_(xs_grad) for t in (W[first:stop], b[first:stop])]
    U_mine, s0_mine = U.clone().requires_grad_(shared_grad), s0.clone().requires_grad_(s0_grad)
    states, stats = sd.solve_chain(mlp_step, s0_mine, tuple(mine), (U_mine,), return_stats=True, **options)
    (states * cotangent[first:stop]).sum().backward()
    full = [t.clone().requires_grad_() for t in (W, b, U, s0)]
    expected = loop(mlp_step, full[3], (full[0], full[1]), (full[2],))
    (expected * cotangent).sum().backward()
    result = dict(
        states=(states - expected[first:stop]).abs().max().item(),
        iterations=stats.iterations, converged=stats.converged, fallback=stats.fallback,
        sequential_steps=stats.sequential_steps,
    )
    if shared_grad:
        result["grad_U"] = (U_mine.grad - full[2].grad).abs().max().item()
    if xs_grad:
        result["grad_W"] = (mine[0].grad - full[0].grad[first:stop]).abs().max().item()
        result["grad_b"] = (mine[1].grad - full[1].grad[first:stop]).abs().max().item()
    if s0_grad:
        result["grad_s0"] = (s0_mine.grad - full[3].grad).abs().max().item()
    return result


def logistic_case(rank, world):
    """A chaotic diagonal chain: s = 3.9 s (1 - s) + 1e-3 x_l."""
    import seqpar.distributed as sd

    length = 40
    generator = torch.Generator().manual_seed(3)
    xs = torch.rand(length, 2, 3, dtype=torch.float64, generator=generator)
    s0 = torch.rand(2, 3, dtype=torch.float64, generator=generator) * 0.8 + 0.1

    def step(s, x):
        return 3.9 * s * (1 - s) + 1e-3 * x

    first, stop = share(length, world, rank)
    states, stats = sd.solve_chain(step, s0, xs[first:stop], return_stats=True)
    expected = loop(lambda s, x: step(s, x[0]), s0, (xs,))
    return dict(states=(states - expected[first:stop]).abs().max().item(), converged=stats.converged,
                fallback=stats.fallback)


def diagonal_affine_case(rank, world):
    """A selective-scan-like affine diagonal chain s = a_l * s + b_l: one linear solve, exact."""
    import seqpar.distributed as sd

    length = 33
    generator = torch.Generator().manual_seed(5)
    a = torch.rand(length, 2, 16, dtype=torch.float64, generator=generator)
    bx = torch.randn(length, 2, 16, dtype=torch.float64, generator=generator)
    s0 = torch.randn(2, 16, dtype=torch.float64, generator=generator)
    first, stop = share(length, world, rank)
    mine = [t[first:stop].clone().requires_grad_() for t in (a, bx)]
    states, stats = sd.solve_chain(lambda s, x: x[0] * s + x[1], s0, tuple(mine), return_stats=True)
    states.sum().backward()
    full = [t.clone().requires_grad_() for t in (a, bx)]
    expected = loop(lambda s, x: x[0] * s + x[1], s0, tuple(full))
    expected.sum().backward()
    return dict(states=(states - expected[first:stop]).abs().max().item(), iterations=stats.iterations,
                grad_a=(mine[0].grad - full[0].grad[first:stop]).abs().max().item())


def wide_picard_case(rank, world):
    """w = 80 > 64: Picard forward and the rank-after-rank sequential adjoint (the "auto" choices there)."""
    import seqpar.distributed as sd

    length, width = 16, 80
    generator = torch.Generator().manual_seed(7)
    W = torch.randn(width, width, dtype=torch.float64, generator=generator) * (0.5 / width**0.5)
    xs = torch.randn(length, 1, width, dtype=torch.float64, generator=generator)
    s0 = torch.randn(1, width, dtype=torch.float64, generator=generator)

    def step(s, x, W):
        return torch.tanh(s @ W.T + x)

    first, stop = share(length, world, rank)
    W_mine = W.clone().requires_grad_()
    x_mine = xs[first:stop].clone().requires_grad_()
    states, stats = sd.solve_chain(step, s0, x_mine, (W_mine,), return_stats=True)
    states.square().sum().backward()
    W_full, x_full = W.clone().requires_grad_(), xs.clone().requires_grad_()
    expected = loop(lambda s, x, W: step(s, x[0], W), s0, (x_full,), (W_full,))
    expected.square().sum().backward()
    return dict(states=(states - expected[first:stop]).abs().max().item(), jacobian=stats.jacobian,
                grad_W=(W_mine.grad - W_full.grad).abs().max().item(),
                grad_x=(x_mine.grad - x_full.grad[first:stop]).abs().max().item())


def float32_case(rank, world):
    import seqpar.distributed as sd

    W, b, U, s0, _ = mlp_problem(dtype=torch.float64)
    first, stop = share(W.shape[0], world, rank)
    states = sd.solve_chain(mlp_step, s0.float(), (W[first:stop].float(), b[first:stop].float()), (U.float(),))
    expected = loop(mlp_step, s0, (W, b), (U,))[first:stop]
    return ((states.double() - expected).abs().max() / expected.abs().max()).item()


def error_of(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001
        return type(error).__name__, str(error)
    return None


def double_backward(step, s0, xs, shared):
    import seqpar.distributed as sd

    s0 = s0.clone().requires_grad_()
    (grad,) = torch.autograd.grad(sd.solve_chain(step, s0, xs, shared).sum(), s0, create_graph=True)
    grad.sum().backward()


def bad_input_cases(rank, world):
    import seqpar.distributed as sd

    W, b, U, s0, _ = mlp_problem()
    first, stop = share(W.shape[0], world, rank)
    xs = (W[first:stop], b[first:stop])
    wrong_dtype = (xs[0].float(), xs[1].float()) if rank == 1 else xs
    other_s0 = s0 + (1e-9 if rank == world - 1 else 0.0)
    empty = (W[:0], b[:0]) if rank == 1 else xs
    return dict(
        dtype=error_of(lambda: sd.solve_chain(mlp_step, s0, wrong_dtype, (U,))),
        s0=error_of(lambda: sd.solve_chain(mlp_step, other_s0, xs, (U,))),
        empty=error_of(lambda: sd.solve_chain(mlp_step, s0, empty, (U,))),
        no_elements_on_one_rank=error_of(lambda: sd.solve_chain(mlp_step, s0[:0] if rank == 1 else s0, xs, (U,))),
        damping=error_of(lambda: sd.solve_chain(mlp_step, s0, xs, (U,), damping=1.0)),
        max_iters=error_of(lambda: sd.solve_chain(mlp_step, s0, xs, (U,), max_iters=3 if rank == 0 else 4)),
        double=error_of(lambda: double_backward(mlp_step, s0, xs, (U,))),
        structure=error_of(lambda: sd.solve_chain(rank_steps(rank, affine_on_rank_0=True), s0[:, :1].clone(),
                                                  (b[first:stop, :1],))),
        after=mlp_case(rank, world),  # the group still works after every error above
        own_steps=own_steps_case(rank, world),
    )


def rank_steps(rank, affine_on_rank_0=False):
    """A diagonal step of this rank's own: affine on rank 0 when asked (one linear solve), else nonlinear."""
    if affine_on_rank_0 and rank == 0:
        return lambda s, x: 0.5 * s + x[0]
    return (lambda s, x: torch.tanh(0.5 * s + x[0])) if rank % 2 == 0 else (lambda s, x: torch.sin(0.5 * s + x[0]))


def own_steps_case(rank, world):
    """Every rank with a step of its own (tanh, sin, tanh, ..): the states of that chain, as the loop gives them."""
    import seqpar.distributed as sd

    _, b, _, s0, _ = mlp_problem()
    counts = [b.shape[0] // world] * world
    counts[-1] += b.shape[0] - sum(counts)
    expected, s = [], s0
    for owner, count in enumerate(counts):
        expected.append(loop(rank_steps(owner), s, (b[sum(counts[:owner]) : sum(counts[: owner + 1])],)))
        s = expected[-1][-1]
    first, stop = share(b.shape[0], world, rank, counts)
    states = sd.solve_chain(rank_steps(rank), s0, (b[first:stop],))
    return (states - torch.cat(expected)[first:stop]).abs().max().item()


def mesh_case(rank, world):
    """The group given as a one-dimensional DeviceMesh."""
    from torch.distributed.device_mesh import init_device_mesh

    return mlp_case(rank, world, group=init_device_mesh("cpu", (world,)))


def injected_failure_cases(rank, world):
    """Rank 1 raises inside the forward's second linearisation, then inside the adjoint's reverse solve: every
    rank raises (rank 1 its own error, the others a RankFailure naming it), and the group still works after."""
    from unittest import mock

    import seqpar.distributed.solve as solve

    calls = {"evaluate": 0}
    evaluate, recurrence = solve.evaluate_all, solve.solve_affine_recurrence

    def failing_evaluate(*args, **kwargs):
        calls["evaluate"] += 1
        if rank == 1 and calls["evaluate"] == 2:
            raise RuntimeError("injected forward failure")
        return evaluate(*args, **kwargs)

    def failing_recurrence(*args, reverse=False, **kwargs):
        if rank == 1 and reverse:
            raise RuntimeError("injected adjoint failure")
        return recurrence(*args, reverse=reverse, **kwargs)

    with mock.patch.object(solve, "evaluate_all", failing_evaluate):
        forward = error_of(lambda: mlp_case(rank, world))
    with mock.patch.object(solve, "solve_affine_recurrence", failing_recurrence):
        backward = error_of(lambda: mlp_case(rank, world))
    return dict(forward=forward, backward=backward, after=mlp_case(rank, world))


def non_finite_cases(rank, world):
    """Rank 1's first forward update and its adjoint's boundary map made infinite: the forward finishes rank
    after rank from the start (the reason on every rank), the adjoint runs rank after rank; both exact."""
    from unittest import mock

    import seqpar.distributed.solve as solve

    recurrence, product = solve.solve_affine_recurrence, solve.block_product
    calls = {"forward": 0}

    def infinite_once(A, c, kind, reverse=False, **kwargs):
        y = recurrence(A, c, kind, reverse=reverse, **kwargs)
        if rank == 1 and not reverse:
            calls["forward"] += 1
            if calls["forward"] <= 2:  # both solves of the first iteration (from a zero entry, and from the scan's)
                y = y + float("inf")
        return y

    def infinite_product(A, kind):
        return product(A, kind) * float("inf") if rank == 1 else product(A, kind)

    with mock.patch.object(solve, "solve_affine_recurrence", infinite_once):
        forward = mlp_case(rank, world)
    with mock.patch.object(solve, "block_product", infinite_product):
        adjoint = mlp_case(rank, world)
    return dict(forward=forward, adjoint=adjoint)


def empty_batch_case(rank, world):
    """A batch of 0 on every rank: each rank's states and gradients are empty (its steps' plain loop); the shared
    matrix's gradient is zero, as in eager."""
    import seqpar.distributed as sd

    W, b, U, s0, _ = mlp_problem()
    first, stop = share(W.shape[0], world, rank)
    mine = [t.clone().requires_grad_() for t in (W[first:stop], b[first:stop], U)]
    states, stats = sd.solve_chain(mlp_step, s0[:0], tuple(mine[:2]), (mine[2],), return_stats=True)
    states.square().sum().backward()
    return dict(shape=tuple(states.shape), fallback=stats.fallback,
                grads=[float(t.grad.abs().max()) for t in mine], grad_shapes=[tuple(t.grad.shape) for t in mine])


def bounded_cases(rank, world):
    """The device's memory set so that 2 positions' dense blocks of the tanh chain fit its bound (N = 3, w = 4,
    float64: 384 bytes a position), 8 of its diagonal ones, 3 of the affine chain's (N = 2, w = 16): the shares
    are solved in runs (uneven shares' last runs overlap the run before; quasi-Newton's diagonal blocks on the
    shares longer than 8). Records per case the largest evaluation of the runs, how many there were and
    whether this rank evaluated its whole share at once."""
    from unittest import mock

    import seqpar.distributed.runs as runs
    import seqpar.distributed.solve as solve
    from seqpar.runtime import budget, spec

    evaluated, whole = [], []
    blocks_of_run, evaluate_all = runs.blocks_of_run, solve.evaluate_all

    def recorded_run(program, s_in, states, xs_leaves, shared, rows, **kwargs):
        evaluated.append(rows.stop - rows.start)
        return blocks_of_run(program, s_in, states, xs_leaves, shared, rows, **kwargs)

    def recorded_whole(*args):
        whole.append(True)
        return evaluate_all(*args)

    def recorded(result):
        found = dict(result, largest=max(evaluated, default=0), runs=len(evaluated), whole=bool(whole))
        evaluated.clear()
        whole.clear()
        return found

    uneven = [7, 17] if world == 2 else [7, 5, 1, 11]
    with mock.patch.object(budget, "device_memory", lambda device: spec.DEVICE_MEMORY_SHARE * 2 * 384), \
            mock.patch.object(runs, "blocks_of_run", recorded_run), \
            mock.patch.object(solve, "evaluate_all", recorded_whole):
        return dict(mlp=recorded(mlp_case(rank, world)), uneven=recorded(mlp_case(rank, world, counts=uneven)),
                    quasi_newton=recorded(mlp_case(rank, world, counts=uneven, jacobian="diag")),
                    diagonal_affine=recorded(diagonal_affine_case(rank, world)))


def scenarios(rank, world):
    """Every scenario's measurements on this rank (one spawned group runs them all)."""
    uneven = [1, 23] if world == 2 else [1, 20, 1, 2]
    return dict(
        mlp=mlp_case(rank, world),
        uneven=mlp_case(rank, world, counts=uneven),
        not_converged=mlp_case(rank, world, max_iters=2),
        sequential=mlp_case(rank, world, forward="sequential"),
        s0_grad_on_rank_0=mlp_case(rank, world, xs_grad=rank != 0, s0_grad=rank == 0),
        no_grad_on_rank_0=mlp_case(rank, world, xs_grad=rank != 0, s0_grad=False, shared_grad=False),
        logistic=logistic_case(rank, world),
        diagonal_affine=diagonal_affine_case(rank, world),
        wide_picard=wide_picard_case(rank, world),
        float32=float32_case(rank, world),
        bad_input=bad_input_cases(rank, world),
        mesh=mesh_case(rank, world),
        quasi_newton=mlp_case(rank, world, jacobian="diag"),
        non_finite=non_finite_cases(rank, world),
        injected=injected_failure_cases(rank, world),
        bounded=bounded_cases(rank, world),
        empty_batch=empty_batch_case(rank, world),
    )


def results(world):
    return run_ranks_once(scenarios, world)


# 4 ranks as a slow case: CI runs 2 (its time near the 20-minute limit); `-m "slow or not slow"` runs both
WORLDS = pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])


def assert_mlp_exact(result):
    for name in ("states", "grad_U", "grad_W", "grad_b", "grad_s0"):
        if name in result:
            assert result[name] < F64, (name, result)


@WORLDS
def test_states_and_every_gradient_equal_the_loop(world):
    for result in results(world):
        assert_mlp_exact(result["mlp"])
        assert result["mlp"]["converged"] and result["mlp"]["iterations"] < 12


@WORLDS
def test_uneven_shares_and_a_rank_with_one_step(world):
    for result in results(world):
        assert_mlp_exact(result["uneven"])


@WORLDS
def test_not_converging_finishes_rank_after_rank_with_the_reason_on_every_rank(world):
    for rank, result in enumerate(results(world)):
        case = result["not_converged"]
        assert_mlp_exact(case)
        assert not case["converged"] and "did not converge in 2 iterations" in case["fallback"]
    assert sum(result["not_converged"]["sequential_steps"] for result in results(world)) > 0


@WORLDS
def test_forward_sequential_runs_rank_after_rank(world):
    for result in results(world):
        assert_mlp_exact(result["sequential"])
        assert result["sequential"]["fallback"] == "forward='sequential'"


@WORLDS
def test_ranks_whose_inputs_need_no_gradient_still_join_the_backward(world):
    for result in results(world):
        assert_mlp_exact(result["s0_grad_on_rank_0"])
        assert_mlp_exact(result["no_grad_on_rank_0"])


@WORLDS
def test_a_chaotic_chain_equals_the_loop(world):
    for result in results(world):
        assert result["logistic"]["states"] < 1e-6, result["logistic"]


@WORLDS
def test_an_affine_diagonal_chain_takes_one_linear_solve(world):
    for result in results(world):
        case = result["diagonal_affine"]
        assert case["iterations"] == 1 and case["states"] < F64 and case["grad_a"] < F64, case


@WORLDS
def test_wide_states_use_picard_and_the_rank_after_rank_adjoint(world):
    for result in results(world):
        case = result["wide_picard"]
        assert case["jacobian"] == "identity"
        assert case["states"] < 1e-9 and case["grad_W"] < 1e-9 and case["grad_x"] < 1e-9, case


@WORLDS
def test_float32_within_its_tolerance(world):
    for result in results(world):
        assert result["float32"] < 1e-5


@WORLDS
def test_bad_input_on_one_rank_raises_value_error_on_every_rank(world):
    for rank, result in enumerate(results(world)):
        case = result["bad_input"]
        name, message = case["dtype"]
        assert name == "ValueError" and "dtype" in message and (rank == 1 or "rank 1" in message), case["dtype"]
        name, message = case["s0"]
        assert name == "ValueError" and "s0 (values) differs" in message
        name, message = case["empty"]
        assert name == "ValueError" and "holds no steps" in message
        name, message = case["no_elements_on_one_rank"]
        assert name == "ValueError" and "s0 has no elements (a batch of 0) on ranks [1] but not on the others" \
            in message
        name, message = case["damping"]
        assert name == "ValueError" and "damping is not available across ranks" in message
        name, message = case["double"]  # higher-order gradients: a clear error on every rank, never zeros
        assert name == "ValueError" and "higher-order gradients (create_graph=True) are not available" in message
        name, message = case["max_iters"]  # different iteration caps would leave ranks at different collectives
        assert name == "ValueError" and "solver options (max_iters, forward, tol) differs" in message
        name, message = case["structure"]  # an affine rank takes one solve, the others iterate: never a hang
        assert name == "ValueError" and "step structure (affine: one linear solve) differs" in message
        assert_mlp_exact(case["after"])
        assert case["own_steps"] < 1e-12


@WORLDS
def test_non_finite_values_fall_back_to_the_exact_loop_forward_and_backward(world):
    for result in results(world):
        forward, adjoint = result["non_finite"]["forward"], result["non_finite"]["adjoint"]
        assert_mlp_exact(forward)
        assert forward["fallback"] == "non-finite values at iteration 1" and not forward["converged"]
        # With 4 ranks rank 1's adjoint map is infinite (with 2 it is the last rank, whose map no rank needs):
        # the adjoint runs rank after rank, exact.
        assert_mlp_exact(adjoint)


@WORLDS
def test_quasi_newton_with_diagonal_blocks_converges_to_the_loop(world):
    """Linear convergence, stopped at 1e-11 relative (the float64 tolerance for inexact blocks): states within
    1e-9 of the loop's; the adjoint uses the full Jacobians, exact at those states."""
    for result in results(world):
        case = result["quasi_newton"]
        assert case["converged"] and case["states"] < 1e-9, case
        assert max(case[name] for name in ("grad_U", "grad_W", "grad_b", "grad_s0")) < 1e-8, case


@WORLDS
def test_a_device_mesh_stands_for_its_group(world):
    for result in results(world):
        assert_mlp_exact(result["mesh"])


@WORLDS
def test_a_rank_failing_inside_the_forward_or_the_adjoint_raises_on_every_rank(world):
    for rank, result in enumerate(results(world)):
        case = result["injected"]
        for phase in ("forward", "backward"):
            name, message = case[phase]
            if rank == 1:
                assert name == "RuntimeError" and f"injected {'forward' if phase == 'forward' else 'adjoint'} failure" \
                    in message, case
            else:
                assert name == "RankFailure" and "rank 1: RuntimeError: injected" in message, case
        assert_mlp_exact(case["after"])


@WORLDS
def test_shares_whose_blocks_exceed_the_device_memory_are_solved_in_runs_exactly(world):
    """Every rank's forward and adjoint in runs of the positions whose blocks fit (2 dense, 8 diagonal, 3 of the
    affine chain's), never a share beyond them at once: states and every gradient as exact as unbounded (Newton
    with exact blocks to 1e-12, in as many iterations; the affine chain in one linear solve; quasi-Newton to its
    1e-9)."""
    runs = {"mlp": 2, "uneven": 2, "quasi_newton": 8, "diagonal_affine": 3}
    for rank, result in enumerate(results(world)):
        case = result["bounded"]
        for name, run in runs.items():
            assert case[name]["largest"] <= run, (name, case[name])
        uneven = [7, 17] if world == 2 else [7, 5, 1, 11]
        for name, share_fits in (("mlp", False), ("uneven", uneven[rank] <= 2), ("diagonal_affine", False)):
            assert (case[name]["runs"] == 0) == case[name]["whole"] == share_fits, (name, case[name])
        # quasi-Newton: the forward's diagonal blocks in runs on the shares longer than 8 (its adjoint's are dense)
        assert case["quasi_newton"]["whole"] == (uneven[rank] <= 8), case["quasi_newton"]
        assert_mlp_exact(case["mlp"])
        assert_mlp_exact(case["uneven"])
        assert case["mlp"]["converged"] and case["mlp"]["iterations"] == result["mlp"]["iterations"], case["mlp"]
        quasi = case["quasi_newton"]
        assert quasi["converged"] and quasi["states"] < 1e-9, quasi
        assert max(quasi[name] for name in ("grad_U", "grad_W", "grad_b", "grad_s0")) < 1e-8, quasi
        affine = case["diagonal_affine"]
        assert affine["iterations"] == 1 and affine["states"] < F64 and affine["grad_a"] < F64, affine


@WORLDS
def test_a_batch_of_zero_on_every_rank_gives_empty_states_and_zero_gradients(world):
    # It raised "s0 has no elements" on every rank; eager's loop returns empty states.
    for rank, result in enumerate(results(world)):
        case = result["empty_batch"]
        first, stop = share(24, world, rank)
        assert case["shape"] == (stop - first, 0, 4) and case["fallback"] == "the state has no elements", case
        assert case["grads"] == [0.0, 0.0, 0.0] and case["grad_shapes"] == [(stop - first, 4, 4), (stop - first, 4),
                                                                              (4, 4)], case


def raise_before_the_solve(rank, world):
    import seqpar.distributed as sd

    if rank == 1:
        raise RuntimeError("this rank failed before the solve")
    W, b, U, s0, _ = mlp_problem()
    first, stop = share(W.shape[0], world, rank)
    started = time.monotonic()
    error = error_of(lambda: sd.solve_chain(mlp_step, s0, (W[first:stop], b[first:stop]), (U,)))
    return error, time.monotonic() - started


def test_a_rank_that_dies_leaves_the_others_an_error_within_the_group_timeout():
    started = time.monotonic()
    with pytest.raises(RuntimeError) as raised:
        run_ranks(raise_before_the_solve, 2, group_timeout=8.0, timeout=120.0)
    assert time.monotonic() - started < 60
    assert "this rank failed before the solve" in str(raised.value)
    # rank 0 answered (its solve timed out with an error) rather than hanging: only rank 1 is reported
    assert "1 of 2 ranks failed" in str(raised.value)
