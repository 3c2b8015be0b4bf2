"""Max-plus chains, ``s_l = max(s_{l-1} + a_l, b_l)``: proven from the traced step, solved in one pass.

The running maximum of RWKV and xLSTM, ``m_t = max(m_{t-1} + w, k_t)``, is
computed by the pass with the loop's own arithmetic (``a_l = 0 + w = w``,
``b_l = max(-inf + w, k_l) = k_l``): bitwise equal to the loop, in float32 and
float64. A step that regroups additions (``(s + a) - c``) equals the loop up
to rounding; the recursive doubling used off the compiled CPU kernel sums the
slopes in another order (float64: 1e-12 of the states' scale).
"""

from __future__ import annotations

import pytest
import torch

from seqpar.runtime import solve_chain
from seqpar.runtime.kernels import cpu_scan
from seqpar.runtime.maxplus import solve_maxplus_recurrence
from seqpar.runtime.program import lower_step
from seqpar.runtime.structure import find_step_structure
from tests.conftest import sequential_loop


def running_max(m, k, w):
    """RWKV's stabiliser: ``m_t = max(m_{t-1} + w, k_t)`` with a shared decay ``w < 0``."""
    return torch.maximum(m + w, k)


def two_maxima(s, x, c):
    """``max(max(s + a_l, b_l) - c, d_l)`` and a clamp: regrouped additions, nested maxima."""
    a, b, d = x
    return torch.maximum(torch.maximum(s + a, b) - c, d).clamp_min(-5.0)


def inputs(length=300, shape=(2, 24), dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    k = 3 * torch.randn(length, *shape, generator=generator, dtype=dtype)
    w = -torch.rand(shape[-1], generator=generator, dtype=dtype)
    return torch.full(shape, -1e38 if dtype == torch.float32 else -1e300, dtype=dtype), k, w


def structure_of(step, x_shapes, shared_shapes=()):
    s = torch.randn(3, 16)
    xs, shared = [torch.randn(shape) for shape in x_shapes], [torch.randn(shape) for shape in shared_shapes]
    return find_step_structure(lower_step(lambda s_, x_, sh_: step(s_, *x_, *sh_), s, xs, shared))


@pytest.mark.parametrize(
    "step, maxplus",
    [
        (lambda s, k, w: torch.maximum(s + w, k), True),
        (lambda s, k, w: torch.maximum(k, w + s), True),
        (lambda s, k, w: torch.maximum(s - w, k).clamp_min(0.0), True),
        (lambda s, k, w: torch.maximum(s + w, s - 1.0), True),  # s + max(w, -1): b = -inf
        (lambda s, k, w: torch.maximum(2 * s, k), False),
        (lambda s, k, w: torch.maximum(k - s, k), False),
        (lambda s, k, w: torch.maximum(s + s, k), False),
        (lambda s, k, w: torch.maximum(torch.tanh(s), k), False),
        (lambda s, k, w: torch.maximum(s.flip(-1) + w, k), False),  # not diagonal
    ],
)
def test_max_plus_structure_is_proven_from_the_traced_step(step, maxplus):
    structure = structure_of(step, [(16,)], [(16,)])
    assert structure.maxplus == maxplus, structure.how
    if maxplus:
        assert structure.label == "diagonal max-plus" and "max-plus: every" in structure.how


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_running_maximum_is_one_pass_bitwise_equal_to_the_loop(dtype):
    m0, k, w = inputs(dtype=dtype)
    states, stats = solve_chain(running_max, m0, k, (w,), return_stats=True)
    assert torch.equal(states, sequential_loop(running_max, m0, k, (w,)))
    assert (stats.structure, stats.iterations, stats.fallback, stats.jacobian_evaluations) == (
        "diagonal max-plus", 1, None, 0)


def test_nested_maxima_with_regrouped_additions_equal_the_loop():
    generator = torch.Generator().manual_seed(1)
    shape, length = (2, 16), 400
    xs = tuple(torch.randn(length, *shape, generator=generator, dtype=torch.float64) for _ in range(3))
    c, s0 = torch.rand(16, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    states, stats = solve_chain(two_maxima, s0, xs, (c,), return_stats=True)
    expected = sequential_loop(two_maxima, s0, xs, (c,))
    torch.testing.assert_close(states, expected, rtol=0, atol=1e-12 * expected.abs().amax())
    assert stats.structure == "diagonal max-plus" and stats.iterations == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_recursive_doubling_equals_the_compiled_pass(dtype, monkeypatch):
    generator = torch.Generator().manual_seed(2)
    a = -torch.rand(257, 3, 5, generator=generator, dtype=dtype)
    y = 4 * torch.randn(257, 3, 5, generator=generator, dtype=dtype)
    y[5, 1, 2] = float("-inf")  # a b of -inf: the carried value wins
    expected = y.clone()
    for position in range(1, len(y)):
        expected[position] = torch.maximum(expected[position - 1] + a[position], expected[position])
    assert cpu_scan.available(dtype)
    torch.testing.assert_close(solve_maxplus_recurrence(a, y.clone()), expected, rtol=0, atol=0)
    monkeypatch.setenv("SEQPAR_CPU_KERNEL", "0")  # the torch-op doubling, as off CPU
    rounding = 16 * torch.finfo(dtype).eps * expected.abs().amax()  # slopes summed in a tree of 9 levels
    torch.testing.assert_close(solve_maxplus_recurrence(a, y.clone()), expected, rtol=0, atol=float(rounding))


def test_non_finite_states_fall_back_to_the_loop_with_a_reason():
    m0, k, w = inputs(length=100)
    k[30, 1, 3] = float("nan")
    states, stats = solve_chain(running_max, m0, k, (w,), return_stats=True)
    torch.testing.assert_close(states, sequential_loop(running_max, m0, k, (w,)), rtol=0, atol=0, equal_nan=True)
    assert "non-finite values in the max-plus pass" in stats.fallback and stats.sequential_steps == 100


def test_gradients_equal_the_loops():
    m0, k, w = inputs(length=200)
    m0 = torch.randn_like(m0)
    weights = torch.randn(200, *m0.shape, dtype=torch.float64)

    def gradients(solve):
        leaves = [tensor.detach().requires_grad_() for tensor in (m0, k, w)]
        return torch.autograd.grad((weights * solve(running_max, leaves[0], leaves[1], (leaves[2],))).sum(), leaves)

    for got, want in zip(gradients(solve_chain), gradients(sequential_loop), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * want.abs().amax())
