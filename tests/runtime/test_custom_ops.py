"""The chain solve as custom ops: traceable by torch.compile and correct under it."""

from __future__ import annotations

import pytest
import torch

from seqpar.runtime import step_cache
from seqpar.runtime import solve_chain

from tests.conftest import rnn_chain, rnn_step


def solve_and_reduce(s0, xs, W, U, b):
    return solve_chain(rnn_step, s0, xs, (W, U, b)).tanh().sum(0)


def recording_backend(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)

    return backend


def inputs(dtype=torch.float32):
    s0, xs, shared = rnn_chain(24, width=4, dtype=dtype)
    return [t.clone().requires_grad_() for t in (s0, xs, *shared)]


def test_compiled_function_puts_the_chain_op_in_the_graph():
    torch._dynamo.reset()
    graphs = []
    torch.compile(solve_and_reduce, backend=recording_backend(graphs))(*inputs())
    assert any("seqpar.chain_solve" in gm.code for gm in graphs)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_forward_and_gradients_equal_eager(backend):
    torch._dynamo.reset()
    eager_inputs, compiled_inputs = inputs(), inputs()
    expected = solve_and_reduce(*eager_inputs)
    actual = torch.compile(solve_and_reduce, backend=backend)(*compiled_inputs)
    # The op runs the same solve eagerly inside the compiled graph; inductor may
    # fuse the surrounding tanh/sum differently: float32 rounding only.
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    weights = torch.randn(expected.shape)
    expected_grads = torch.autograd.grad((weights * expected).sum(), eager_inputs)
    actual_grads = torch.autograd.grad((weights * actual).sum(), compiled_inputs)
    for got, want in zip(actual_grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def built_program(step, s0, xs, shared):
    solve_chain(step, s0, xs, shared)
    (program,) = [program for program, (cached_step, _) in step_cache._cache.values() if cached_step is step]
    return program


def opcheck_step(s, x, W, U, b):
    return torch.tanh(s @ W.T + x @ U.T + b)


def test_chain_solve_passes_opcheck():
    s0, xs, shared = rnn_chain(9, width=3)
    program = built_program(opcheck_step, s0, xs, shared)
    args = (program.id, s0.clone().requires_grad_(), [xs.clone().requires_grad_()], [t.clone().requires_grad_() for t in shared], [])
    torch.library.opcheck(torch.ops.seqpar.chain_solve.default, args)


def test_fake_chain_solve_gives_the_stacked_shape():
    s0, xs, shared = rnn_chain(9, width=3)
    program = built_program(opcheck_step, s0, xs, shared)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (s0, xs, *shared)]
        out = torch.ops.seqpar.chain_solve(program.id, fake[0], [fake[1]], fake[2:], [])
    assert out.shape == (9, 2, 3) and out.dtype == s0.dtype


def test_chain_adjoint_returns_one_gradient_per_input():
    s0, xs, shared = rnn_chain(9, width=3)
    program = built_program(opcheck_step, s0, xs, shared)
    states = torch.ops.seqpar.chain_solve(program.id, s0, [xs], list(shared), [])
    grads = torch.ops.seqpar.chain_adjoint(program.id, s0, [xs], list(shared), [], states, torch.ones_like(states))
    assert [g.shape for g in grads] == [t.shape for t in (s0, xs, *shared)]
