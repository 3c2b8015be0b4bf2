"""``solve_chain`` returns the states of the sequential loop.

Tolerances (``tol`` below is the solver's stopping tolerance, ``|ds| <= atol + rtol |s|``):

* ``"full"`` (Newton) converges quadratically: once the last update is below
  ``tol`` the remaining error is ~``tol^2``, so comparing with ``tol`` is loose.
* ``"diag"`` / ``"identity"`` converge linearly with some rate ``rho``; stopping at
  ``tol`` leaves an error ``<= tol * rho / (1 - rho)``. The chains here contract
  (rho <= 0.9 measured), so ``10 * tol`` bounds it.
* A float32 solve compared with a float64 loop also carries float32 rounding of
  the loop itself (~1e-7 per step, not amplified by these contracting chains),
  far below the float32 ``tol`` of 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch

from seqpar.runtime import SolveStats, solve_chain

from tests.conftest import (
    euler_chain,
    euler_step,
    lstm_chain,
    lstm_step,
    rnn_chain,
    rnn_step,
    sequential_loop,
    to_float64,
)

DEFAULT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def assert_matches(actual, expected, tol):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)


def linear_tolerance(jacobian, tol):
    return tol if jacobian == "full" else 10 * tol


@pytest.mark.parametrize("length", [1, 5, 33, 100])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("jacobian", ["full", "diag"])
def test_rnn_chain_equals_float64_sequential_loop(jacobian, dtype, length):
    s0, xs, shared = rnn_chain(length, width=4, dtype=dtype)
    expected = sequential_loop(rnn_step, *to_float64((s0, xs, shared)))
    actual = solve_chain(rnn_step, s0, xs, shared, jacobian=jacobian)
    assert actual.shape == (length, 2, 4) and actual.dtype == dtype
    assert_matches(actual, expected, linear_tolerance(jacobian, DEFAULT_TOL[dtype]))


@pytest.mark.parametrize("length", [1, 5, 33, 100])
@pytest.mark.parametrize("jacobian", ["full", "diag", "identity"])
def test_euler_chain_equals_float64_sequential_loop(jacobian, length):
    # J = I + O(step size): Picard ("identity") converges here too.
    s0, xs, shared = euler_chain(length, width=3, dtype=torch.float32)
    expected = sequential_loop(euler_step, *to_float64((s0, xs, shared)))
    actual, stats = solve_chain(euler_step, s0, xs, shared, jacobian=jacobian, return_stats=True)
    assert stats.converged
    assert_matches(actual, expected, linear_tolerance(jacobian, 1e-5))


def test_length_one_chain_is_one_step():
    s0, xs, shared = rnn_chain(1, width=3)
    actual = solve_chain(rnn_step, s0, xs, shared)
    torch.testing.assert_close(actual[0], rnn_step(s0, xs[0], *shared), rtol=0, atol=1e-15)


@pytest.mark.parametrize("jacobian", ["auto", "diag"])
def test_a_batch_of_zero_is_the_plain_loop(jacobian):
    # A state without elements crashed inside the first-step check ("max(): Expected reduction dim"); the last
    # batch of a data pipeline can be empty.
    s0, xs, (W, U, b) = rnn_chain(33, width=3, batch=(0,))
    W = W.clone().requires_grad_()
    states, stats = solve_chain(rnn_step, s0, xs, (W, U, b), jacobian=jacobian, return_stats=True)
    assert states.shape == (33, 0, 3) and stats.fallback == "the state has no elements"
    (grad,) = torch.autograd.grad(states.sum(), W, allow_unused=True, materialize_grads=True)
    assert torch.equal(grad, torch.zeros_like(W))
    with pytest.raises(ValueError, match="jacobian must be one of"):
        solve_chain(rnn_step, s0, xs, (W, U, b), jacobian="newton")


def test_identity_jacobian_on_a_contracting_rnn_still_equals_the_loop():
    # Picard with A = I is a poor model of an RNN's Jacobian; whether it converges or
    # the fallback finishes the chain, the states are the loop's.
    s0, xs, shared = rnn_chain(50, width=4, dtype=torch.float64)
    actual = solve_chain(rnn_step, s0, xs, shared, jacobian="identity")
    assert_matches(actual, sequential_loop(rnn_step, s0, xs, shared), 1e-9)


def test_multi_dim_batch_dims():
    s0, xs, shared = rnn_chain(20, width=3, batch=(2, 3))
    actual = solve_chain(rnn_step, s0, xs, shared)
    assert actual.shape == (20, 2, 3, 3)
    assert_matches(actual, sequential_loop(rnn_step, s0, xs, shared), 1e-10)


def matrix_state_step(s, x, W):
    """A state of shape (3, 2) per batch element, mixed along both dims."""
    return torch.tanh(W @ s + x)


def test_matrix_state_with_explicit_batch_ndim():
    generator = torch.Generator().manual_seed(1)
    s0 = torch.randn(4, 3, 2, generator=generator, dtype=torch.float64)
    xs = torch.randn(12, 4, 3, 2, generator=generator, dtype=torch.float64)
    W = 0.3 * torch.randn(3, 3, generator=generator, dtype=torch.float64)
    actual = solve_chain(matrix_state_step, s0, xs, (W,), batch_ndim=1)
    assert actual.shape == (12, 4, 3, 2)
    assert_matches(actual, sequential_loop(matrix_state_step, s0, xs, (W,)), 1e-10)


def test_unbatched_state_with_batch_ndim_zero():
    s0, xs, shared = rnn_chain(15, width=4, batch=())
    actual = solve_chain(rnn_step, s0, xs, shared, batch_ndim=0)
    assert actual.shape == (15, 4)
    assert_matches(actual, sequential_loop(rnn_step, s0, xs, shared), 1e-10)


@pytest.mark.parametrize("jacobian", ["full", "diag", "identity"])
def test_tuple_state_lstm(jacobian):
    s0, xs, shared = lstm_chain(30, hidden=3)
    (h, c), stats = solve_chain(lstm_step, s0, xs, shared, jacobian=jacobian, return_stats=True)
    expected_h, expected_c = sequential_loop(lstm_step, s0, xs, shared)
    assert h.shape == c.shape == (30, 2, 3)
    # Identity/diag may hit the iteration cap and fall back: still the loop's states.
    assert_matches(h, expected_h, 1e-9)
    assert_matches(c, expected_c, 1e-9)


def timestep_step(s, x, W, table):
    """A scheduler-like step: a per-step integer index selects a coefficient.

    ``index_select``, not ``table[t]``: indexing with a 0-d tensor reads its value
    (data-dependent) and cannot be traced.
    """
    t, noise = x
    return torch.tanh(s @ W.T) * table.index_select(0, t.reshape(1)) + noise


def timestep_chain(length=16):
    generator = torch.Generator().manual_seed(2)
    W = 0.5 * torch.randn(3, 3, generator=generator, dtype=torch.float64)
    table = torch.linspace(0.5, 0.9, length, dtype=torch.float64)
    ts = torch.arange(length - 1, -1, -1)
    noise = 0.1 * torch.randn(length, 2, 3, generator=generator, dtype=torch.float64)
    s0 = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    return s0, (ts, noise), (W, table)


def test_integer_per_step_inputs_with_picard_and_sequential_adjoint():
    s0, xs, shared = timestep_chain()
    actual = solve_chain(timestep_step, s0, xs, shared, jacobian="identity", adjoint="sequential")
    assert_matches(actual, sequential_loop(timestep_step, s0, xs, shared), 1e-9)


def test_integer_per_step_inputs_with_full_jacobians():
    s0, xs, shared = timestep_chain()
    actual = solve_chain(timestep_step, s0, xs, shared, jacobian="full")
    assert_matches(actual, sequential_loop(timestep_step, s0, xs, shared), 1e-10)


@pytest.mark.parametrize("jacobian", ["full", "diag"])
@pytest.mark.parametrize(
    "step",
    [
        lambda s, x: 0.5 * s + x,
        lambda s, x: torch.tanh(s) * 0.5 + x,
        lambda s, x: torch.nn.functional.gelu(torch.nn.functional.layer_norm(s + x, (3,))),
    ],
    ids=["scaled-by-python-float", "tanh-scaled", "layer-norm"],
)
def test_steps_without_forward_mode_support_under_make_fx_get_exact_jacobians(step, jacobian):
    # Forward-mode AD under make_fx fails for these (aten._fw_primal); the Jacobians come from reverse mode.
    s0 = torch.randn(2, 3, dtype=torch.float64)
    xs = torch.randn(10, 2, 3, dtype=torch.float64)
    states = solve_chain(step, s0, xs, jacobian=jacobian)
    torch.testing.assert_close(states, sequential_loop(step, s0, xs), atol=1e-9, rtol=0)


def dict_input_step(s, x, W):
    return torch.tanh(s @ W.T + x["a"] * x["b"])


def test_per_step_inputs_may_be_a_pytree():
    generator = torch.Generator().manual_seed(3)
    s0 = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    xs = {"a": torch.randn(9, 2, 3, generator=generator, dtype=torch.float64), "b": torch.randn(9, 1, 3, generator=generator, dtype=torch.float64)}
    W = 0.4 * torch.randn(3, 3, generator=generator, dtype=torch.float64)
    actual = solve_chain(dict_input_step, s0, xs, (W,))
    assert_matches(actual, sequential_loop(dict_input_step, s0, xs, (W,)), 1e-10)


def input_free_step(s, x, W):
    """``x`` is the empty per-step input ``()``."""
    return torch.tanh(s @ W.T)


def test_chain_without_per_step_inputs_needs_length():
    s0 = torch.randn(2, 3, dtype=torch.float64)
    W = 0.5 * torch.randn(3, 3, dtype=torch.float64)
    actual = solve_chain(input_free_step, s0, (), (W,), length=7)
    assert actual.shape == (7, 2, 3)
    assert_matches(actual, sequential_loop(input_free_step, s0, (), (W,), length=7), 1e-10)


def test_one_element_literal_in_the_step_is_allowed():
    s0, xs, shared = rnn_chain(6, width=3)
    step = lambda s, x, W, U, b: rnn_step(s, x, W, U, b) + torch.tensor(0.0, dtype=torch.float64)  # noqa: E731
    assert_matches(solve_chain(step, s0, xs, shared), sequential_loop(rnn_step, s0, xs, shared), 1e-10)


# --- stats -------------------------------------------------------------------------------


def test_converged_solve_reports_iterations_and_no_fallback():
    s0, xs, shared = rnn_chain(64, width=4)
    _, stats = solve_chain(rnn_step, s0, xs, shared, jacobian="full", return_stats=True)
    assert isinstance(stats, SolveStats)
    assert stats.converged and stats.fallback is None and stats.sequential_steps == 0
    assert stats.length == 64 and stats.jacobian == "full"
    # Newton on a contracting chain: a handful of iterations, far fewer than L.
    assert 1 <= stats.iterations <= 10
    assert stats.residual <= 1.0


def test_auto_jacobian_is_full_for_narrow_states():
    s0, xs, shared = rnn_chain(8, width=4)
    _, stats = solve_chain(rnn_step, s0, xs, shared, return_stats=True)
    assert stats.jacobian == "full"


def test_auto_jacobian_is_identity_above_64_state_values():
    s0, xs, shared = euler_chain(4, width=65)
    _, stats = solve_chain(euler_step, s0, xs, shared, return_stats=True)
    assert stats.jacobian == "identity"


def test_iteration_cap_falls_back_and_reports_it():
    s0, xs, shared = rnn_chain(40, width=4)
    states, stats = solve_chain(rnn_step, s0, xs, shared, jacobian="diag", max_iters=2, return_stats=True)
    assert not stats.converged
    assert stats.iterations == 2
    assert "did not converge in 2 iterations" in stats.fallback
    # After k iterations the first k states are exact, so at most L - k remain.
    assert 1 <= stats.sequential_steps <= 38
    assert_matches(states, sequential_loop(rnn_step, s0, xs, shared), 1e-10)


def expanding_step(s, x, W):
    return torch.relu(s @ W.T + x)


def test_overflow_falls_back_and_reproduces_the_loop_exactly():
    # W = 4 I: the states grow by 4 per step and overflow float32 after ~64 steps;
    # Newton's first update multiplies 4^L and is non-finite at once.
    W = 4 * torch.eye(3)
    s0 = torch.ones(2, 3)
    xs = torch.ones(100, 2, 3)
    states, stats = solve_chain(expanding_step, s0, xs, (W,), return_stats=True)
    assert not stats.converged
    assert "non-finite" in stats.fallback
    assert stats.sequential_steps == 100 and stats.iterations == 1
    torch.testing.assert_close(states, sequential_loop(expanding_step, s0, xs, (W,)), rtol=0, atol=0, equal_nan=True)


def test_max_iters_above_length_is_capped_at_length():
    # After L iterations every state is exact, so the solve never needs more.
    s0, xs, shared = rnn_chain(6, width=4)
    _, stats = solve_chain(rnn_step, s0, xs, shared, jacobian="identity", max_iters=1000, return_stats=True)
    assert stats.iterations <= 6 and stats.converged


# --- tolerance and damping ---------------------------------------------------------------


def test_final_update_is_within_tolerance():
    s0, xs, shared = rnn_chain(64, width=4)
    _, stats = solve_chain(rnn_step, s0, xs, shared, jacobian="diag", tol=1e-6, return_stats=True)
    assert stats.converged and stats.residual <= 1.0


def test_looser_tolerance_never_needs_more_iterations():
    s0, xs, shared = rnn_chain(64, width=4)
    counts = [
        solve_chain(rnn_step, s0, xs, shared, jacobian="diag", tol=tol, return_stats=True)[1].iterations
        for tol in (1e-3, 1e-6, 1e-12)
    ]
    assert counts == sorted(counts)
    assert counts[0] < counts[-1]


def test_tolerance_bounds_the_error_of_a_linearly_converging_solve():
    # diag on a contracting chain: error <= tol * rho / (1 - rho) <= 10 tol for rho <= 0.9.
    s0, xs, shared = rnn_chain(64, width=4)
    expected = sequential_loop(rnn_step, s0, xs, shared)
    for tol in (1e-4, 1e-8):
        actual = solve_chain(rnn_step, s0, xs, shared, jacobian="diag", tol=tol)
        assert_matches(actual, expected, 10 * tol)


def test_tolerance_pair_is_atol_rtol():
    # A huge rtol with zero atol would accept anything relative; a tiny atol with zero
    # rtol is the strict absolute test: the second needs at least as many iterations.
    s0, xs, shared = rnn_chain(64, width=4)
    loose = solve_chain(rnn_step, s0, xs, shared, jacobian="diag", tol=(0.0, 1e-2), return_stats=True)[1]
    strict = solve_chain(rnn_step, s0, xs, shared, jacobian="diag", tol=(1e-12, 0.0), return_stats=True)[1]
    assert loose.converged and strict.converged
    assert loose.iterations <= strict.iterations


@pytest.mark.parametrize("damping", [0.5, 2.0])
def test_damping_still_converges_to_the_sequential_answer(damping):
    s0, xs, shared = rnn_chain(40, width=4)
    actual, stats = solve_chain(rnn_step, s0, xs, shared, damping=damping, return_stats=True)
    assert_matches(actual, sequential_loop(rnn_step, s0, xs, shared), 1e-9)
    assert math.isfinite(stats.residual)
