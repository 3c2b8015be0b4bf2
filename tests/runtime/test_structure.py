"""Structure found in the traced step graph, and used: diagonal Jacobians at any width, affine chains in one solve.

References are the plain sequential loop (``conftest.sequential_loop``) in the
same dtype. Tolerances (normwise relative: ``max |a - b| <= tol * max |b|``
over a result, as the solver's own stopping test measures):

* float64, 1e-12: an affine chain's one linear solve and a converged Newton
  solve of a contracting chain differ from the loop by rounding only (about
  ``eps = 1.1e-16`` per step, not amplified by contracting steps; a few hundred
  steps stay far below 1e-12); gradients (implicit differentiation at the
  solution, the adjoint recursion solved once) alike.
* float32, 1e-5: the default float32 Newton tolerance (the last update is below
  ``1e-5`` times the state's size, the error after it about its square), far
  above float32 rounding (``6e-8`` per step).
"""

from __future__ import annotations

import math

import pytest
import torch

import seqpar
from seqpar.backend import SeqparBackend
from seqpar.options import Options
from seqpar.passes.policy import decide
from seqpar.runtime import adjoint, newton, ops, solve_chain, spec
from seqpar.runtime.adjoint import adjoint_in_runs as in_runs
from seqpar.runtime.program import lower_step
from seqpar.runtime.spec import resolve_jacobian
from seqpar.runtime.structure import StepStructure, find_step_structure

from tests.conftest import chain_record, sequential_loop

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def assert_close_normwise(actual, expected, tol):
    scale = expected.abs().amax()
    assert (actual - expected).abs().amax() <= tol * scale, float((actual - expected).abs().amax() / scale)


def program_of(step):
    """The latest program built for ``step``."""
    return [program for program in ops._PROGRAMS.values() if program.step is step][-1]


# --- the steps ---------------------------------------------------------------------------------------------


def selective_scan(s, x):
    """Mamba's discretised SSM on a (B, d_inner, N) state: ``s = dA_l * s + dBu_l``."""
    dA, dBu = x
    return dA * s + dBu


def mamba_inputs(length, shape, dtype):
    delta = torch.nn.functional.softplus(torch.randn(length, *shape[:-1], 1, dtype=dtype))
    A = -torch.rand(shape[-2:], dtype=dtype) - 0.5  # (d_inner, N), negative: a contracting scan
    dA = torch.exp(delta * A)
    dBu = delta * torch.randn(length, *shape, dtype=dtype)
    return torch.randn(shape, dtype=dtype), (dA, dBu)


def gated(s, x, u):
    """A diagonal nonlinear step: an elementwise gate between the state and ``tanh(x + u * s)``."""
    g, inp = x
    z = torch.sigmoid(g)
    return z * s + (1 - z) * torch.tanh(inp + u * s)


def gated_inputs(length, shape, dtype):
    xs = (torch.randn(length, *shape, dtype=dtype), torch.randn(length, *shape, dtype=dtype))
    return torch.randn(shape, dtype=dtype), xs, (torch.randn(shape[1:], dtype=dtype),)


def dense_affine(s, x):
    """``s_l = s_{l-1} A_l^T + b_l`` with per-step matrices: affine, not diagonal."""
    A, b = x
    return s @ A.T + b


def dense_tanh(s, x, W):
    return torch.tanh(s @ W.T + x)


# --- structure, proven from the graph ----------------------------------------------------------------------


def structure_of(step, width=16, rows=3, x_shapes=((16,),)):
    """The structure of ``step(s, *xs)`` on a state ``(rows, width)``, traced on one position as the solver does."""
    s = torch.randn(rows, width)
    xs = [torch.randn(shape) for shape in x_shapes]
    return find_step_structure(lower_step(lambda s_, x_leaves, shared: step(s_, *x_leaves), s, xs, []))


@pytest.mark.parametrize(
    "name, step, diagonal, affine",
    [
        ("scaled state plus input", lambda s, x: x * s + 1.0, True, True),
        ("broadcast gate", lambda s, x: torch.sigmoid(x) * s - x, True, True),
        ("s * s", lambda s, x: s * s + x, True, False),
        ("elementwise gate with tanh", lambda s, x: torch.sigmoid(x) * s + torch.tanh(x + 0.5 * s), True, False),
        ("leaky relu by where(s > 0)", lambda s, x: torch.where(s > 0, s, 0.1 * s) + x, True, False),
        ("where on an input's sign", lambda s, x: torch.where(x > 0, s, 2 * s), True, True),
        ("flat reshapes", lambda s, x: (s.reshape(3, 4, 4).unsqueeze(0) * x.reshape(4, 4)).reshape(3, 16), True, True),
        ("state divided by an input", lambda s, x: s / (1 + x * x), True, True),
        ("input divided by the state", lambda s, x: x / s, True, False),
        ("sum over the state dim", lambda s, x: s + s.sum(-1, keepdim=True) * x, False, True),
        ("flip", lambda s, x: s.flip(-1) + x, False, True),
        ("transpose of a 2-D state view", lambda s, x: s.reshape(3, 4, 4).transpose(-1, -2).reshape(3, 16) + x, False, True),
        ("matrix product", lambda s, x: s @ torch.ones(16, 16) / 16 + x, False, True),
        ("tanh of a matrix product", lambda s, x: torch.tanh(s @ torch.ones(16, 16) / 16 + x), False, False),
        ("the state ignored", lambda s, x: x.expand(3, 16) * 2, True, True),
    ],
)
def test_structure_is_proven_from_the_traced_graph(name, step, diagonal, affine):
    structure = structure_of(step)
    assert (structure.diagonal, structure.affine) == (diagonal, affine), structure.how


def test_structure_names_the_op_that_rules_it_out():
    structure = structure_of(lambda s, x: torch.tanh(s.flip(-1)) + x)
    assert structure.label == "general"
    assert "not diagonal: aten.flip" in structure.how and "not affine: aten.tanh" in structure.how


def test_a_product_of_two_state_dependent_matrices_is_not_affine():
    structure = structure_of(lambda s, x: (s @ s.T) @ s + x)
    assert not structure.affine and not structure.diagonal


def test_resolve_jacobian_uses_the_diagonal_at_any_width():
    assert resolve_jacobian("auto", 2560, diagonal=True) == "full"
    assert resolve_jacobian("auto", 2560) == "identity"
    assert resolve_jacobian("diag", 16, diagonal=True) == "full"  # the diagonal is the whole Jacobian
    assert resolve_jacobian("diag", 16) == "diag" and resolve_jacobian("identity", 4, diagonal=True) == "identity"


# --- diagonal steps ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_ndim", [None, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mamba_selective_scan_is_one_linear_solve_equal_to_the_loop(dtype, batch_ndim):
    s0, xs = mamba_inputs(300, (2, 16, 8), dtype)
    states, stats = solve_chain(selective_scan, s0, xs, batch_ndim=batch_ndim, return_stats=True)
    assert_close_normwise(states, sequential_loop(selective_scan, s0, xs), TOL[dtype])
    assert (stats.structure, stats.jacobian, stats.iterations) == ("diagonal affine", "full", 1)
    assert stats.converged and stats.fallback is None and stats.evaluations == 300
    program = program_of(selective_scan)
    assert program.solve_kind == "diag" and program.jacobian_method == "diagonal" and program.one_linear_solve


def test_a_wide_diagonal_state_takes_diagonal_blocks_and_the_parallel_adjoint():
    # An LRU of width 2560: w > 64, where a dense step would get Picard and the sequential adjoint.
    s0, xs = mamba_inputs(64, (1, 2560), torch.float64)
    states, stats = solve_chain(selective_scan, s0, xs, return_stats=True)
    assert_close_normwise(states, sequential_loop(selective_scan, s0, xs), TOL[torch.float64])
    assert (stats.jacobian, stats.iterations, stats.structure) == ("full", 1, "diagonal affine")
    program = program_of(selective_scan)
    assert (program.solve_kind, program.adjoint, program.adjoint_kind) == ("diag", "parallel", "diag")


def test_a_long_affine_chain_is_solved_in_runs_and_equals_the_loop():
    # (1, 64, 16) float64: 8 KiB of blocks per position, runs of 128 positions on CPU, the last one partial.
    s0, xs = mamba_inputs(300, (1, 64, 16), torch.float64)
    states, stats = solve_chain(selective_scan, s0, xs, return_stats=True)
    assert newton.linear_run(program_of(selective_scan), None) < 300
    assert_close_normwise(states, sequential_loop(selective_scan, s0, xs), TOL[torch.float64])
    assert stats.iterations == 1


def test_a_window_bounds_the_runs_of_a_linear_solve():
    s0, xs = mamba_inputs(50, (2, 4), torch.float64)
    states, stats = solve_chain(selective_scan, s0, xs, window=16, return_stats=True)
    assert_close_normwise(states, sequential_loop(selective_scan, s0, xs), TOL[torch.float64])
    assert (stats.window, stats.iterations, stats.evaluations) == (16, 1, 50)


@pytest.mark.parametrize("batch_ndim", [None, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_diagonal_nonlinear_gate_is_exact_newton_equal_to_the_loop(dtype, batch_ndim):
    s0, xs, shared = gated_inputs(200, (3, 5, 8), dtype)
    states, stats = solve_chain(gated, s0, xs, shared, batch_ndim=batch_ndim, return_stats=True)
    assert_close_normwise(states, sequential_loop(gated, s0, xs, shared), TOL[dtype])
    assert (stats.structure, stats.jacobian) == ("diagonal", "full")
    assert stats.converged and stats.fallback is None and stats.iterations > 1
    assert program_of(gated).solve_kind == "diag"


@pytest.mark.parametrize("jacobian", ["full", "diag"])
def test_full_and_diag_requests_on_a_diagonal_step_are_the_exact_diagonal(jacobian):
    s0, xs, shared = gated_inputs(100, (2, 6), torch.float64)
    states, stats = solve_chain(gated, s0, xs, shared, jacobian=jacobian, return_stats=True)
    assert_close_normwise(states, sequential_loop(gated, s0, xs, shared), TOL[torch.float64])
    assert stats.jacobian == "full" and program_of(gated).solve_kind == "diag"


# --- dense steps -------------------------------------------------------------------------------------------


def dense_affine_inputs(length, batch, width, dtype=torch.float64):
    A = 0.9 * torch.linalg.qr(torch.randn(length, width, width, dtype=dtype))[0]  # norm 0.9: contracting
    return torch.randn(batch, width, dtype=dtype), (A, torch.randn(length, batch, width, dtype=dtype))


def test_dense_affine_step_is_one_linear_solve_equal_to_the_loop():
    s0, xs = dense_affine_inputs(200, 3, 6)
    states, stats = solve_chain(dense_affine, s0, xs, return_stats=True)
    assert_close_normwise(states, sequential_loop(dense_affine, s0, xs), TOL[torch.float64])
    assert (stats.structure, stats.jacobian, stats.iterations) == ("affine", "full", 1)
    assert program_of(dense_affine).solve_kind == "full"


def test_dense_nonlinear_step_stays_newton():
    W = 0.5 * torch.randn(6, 6, dtype=torch.float64) / 6**0.5
    s0, xs = torch.randn(3, 6, dtype=torch.float64), torch.randn(200, 3, 6, dtype=torch.float64)
    states, stats = solve_chain(dense_tanh, s0, xs, (W,), return_stats=True)
    assert_close_normwise(states, sequential_loop(dense_tanh, s0, xs, (W,)), 1e-10)  # Newton's float64 tolerance
    assert stats.structure == "general" and stats.iterations > 1 and stats.converged


# --- gradients ---------------------------------------------------------------------------------------------


def gradients(solve, inputs, weights):
    """Gradients of ``sum(weights * states)`` with respect to ``inputs``."""
    inputs = [tensor.detach().requires_grad_() for tensor in inputs]
    return torch.autograd.grad((weights * solve(*inputs)).sum(), inputs)


@pytest.mark.parametrize("case", ["selective scan", "gate", "dense affine"])
def test_gradients_equal_the_loops(case):
    if case == "selective scan":
        step, (s0, (dA, dBu)), shared = selective_scan, mamba_inputs(150, (2, 16, 8), torch.float64), ()
        inputs = [s0, dA, dBu]
    elif case == "gate":
        s0, (g, x), shared = gated_inputs(150, (2, 5, 8), torch.float64)
        step, inputs = gated, [s0, g, x, *shared]
    else:
        step, (s0, (A, b)), shared = dense_affine, dense_affine_inputs(150, 3, 6), ()
        inputs = [s0, A, b]
    weights = torch.randn(150, *s0.shape, dtype=torch.float64)

    def by(solver):
        return lambda s0_, x0, x1, *shared_: solver(step, s0_, (x0, x1), tuple(shared_))

    actual = gradients(by(solve_chain), inputs, weights)
    expected = gradients(by(sequential_loop), inputs, weights)
    for got, want in zip(actual, expected, strict=True):
        assert_close_normwise(got, want, 1e-11)  # the adjoint solve's rounding over 150 steps


def recorded_runs(monkeypatch) -> list:
    """The run length of every adjoint taken in runs from now on (``adjoint.adjoint_in_runs`` wrapped)."""
    runs = []

    def recording(*args):
        runs.append(args[-1])
        return in_runs(*args)

    monkeypatch.setattr(adjoint, "adjoint_in_runs", recording)
    return runs


@pytest.mark.parametrize("forward", ["parallel", "sequential"])
@pytest.mark.parametrize("length", [96, 150])
def test_a_diagonal_adjoint_in_runs_equals_the_loops_gradients(monkeypatch, length, forward):
    # One byte of budget: runs of CPU_RUN_MIN = 32 positions, the last run first; at 150 steps the chain's
    # first run is 22 positions, evaluated over 32 with a zero cotangent after it (96: three whole runs).
    monkeypatch.setattr(spec, "CPU_RUN_BYTES", 1)
    runs = recorded_runs(monkeypatch)
    s0, (g, x), (u,) = gated_inputs(length, (2, 5, 8), torch.float64)
    weights = torch.randn(length, *s0.shape, dtype=torch.float64)

    def solve(s0_, g_, x_, u_):
        return solve_chain(gated, s0_, (g_, x_), (u_,), forward=forward, adjoint="parallel")

    actual = gradients(solve, [s0, g, x, u], weights)
    expected = gradients(lambda *inputs: sequential_loop(gated, inputs[0], inputs[1:3], inputs[3:]),
                         [s0, g, x, u], weights)
    assert runs == [spec.CPU_RUN_MIN]
    for got, want in zip(actual, expected, strict=True):
        assert_close_normwise(got, want, 1e-11)  # as the whole chain's adjoint: rounding over the steps


# --- non-finite values and expanding chains ----------------------------------------------------------------


def test_non_finite_values_fall_back_to_the_loop_with_a_reason():
    s0, (dA, dBu) = mamba_inputs(100, (2, 4), torch.float64)
    dBu[40, 1, 2] = float("nan")
    states, stats = solve_chain(selective_scan, s0, (dA, dBu), return_stats=True)
    torch.testing.assert_close(states, sequential_loop(selective_scan, s0, (dA, dBu)), rtol=0, atol=0, equal_nan=True)
    assert "non-finite" in stats.fallback and stats.sequential_steps == 100 and not stats.converged


def test_an_expanding_affine_chain_gives_the_loops_values_while_finite():
    # |a| in [1.05, 1.1]: the states grow by about 1e8 over 200 steps, still finite in float64.
    s0 = torch.randn(2, 4, dtype=torch.float64)
    xs = (1.05 + 0.05 * torch.rand(200, 2, 4, dtype=torch.float64), torch.randn(200, 2, 4, dtype=torch.float64))
    states, stats = solve_chain(selective_scan, s0, xs, return_stats=True)
    expected = sequential_loop(selective_scan, s0, xs)
    for position in (0, 50, 199):  # each state against its own scale: early ones are 1e8 times smaller
        assert_close_normwise(states[position], expected[position], TOL[torch.float64])
    assert stats.iterations == 1 and stats.fallback is None


def test_an_overflowing_affine_chain_gives_the_loops_infinities():
    s0 = torch.ones(2, 4)
    xs = (torch.full((200, 2, 4), 2.0), torch.ones(200, 2, 4))  # 2^200 overflows float32 at step ~128
    states, stats = solve_chain(selective_scan, s0, xs, return_stats=True)
    expected = sequential_loop(selective_scan, s0, xs)
    assert not math.isfinite(float(expected[-1].max()))
    torch.testing.assert_close(states, expected, rtol=0, atol=0, equal_nan=True)
    assert "non-finite" in stats.fallback


# --- the backend -------------------------------------------------------------------------------------------


def make_chain(length, state_shape):
    """A differentiated recurrent Chain record with only the fields the policy reads filled in."""
    return chain_record(length, state_shape, kind="recurrent")


DIAGONAL_AFFINE = StepStructure(diagonal=True, affine=True, how="test")


def test_policy_does_not_reject_a_wide_diagonal_step():
    wide = make_chain(256, (1, 2560))
    dense = decide(wide, Options(policy="parallel"), "cpu", None)
    assert (dense.jacobian, dense.adjoint) == ("identity", "sequential")
    diagonal = decide(wide, Options(policy="parallel"), "cpu", None, DIAGONAL_AFFINE)
    assert (diagonal.method, diagonal.jacobian, diagonal.adjoint) == ("parallel", "full", "parallel")
    assert "diagonal affine step" in diagonal.reason
    on_gpu = decide(wide, Options(), "cuda", -0.1, DIAGONAL_AFFINE)
    assert (on_gpu.method, on_gpu.adjoint) == ("parallel", "parallel")


def test_cpu_cost_model_takes_a_diagonal_affine_chain_in_parallel_where_a_dense_one_loses():
    # Measured (benchmarks/RESULTS.md, "Structure"): one linear solve wins from L = 64 up to N*w = 1024.
    chain = make_chain(256, (64, 16))
    assert decide(chain, Options(), "cpu", -0.5).method == "sequential"
    decision = decide(chain, Options(), "cpu", -0.5, DIAGONAL_AFFINE)
    assert (decision.method, decision.adjoint, decision.form) == ("parallel", "parallel", "solver")
    assert decide(make_chain(256, (1, 12288)), Options(), "cpu", -0.5, DIAGONAL_AFFINE).method == "sequential"


def test_cpu_cost_model_takes_the_diagonal_adjoint_in_runs_up_to_4096_values_a_step():
    # Measured (benchmarks/RESULTS.md, "The diagonal adjoint in runs"): 1.4-3.7x the sequential VJPs up to
    # N*w = 4096, a tie at 8192, a loss at 65536 (xLSTM's memory).
    rwkv_batch_4 = decide(make_chain(1024, (4, 768)), Options(), "cpu", -0.5, DIAGONAL_AFFINE)
    assert (rwkv_batch_4.method, rwkv_batch_4.adjoint) == ("sequential", "parallel")
    assert decide(make_chain(1024, (4, 2048)), Options(), "cpu", -0.5, DIAGONAL_AFFINE).adjoint == "sequential"


class DiagonalGateLoop(torch.nn.Module):
    """A learned diagonal gate over time (a minimal RG-LRU): ``s = sigmoid(g_t) s + x_t * u``."""

    def __init__(self, width):
        super().__init__()
        self.u = torch.nn.Parameter(torch.randn(width, dtype=torch.float64))

    def forward(self, g, x, s):
        states = []
        for g_t, x_t in zip(g.unbind(0), x.unbind(0)):
            s = torch.sigmoid(g_t) * s + x_t * self.u
            states.append(s)
        return torch.stack(states)


def test_backend_gradients_through_a_diagonal_adjoint_in_runs_equal_eagers():
    # (2, 1024) float64: 16 KiB of blocks a step, runs of 64 positions over 150 steps (the first run partial);
    # the forward kept sequential (N*w = 2048 > 1024), the adjoint parallel (<= 4096).
    torch.manual_seed(0)
    model = DiagonalGateLoop(1024)
    inputs = [torch.randn(150, 2, 1024, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    s0 = torch.randn(2, 1024, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(150, 2, 1024, dtype=torch.float64)
    with pytest.MonkeyPatch.context() as patch:
        runs = recorded_runs(patch)
        compiled = torch.compile(model, backend=SeqparBackend({"inner": "eager"}))
        leaves = [*inputs, s0, model.u]
        actual = torch.autograd.grad((weights * compiled(*inputs, s0)).sum(), leaves)
    expected = torch.autograd.grad((weights * model(*inputs, s0)).sum(), leaves)
    assert runs and runs[0] == 64
    for got, want in zip(actual, expected, strict=True):
        assert_close_normwise(got, want, 1e-12)  # rounding of a contracting linear recursion over 150 steps


class SelectiveScanLoop(torch.nn.Module):
    def forward(self, dA, dBu, s):
        for index in range(dA.shape[0]):
            s = dA[index] * s + dBu[index]
        return s


def test_backend_solves_a_wide_diagonal_chain_in_parallel_and_says_why():
    s0, (dA, dBu) = mamba_inputs(64, (1, 2560), torch.float32)
    # s0 requires grad: autograd records the chain, which then has an adjoint to solve
    report = seqpar.explain(SelectiveScanLoop(), dA, dBu, s0.requires_grad_(), options={"policy": "parallel"})
    (chain,) = report.chains
    assert (chain.decision, chain.jacobian, chain.adjoint) == ("parallel", "full", "parallel")
    assert "diagonal affine step (proven from the traced step graph)" in chain.reason
    assert chain.stats["structure"] == "diagonal affine" and chain.stats["iterations"] == 1
