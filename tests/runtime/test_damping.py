"""Levenberg-Marquardt (ELK) damping: the block-tridiagonal step and the damped chain solve.

The LM step solves ``(J^T J + lambda I) ds = J^T c`` with ``J`` the lower
block-bidiagonal matrix (``I`` on the diagonal, ``-A_l`` below). The references
are that system assembled densely and solved by ``torch.linalg.solve`` in
float64, and the plain sequential loop for whole chains.
"""

from __future__ import annotations

import pytest
import torch

from seqpar.runtime import newton, solve_chain
from seqpar.runtime.pcr import solve_affine_recurrence
from seqpar.runtime.tridiagonal import levenberg_marquardt_step

from tests.conftest import rnn_chain, rnn_step, sequential_loop

KINDS = ["full", "diag", "identity"]


def blocks(kind, length, batch, width, scale=1.0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(1000 * length + 10 * batch + width)
    c = torch.randn(length, batch, width, generator=generator, dtype=torch.float64)
    if kind == "full":
        A = scale * torch.randn(length, batch, width, width, generator=generator, dtype=torch.float64) / width**0.5
    elif kind == "diag":
        A = scale * torch.randn(length, batch, width, generator=generator, dtype=torch.float64)
    else:
        A = None
    return (None if A is None else A.to(dtype)), c.to(dtype)


def dense_levenberg_marquardt(A, c, kind, damping):
    """``(J^T J + lambda I)^{-1} J^T c`` per batch element, with ``J`` assembled as an ``(L w, L w)`` matrix."""
    length, batch, width = c.shape
    eye = torch.eye(width, dtype=c.dtype)
    out = []
    for n in range(batch):
        J = torch.eye(length * width, dtype=c.dtype)
        for l in range(1, length):
            block = eye if kind == "identity" else (A[l, n] if kind == "full" else torch.diag(A[l, n]))
            J[l * width : (l + 1) * width, (l - 1) * width : l * width] = -block
        T = J.T @ J + damping * torch.eye(length * width, dtype=c.dtype)
        out.append(torch.linalg.solve(T, J.T @ c[:, n].reshape(-1)).reshape(length, width))
    return torch.stack(out, dim=1)


# --- the block-tridiagonal solve ------------------------------------------------------------------


@pytest.mark.parametrize("width", [1, 2, 5])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("length", [1, 2, 3, 7, 64, 100])
@pytest.mark.parametrize("kind", KINDS)
def test_levenberg_marquardt_step_solves_the_normal_equations(kind, length, batch, width):
    # Blocks of norm ~1 (products along the chain grow): the system's eigenvalues
    # lie in [lambda, (2 + |A|)^2 + lambda], so the dense solve is accurate to ~1e-13.
    A, c = blocks(kind, length, batch, width)
    for damping in (0.1, 1.0, 10.0):
        expected = dense_levenberg_marquardt(A, c, kind, damping)
        torch.testing.assert_close(levenberg_marquardt_step(A, c, kind, damping), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_damping_is_the_newton_step(kind):
    # Contracting blocks keep J well conditioned, so J^T J ds = J^T c is solved accurately.
    A, c = blocks(kind, 37, 3, 4, scale=0.5)
    newton_step = solve_affine_recurrence(A, c, kind)
    torch.testing.assert_close(levenberg_marquardt_step(A, c, kind, 0.0), newton_step, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_large_damping_approaches_the_scaled_gradient_step(kind):
    # (J^T J + lambda I)^{-1} J^T c -> J^T c / lambda as lambda grows.
    A, c = blocks(kind, 9, 2, 3)
    damping = 1e8
    gradient = c.clone()
    if kind == "identity":
        gradient[:-1] -= c[1:]
    elif kind == "diag":
        gradient[:-1] -= A[1:] * c[1:]
    else:
        gradient[:-1] -= (A[1:].mT @ c[1:].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(levenberg_marquardt_step(A, c, kind, damping) * damping, gradient, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["full", "diag"])
def test_half_precision_step_is_computed_in_float32(kind):
    A, c = blocks(kind, 20, 2, 3, dtype=torch.bfloat16)
    step = levenberg_marquardt_step(A, c, kind, 1.0)
    assert step.dtype == torch.bfloat16
    expected = dense_levenberg_marquardt(A.double(), c.double(), kind, 1.0)
    torch.testing.assert_close(step.double(), expected, rtol=2e-2, atol=2e-2)


def test_step_does_not_modify_its_inputs():
    A, c = blocks("full", 10, 2, 3)
    A_copy, c_copy = A.clone(), c.clone()
    levenberg_marquardt_step(A, c, "full", 1.0)
    assert torch.equal(A, A_copy) and torch.equal(c, c_copy)


# --- damped chain solves ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gain", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("damping", [0.1, 1.0, 10.0])
def test_damped_solve_equals_the_sequential_loop(damping, gain, kind):
    # Convergence is tested on the Newton step (|n| <= 1e-10 (1 + |s|)) whatever the damping;
    # quasi-Newton ("diag") converges linearly, so its error is a few times the tolerance.
    s0, xs, shared = rnn_chain(48, width=4, gain=gain)
    expected = sequential_loop(rnn_step, s0, xs, shared)
    actual, stats = solve_chain(rnn_step, s0, xs, shared, jacobian=kind, damping=damping, return_stats=True)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-8)
    assert stats.fallback is None or "non-finite" not in stats.fallback


def test_damped_windowed_solve_equals_the_sequential_loop():
    s0, xs, shared = rnn_chain(40, width=3, gain=1.0)
    expected = sequential_loop(rnn_step, s0, xs, shared)
    actual = solve_chain(rnn_step, s0, xs, shared, jacobian="full", damping=1.0, window=16)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-8)


def test_damping_keeps_finishing_a_state_per_iteration():
    # The first active state is exact after every iteration, damped or not: at most L iterations.
    s0, xs, shared = rnn_chain(30, width=4, gain=2.0)
    _, stats = solve_chain(rnn_step, s0, xs, shared, damping=10.0, max_iters=1000, return_stats=True)
    assert stats.converged and stats.iterations <= 30


def test_damping_adapts_towards_newton_on_a_contracting_chain():
    # lambda shrinks 4x per iteration while the residual falls: a contracting chain
    # needs a few more iterations than Newton (measured 6 vs 7-11 for lambda_0 = 0.1..10), not ~L.
    s0, xs, shared = rnn_chain(128, width=4, gain=0.5)
    plain = solve_chain(rnn_step, s0, xs, shared, jacobian="full", return_stats=True)[1]
    damped = solve_chain(rnn_step, s0, xs, shared, jacobian="full", damping=10.0, return_stats=True)[1]
    assert plain.converged and damped.converged
    assert damped.iterations <= 3 * plain.iterations


def expanding_step(s, x, a):
    """``s_l = -a tanh(s_{l-1}) + x_l``: ``|df/ds| = a`` near 0, so Newton's products grow like ``a^L``."""
    return -a * torch.tanh(s) + x


def test_damping_avoids_the_non_finite_fallback_of_an_overflowing_newton_step():
    # float32, a = 3, L = 128: the Newton step (products of up to 128 Jacobians ~ 3^128)
    # overflows on the first iteration and the undamped solve falls back to the loop;
    # the LM step stays finite (its system has eigenvalues >= lambda), so the damped solve
    # never falls back for non-finite values. Both equal the loop.
    generator = torch.Generator().manual_seed(0)
    xs = 0.1 * torch.randn(128, 2, 2, generator=generator)
    s0 = torch.randn(2, 2, generator=generator)
    shared = (torch.tensor(3.0),)
    expected = sequential_loop(expanding_step, s0, xs, shared)
    plain, plain_stats = solve_chain(expanding_step, s0, xs, shared, jacobian="diag", return_stats=True)
    damped, damped_stats = solve_chain(
        expanding_step, s0, xs, shared, jacobian="diag", damping=1.0, max_iters=128, return_stats=True
    )
    assert "non-finite" in plain_stats.fallback
    assert damped_stats.converged
    torch.testing.assert_close(plain, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(damped, expected, rtol=0, atol=1e-5)


# --- zero damping is the plain Newton solve -----------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_zero_damping_is_the_undamped_solve(kind, monkeypatch):
    s0, xs, shared = rnn_chain(40, width=4, gain=1.0)
    default, default_stats = solve_chain(rnn_step, s0, xs, shared, jacobian=kind, return_stats=True)

    def forbidden(*args, **kwargs):
        raise AssertionError("damping=0 must not solve the tridiagonal system")

    monkeypatch.setattr(newton, "levenberg_marquardt_step", forbidden)
    zero, zero_stats = solve_chain(rnn_step, s0, xs, shared, jacobian=kind, damping=0.0, return_stats=True)
    assert torch.equal(zero, default)
    assert zero_stats.iterations == default_stats.iterations


@pytest.mark.parametrize("damping", [float("inf"), -1.0, float("nan")])
def test_damping_must_be_finite_and_non_negative(damping):
    s0, xs, shared = rnn_chain(4, width=2)
    with pytest.raises(ValueError, match="damping must be a float >= 0"):
        solve_chain(rnn_step, s0, xs, shared, damping=damping)
