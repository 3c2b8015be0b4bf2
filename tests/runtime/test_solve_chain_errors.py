"""Bad input to ``solve_chain`` raises ``ValueError`` naming the argument at fault."""

from __future__ import annotations

import pytest
import torch

from seqpar.runtime import solve_chain

from tests.conftest import rnn_chain, rnn_step


@pytest.fixture
def chain():
    return rnn_chain(6, width=3, dtype=torch.float32)


def test_per_step_inputs_of_different_lengths(chain):
    s0, xs, shared = chain
    with pytest.raises(ValueError, match=r"xs .*same length.*\[5, 6\]"):
        solve_chain(lambda s, x, *w: rnn_step(s, x[0], *w), s0, (xs, xs[:5]), shared)


def test_non_tensor_per_step_input(chain):
    s0, xs, shared = chain
    with pytest.raises(ValueError, match=r"xs\[1\] must be a tensor, got float"):
        solve_chain(rnn_step, s0, (xs, 0.5), shared)


def test_zero_dim_per_step_input(chain):
    s0, _, shared = chain
    with pytest.raises(ValueError, match=r"xs must be stacked on dim 0"):
        solve_chain(rnn_step, s0, torch.tensor(1.0), shared)


def test_non_tensor_initial_state():
    with pytest.raises(ValueError, match="s0 must be a tensor"):
        solve_chain(rnn_step, [0.0, 1.0], torch.zeros(3, 2))


def test_integer_initial_state(chain):
    _, xs, shared = chain
    with pytest.raises(ValueError, match="s0 must be floating point"):
        solve_chain(rnn_step, torch.zeros(2, 3, dtype=torch.int64), xs, shared)


def test_non_tensor_shared(chain):
    s0, xs, (W, U, b) = chain
    with pytest.raises(ValueError, match=r"shared\[2\] must be a tensor, got float"):
        solve_chain(rnn_step, s0, xs, (W, U, 0.5))


def test_per_step_input_dtype_differs_from_state(chain):
    s0, xs, shared = chain
    with pytest.raises(ValueError, match=r"xs has dtype torch.float64, but s0 has torch.float32"):
        solve_chain(rnn_step, s0, xs.double(), shared)


def test_shared_dtype_differs_from_state(chain):
    s0, xs, (W, U, b) = chain
    with pytest.raises(ValueError, match=r"shared\[0\] has dtype torch.float64"):
        solve_chain(rnn_step, s0, xs, (W.double(), U, b))


@pytest.mark.parametrize("where", ["xs", "shared"])
def test_complex_inputs(chain, where):
    # The chain op's adjoint returns gradients for real tensors only: a complex input's gradient was lost.
    s0, xs, (W, U, b) = chain
    complex_W = W.to(torch.complex64).requires_grad_()

    def step(s, x, w, u, bias):
        return torch.tanh((s.to(w.dtype) @ w).real + x @ u + bias)

    with pytest.raises(ValueError, match=rf"{where}.* is torch.complex64: solve_chain differentiates real tensors"):
        if where == "xs":
            solve_chain(lambda s, x, *w: rnn_step(s, x.real, *w), s0, xs.to(torch.complex64), (W, U, b))
        else:
            solve_chain(step, s0, xs, (complex_W, U, b))


def test_tuple_state_dtypes_differ(chain):
    s0, xs, shared = chain
    with pytest.raises(ValueError, match=r"s0 has dtype torch.float64"):
        solve_chain(lambda s, x, *w: s, (s0, s0.double()), xs, shared)


def test_per_step_input_on_another_device(chain):
    s0, xs, shared = chain
    with pytest.raises(ValueError, match=r"xs is on meta, but s0 is on cpu"):
        solve_chain(rnn_step, s0, xs.to("meta"), shared)


def test_shared_on_another_device(chain):
    s0, xs, (W, U, b) = chain
    with pytest.raises(ValueError, match=r"shared\[1\] is on meta"):
        solve_chain(rnn_step, s0, xs, (W, U.to("meta"), b))


def test_step_that_changes_the_state_shape(chain):
    s0, xs, shared = chain
    with pytest.raises(ValueError, match=r"step changes the state from \(2, 3\) .* to \(2, 6\)"):
        solve_chain(lambda s, x, *w: torch.cat([s, x], -1), s0, xs, shared)


def test_step_that_changes_the_state_dtype(chain):
    s0, xs, shared = chain
    with pytest.raises(ValueError, match=r"step changes the state"):
        solve_chain(lambda s, x, *w: rnn_step(s, x, *w).double(), s0, xs, shared)


def test_step_that_changes_the_state_structure(chain):
    s0, xs, shared = chain
    with pytest.raises(ValueError, match=r"step must return a state structured like s0"):
        solve_chain(lambda s, x, *w: (s, s), s0, xs, shared)


def test_step_that_raises_is_reported(chain):
    s0, xs, shared = chain
    with pytest.raises(ValueError, match=r"step failed on \(s0, xs\[0\]\): RuntimeError"):
        solve_chain(lambda s, x, *w: s @ torch.zeros(5, 5), s0, xs, shared)


def test_step_that_is_not_callable(chain):
    s0, xs, shared = chain
    with pytest.raises(ValueError, match=r"step must be callable"):
        solve_chain("rnn", s0, xs, shared)


@pytest.mark.parametrize("jacobian", ["full", "identity"])
def test_step_closing_over_a_multi_element_tensor(chain, jacobian):
    s0, xs, (W, U, b) = chain
    with pytest.raises(ValueError, match=r"closed-over tensors.*pass them through xs .* or shared"):
        solve_chain(lambda s, x: rnn_step(s, x, W, U, b), s0, xs, jacobian=jacobian)


def test_step_closing_over_a_tensor_it_only_adds(chain):
    # make_fx freezes such a tensor into the trace as a constant rather than failing.
    s0, xs, _ = chain
    bias = torch.ones(3)
    with pytest.raises(ValueError, match=r"closed-over tensors"):
        solve_chain(lambda s, x: torch.tanh(s + x + bias), s0, xs)


def test_batch_shapes_of_a_tuple_state_differ(chain):
    s0, xs, shared = chain
    with pytest.raises(ValueError, match=r"s0 tensors must share the batch shape"):
        solve_chain(lambda s, x, *w: s, (s0, torch.zeros(3, 3)), xs, shared)


def test_batch_ndim_too_large(chain):
    s0, xs, shared = chain
    with pytest.raises(ValueError, match=r"batch_ndim=3 does not fit"):
        solve_chain(rnn_step, s0, xs, shared, batch_ndim=3)


def test_missing_length_without_per_step_inputs(chain):
    s0, _, _ = chain
    with pytest.raises(ValueError, match=r"length must be given"):
        solve_chain(lambda s, x: s, s0)


def test_length_disagrees_with_per_step_inputs(chain):
    s0, xs, shared = chain
    with pytest.raises(ValueError, match=r"length=4 differs from the length of xs \(6\)"):
        solve_chain(rnn_step, s0, xs, shared, length=4)


@pytest.mark.parametrize("length", [0, -1, 2.0, True])
def test_length_must_be_a_positive_int(chain, length):
    s0, _, _ = chain
    with pytest.raises(ValueError, match=r"length must be a positive int"):
        solve_chain(lambda s, x: s, s0, length=length)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("jacobian", "dense", "jacobian must be one of"),
        ("adjoint", "reverse", "adjoint must be one of"),
        ("max_iters", 0, "max_iters must be a positive int"),
        ("max_iters", 2.5, "max_iters must be a positive int"),
        ("damping", -0.1, "damping must be a float >= 0"),
        ("damping", float("nan"), "damping must be a float >= 0"),
        ("tol", -1e-3, "tol must be finite, non-negative"),
        ("tol", (0.0, 0.0), "tol must be finite, non-negative and not both zero"),
        ("tol", float("inf"), "tol must be finite"),
        ("tol", "tight", "tol must be a float or an"),
        ("tol", (1e-3, 1e-3, 1e-3), "tol must be a float or an"),
    ],
)
def test_invalid_options(chain, option, value, message):
    s0, xs, shared = chain
    with pytest.raises(ValueError, match=message):
        solve_chain(rnn_step, s0, xs, shared, **{option: value})


@pytest.mark.parametrize("forward", ["parallel", "sequential"])
def test_a_step_that_draws_random_numbers(chain, forward):
    """Dropout in a step: every evaluation of a parallel solve would draw anew, so it is refused by name."""
    s0, xs, shared = chain
    dropout = torch.nn.Dropout(0.5)
    with pytest.raises(ValueError, match=r"step draws random numbers \(aten\.bernoulli\.p\).*eval mode"):
        solve_chain(lambda s, x, *w: dropout(rnn_step(s, x, *w)), s0, xs, shared, forward=forward)
