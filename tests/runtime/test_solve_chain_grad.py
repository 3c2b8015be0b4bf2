"""Gradients of ``solve_chain`` equal autograd through the sequential loop.

The backward is implicit differentiation at the solution, so it is exact up to
the forward's own error: a float64 forward converged to 1e-10 (Newton: far
below) and a linear adjoint solve give gradients within ~1e-9 of autograd on
these contracting chains (the adjoint recursion contracts as the forward does).
"""

from __future__ import annotations

import pytest
import torch

from seqpar.runtime import adjoint, solve_chain, spec
from seqpar.runtime.adjoint import adjoint_in_runs as in_runs

from tests.conftest import lstm_chain, lstm_step, rnn_chain, rnn_step, sequential_loop

GRAD_TOL = 1e-9


def loss_weights(shape, seed=5):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def gradients(solver, step, s0, xs, shared, **options):
    """Gradients of ``sum(weights * states)`` w.r.t. ``s0``, ``xs`` and every shared tensor."""
    inputs = [s0.clone().requires_grad_(), xs.clone().requires_grad_(), *[t.clone().requires_grad_() for t in shared]]
    states = solver(step, inputs[0], inputs[1], tuple(inputs[2:]), **options)
    loss = (loss_weights(states.shape) * states).sum()
    return torch.autograd.grad(loss, inputs)


def by_loop(step, s0, xs, shared):
    return sequential_loop(step, s0, xs, shared)


def assert_grads_match(actual, expected, tol=GRAD_TOL):
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("adjoint", ["parallel", "sequential"])
@pytest.mark.parametrize("jacobian", ["full", "diag", "identity"])
def test_gradients_equal_autograd_of_the_loop(jacobian, adjoint):
    # The backward uses full Jacobians at the solution (or exact VJPs), so a
    # diag or identity forward still gives exact gradients.
    s0, xs, shared = rnn_chain(37, width=4)
    expected = gradients(by_loop, rnn_step, s0, xs, shared)
    actual = gradients(solve_chain, rnn_step, s0, xs, shared, jacobian=jacobian, adjoint=adjoint)
    assert_grads_match(actual, expected)


@pytest.mark.parametrize("adjoint", ["parallel", "sequential"])
def test_shared_tensor_gradient_is_summed_over_steps(adjoint):
    # s_l = s_{l-1} + b: s_l = s0 + l b, so d/db sum_l s_l = sum_l l = L (L + 1) / 2 per element.
    length = 10
    s0 = torch.zeros(2, 3, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    states = solve_chain(bias_step, s0, (), (b,), length=length, adjoint=adjoint)
    (grad,) = torch.autograd.grad(states.sum(), b)
    torch.testing.assert_close(grad, torch.full((3,), 2 * length * (length + 1) / 2, dtype=torch.float64))


def bias_step(s, x, b):
    return s + b


@pytest.mark.parametrize("adjoint", ["parallel", "sequential"])
def test_tuple_state_gradients(adjoint):
    s0, xs, shared = lstm_chain(20, hidden=3)
    h0, c0 = (t.clone().requires_grad_() for t in s0)
    W, U, b = (t.clone().requires_grad_() for t in shared)
    xs = xs.clone().requires_grad_()

    def loss(states):
        h, c = states
        return (loss_weights(h.shape) * h).sum() + (loss_weights(c.shape, seed=6) * c).sum()

    inputs = (h0, c0, xs, W, U, b)
    expected = torch.autograd.grad(loss(sequential_loop(lstm_step, (h0, c0), xs, (W, U, b))), inputs)
    actual = torch.autograd.grad(loss(solve_chain(lstm_step, (h0, c0), xs, (W, U, b), adjoint=adjoint)), inputs)
    assert_grads_match(actual, expected)


def test_gradients_with_multi_dim_batch():
    s0, xs, shared = rnn_chain(12, width=3, batch=(2, 2))
    expected = gradients(by_loop, rnn_step, s0, xs, shared)
    actual = gradients(solve_chain, rnn_step, s0, xs, shared)
    assert_grads_match(actual, expected)


def timestep_step(s, x, W, table):
    t, noise = x
    return torch.tanh(s @ W.T) * table.index_select(0, t.reshape(1)) + noise


@pytest.mark.parametrize("adjoint", ["parallel", "sequential"])
def test_integer_inputs_get_no_gradient_and_float_inputs_do(adjoint):
    length = 12
    ts = torch.arange(length - 1, -1, -1)
    noise = (0.1 * torch.randn(length, 2, 3, dtype=torch.float64)).requires_grad_()
    W = (0.5 * torch.randn(3, 3, dtype=torch.float64)).requires_grad_()
    table = torch.linspace(0.5, 0.9, length, dtype=torch.float64).requires_grad_()
    s0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    inputs = (s0, noise, W, table)
    expected = torch.autograd.grad(sequential_loop(timestep_step, s0, (ts, noise), (W, table)).sum(), inputs)
    states = solve_chain(timestep_step, s0, (ts, noise), (W, table), adjoint=adjoint)
    actual = torch.autograd.grad(states.sum(), inputs)
    assert_grads_match(actual, expected)
    assert ts.grad is None and not ts.requires_grad


@pytest.mark.parametrize("adjoint", ["parallel", "sequential"])
def test_gradients_after_a_fallback_are_exact(adjoint):
    # Two diag iterations cannot finish 30 steps: the loop finishes the chain and the
    # adjoint differentiates the states it returns.
    s0, xs, shared = rnn_chain(30, width=4)
    _, stats = solve_chain(rnn_step, s0, xs, shared, jacobian="diag", max_iters=2, return_stats=True)
    assert stats.fallback is not None
    expected = gradients(by_loop, rnn_step, s0, xs, shared)
    actual = gradients(solve_chain, rnn_step, s0, xs, shared, jacobian="diag", max_iters=2, adjoint=adjoint)
    assert_grads_match(actual, expected)


@pytest.mark.parametrize("adjoint", ["parallel", "sequential"])
def test_gradcheck_on_a_small_chain(adjoint):
    s0, xs, (W, U, b) = rnn_chain(5, width=2, batch=(1,), gain=0.8)
    inputs = tuple(t.clone().requires_grad_() for t in (s0, xs, W, U, b))

    def solve(s0, xs, W, U, b):
        # tol far below gradcheck's eps^2 so the finite differences see an exact forward.
        return solve_chain(rnn_step, s0, xs, (W, U, b), adjoint=adjoint, tol=1e-14)

    assert torch.autograd.gradcheck(solve, inputs, eps=1e-6, atol=1e-7)


def test_sequential_forward_with_parallel_adjoint_gives_the_loop_and_exact_gradients():
    # The backend's CPU training configuration: plain loop forward, PCR adjoint backward.
    s0 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    W = (torch.randn(20, 4, 4, dtype=torch.float64) / 2).requires_grad_()
    b = torch.randn(20, 4, dtype=torch.float64, requires_grad=True)
    step = lambda s, x: torch.tanh(s @ x[0].T + x[1])  # noqa: E731
    states, stats = solve_chain(step, s0, (W, b), forward="sequential", adjoint="parallel", return_stats=True)
    expected = sequential_loop(step, s0, (W, b))
    assert torch.equal(states, expected)
    assert stats.fallback == "forward='sequential'" and stats.sequential_steps == 20
    got = torch.autograd.grad(states.square().sum(), (s0, W, b))
    want = torch.autograd.grad(expected.square().sum(), (s0, W, b))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


@pytest.mark.parametrize("forward", ["parallel", "sequential"])
@pytest.mark.parametrize("length", [96, 150])
@pytest.mark.parametrize("case", ["elman", "lstm"])
def test_a_dense_adjoint_in_runs_equals_autograd_of_the_loop(monkeypatch, case, length, forward):
    # One byte of budget: runs of CPU_RUN_MIN = 32 positions, the last run first, dense blocks (w = 6; the LSTM's
    # tuple state packs to w = 8); at 150 steps the chain's first run is 22 positions, evaluated over 32 with a
    # zero cotangent after it (96: three whole runs). The default budget takes runs from 16 blocks of 64 x 64.
    monkeypatch.setattr(spec, "CPU_RUN_BYTES", 1)
    runs = []
    monkeypatch.setattr(adjoint, "adjoint_in_runs", lambda *args: runs.append(args[-1]) or in_runs(*args))
    if case == "elman":
        step, (s0, xs, shared) = rnn_step, rnn_chain(length, width=6)
        expected = gradients(by_loop, step, s0, xs, shared)
        actual = gradients(solve_chain, step, s0, xs, shared, forward=forward, adjoint="parallel")
    else:
        step, (s0, xs, shared) = lstm_step, lstm_chain(length, hidden=4)
        inputs = [*s0, xs, *shared]
        expected = tuple_gradients(lambda h, c, x, *w: sequential_loop(step, (h, c), x, w), inputs)
        actual = tuple_gradients(
            lambda h, c, x, *w: solve_chain(step, (h, c), x, w, forward=forward, adjoint="parallel"), inputs
        )
    assert runs == [spec.CPU_RUN_MIN]
    assert_grads_match(actual, expected, tol=1e-11)  # the same products as one pass: rounding over the steps


def tuple_gradients(solve, inputs):
    """Gradients of a weighted sum of a tuple state's tensors with respect to ``inputs``."""
    inputs = [tensor.clone().requires_grad_() for tensor in inputs]
    states = solve(*inputs)
    loss = sum((loss_weights(part.shape, seed=5 + index) * part).sum() for index, part in enumerate(states))
    return torch.autograd.grad(loss, inputs)


def test_second_order_gradients_count_an_input_computed_from_another_input_once():
    # xs and shared are computed from the same tensor as s0: every path from it counts once, at first and
    # second order (create_graph differentiates the recorded loop).
    torch.manual_seed(0)
    base = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    W = 0.5 * torch.randn(4, 4, dtype=torch.float64)

    def states_of(base, solve):
        s0 = base.tanh()
        xs = s0.unsqueeze(0) * torch.linspace(0.1, 1.0, 12, dtype=torch.float64).view(12, 1, 1)
        shared = (W * s0.sum(),)
        return solve(rnn_like_step, s0, xs, shared)

    def grad_norm(solve):
        (grad,) = torch.autograd.grad(states_of(base, solve).sin().sum(), [base], create_graph=True)
        return grad, torch.autograd.grad(grad.square().sum(), [base])[0]

    for got, want in zip(grad_norm(solve_chain), grad_norm(sequential_loop), strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def rnn_like_step(s, x, W):
    return torch.tanh(s @ W.T + x)
