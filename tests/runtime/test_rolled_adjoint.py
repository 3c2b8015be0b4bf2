"""The sequential adjoint's generated loop (``seqpar.runtime.rolled_adjoint``).

The loop runs the calls of the step's lowered VJP graph in the order the per-step calls of that graph run them,
so its gradients equal the per-step calls' bit for bit (asserted with zero tolerance), and autograd's through
the plain loop in float64 to ``GRAD_TOL`` (the forward is the loop itself; only the order of floating-point
sums may differ from autograd's).
"""

from __future__ import annotations

import pytest
import torch

from seqpar.runtime import adjoint, rolled_adjoint, solve_chain
from seqpar.runtime.chain import prepare_chain

from tests.conftest import lstm_chain, lstm_step, rnn_chain, rnn_step, sequential_loop

GRAD_TOL = 1e-12


def affine_step(s, x, u):
    return torch.sigmoid(x[0]) * s + x[1] * u


def additive_step(s, x):
    """``J = I`` and ``dx = lam``: the loop's gradients are its carried cotangent itself."""
    return s + x


def indexed_step(s, x, W, table):
    """Per-step integer inputs (a row of ``table`` per batch element, no gradient) next to a float one."""
    return torch.tanh(s @ W.T + table[x[0]] + x[1])


def cases():
    g = torch.Generator().manual_seed(3)
    f64 = dict(dtype=torch.float64)
    yield "affine", affine_step, torch.randn(4, 6, generator=g, **f64), (
        torch.randn(30, 4, 6, generator=g, **f64), torch.randn(30, 4, 6, generator=g, **f64)), (
        torch.randn(6, generator=g, **f64),)
    yield "additive", additive_step, torch.randn(3, 5, generator=g, **f64), (
        torch.randn(25, 3, 5, generator=g, **f64)), ()
    s0, xs, shared = rnn_chain(40, width=7)
    yield "elman", rnn_step, s0, xs, shared
    yield "indexed", indexed_step, torch.randn(2, 5, generator=g, **f64), (
        torch.randint(0, 9, (20, 2), generator=g), torch.randn(20, 2, 5, generator=g, **f64)), (
        0.4 * torch.randn(5, 5, generator=g, **f64), torch.randn(9, 5, generator=g, **f64))
    s0, xs, shared = lstm_chain(25, hidden=3)
    yield "lstm (tuple state)", lstm_step, s0, xs, shared


def gradients(step, s0, xs, shared, solve=True):
    """The gradients of ``<C, states>`` w.r.t. every floating-point input (``solve``: through ``solve_chain``'s
    sequential forward and adjoint; else autograd through the plain loop)."""
    leaves = [t for t in torch.utils._pytree.tree_leaves((s0, xs, shared)) if t.is_floating_point()]
    copies = {id(t): t.detach().clone().requires_grad_() for t in leaves}
    s0, xs, shared = torch.utils._pytree.tree_map(lambda t: copies.get(id(t), t), (s0, xs, shared))
    if solve:
        states = solve_chain(step, s0, xs, shared, forward="sequential", adjoint="sequential")
    else:
        states = sequential_loop(step, s0, xs, shared)
    flat = torch.utils._pytree.tree_leaves(states)
    weights = [torch.randn(t.shape, generator=torch.Generator().manual_seed(7), dtype=t.dtype) for t in flat]
    loss = sum((w * t).sum() for w, t in zip(weights, flat))
    return torch.autograd.grad(loss, list(copies.values()))


def program_of(step, s0, xs, shared):
    """``(program, xs leaves, shared)`` of ``solve_chain``'s sequential forward and adjoint."""
    program, _, leaves, shared = prepare_chain(
        step, s0, xs, shared, jacobian="auto", tol=None, max_iters=None, damping=None, window=None, length=None,
        batch_ndim=None, adjoint="sequential", forward="sequential")
    return program, leaves, shared


CASES = list(cases())


@pytest.mark.parametrize("name, step, s0, xs, shared", CASES, ids=[case[0] for case in CASES])
def test_the_generated_adjoint_equals_autograd_and_the_per_step_calls_bit_for_bit(
    monkeypatch, name, step, s0, xs, shared
):
    program, leaves, shared_leaves = program_of(step, s0, xs, shared)
    generated = gradients(step, s0, xs, shared)
    loop = rolled_adjoint.adjoint_loop_for(program, len(leaves), len(shared_leaves))
    assert loop.run is not None, loop.reason
    assert "for l in range(len(prev) - 1, -1, -1):" in loop.source
    for got, want in zip(generated, gradients(step, s0, xs, shared, solve=False), strict=True):
        torch.testing.assert_close(got, want, rtol=GRAD_TOL, atol=GRAD_TOL)

    calls = []
    monkeypatch.setattr(adjoint, "adjoint_loop_for",
                        lambda *args: calls.append(args) or rolled_adjoint.AdjointLoop(None))
    by_calls = gradients(step, s0, xs, shared)
    assert calls, "the per-step path was not taken"
    for got, want in zip(generated, by_calls, strict=True):
        assert torch.equal(got, want)


def test_a_vjp_graph_the_generator_does_not_cover_is_called_per_step(monkeypatch):
    """Where the VJP graph cannot be written out, the reason is kept and the gradients are the same."""
    s0, xs, shared = rnn_chain(12, width=3)
    expected = gradients(rnn_step, s0, xs, shared, solve=False)

    def refuse(*args):
        raise ValueError("not written out here")

    monkeypatch.setattr(rolled_adjoint, "generate_adjoint_loop", refuse)
    monkeypatch.setattr(rolled_adjoint, "_LOOPS", type(rolled_adjoint._LOOPS)())
    got = gradients(rnn_step, s0, xs, shared)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=GRAD_TOL, atol=GRAD_TOL)
    (loop,) = rolled_adjoint._LOOPS.values()
    assert loop.run is None and "not written out here" in loop.reason


def test_a_frozen_shared_tensor_gets_zeros_and_the_others_their_sums():
    """``program.frozen`` (the backend's buffers) removes a shared gradient from the VJP graph: the loop adds
    into the others' sums only."""
    s0, xs, (W, U, b) = rnn_chain(15, width=4)
    program, leaves, shared = program_of(rnn_step, s0, xs, (W, U, b))
    packed = s0
    frozen = type(program)(program.step, program.layout, program.length, program.xs_spec, leaves, shared,
                           jacobian="identity", adjoint="sequential", frozen=frozenset({("shared", 1)}),
                           lowered=program.lowered, method="sequential")
    states = sequential_loop(rnn_step, s0, xs, (W, U, b)).reshape(15, *packed.shape)
    grads = torch.randn(states.shape, dtype=states.dtype, generator=torch.Generator().manual_seed(1))
    prev = (packed, *states[:-1].unbind(0))
    loop = rolled_adjoint.adjoint_loop_for(frozen, len(leaves), len(shared))
    assert loop.shared_outputs == (0, 2)
    _, _, grad_shared = adjoint.sequential_adjoint(frozen, prev, leaves, shared, grads)
    _, _, unfrozen = adjoint.sequential_adjoint(program, prev, leaves, shared, grads)
    assert torch.equal(grad_shared[1], torch.zeros_like(U))
    assert torch.equal(grad_shared[0], unfrozen[0]) and torch.equal(grad_shared[2], unfrozen[2])
