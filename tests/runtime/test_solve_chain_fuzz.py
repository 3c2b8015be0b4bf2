"""Fuzzed chains: whatever the chain, ``solve_chain`` returns the sequential loop's states.

Chains ``s_l = act(W s_{l-1} + U x_l)`` with depth 1..512, width 1..32, gain 0.1..3,
five activations and three dtypes; ``depth * width <= 1024`` keeps the run short.

What "equals the loop" can mean depends on the chain, so each example checks:

* **Backward error.** Every returned state satisfies its step up to the stopping
  tolerance: ``|s_l - f(s_{l-1})| <= K (atol + rtol max|s|) + rounding`` with
  ``K = 1 + 2 lip``, ``lip = ||W||_inf max|act'|``: Newton leaves O(tol^2); a diag or
  identity update ``ds <= tol`` leaves a residual ``(J - A) ds``, ``|J - A| <= 2 lip``
  (``lip + 1`` for identity, ``lip + |diag J|`` for diag); the fallback leaves
  only the loop's own rounding.
* **Forward error vs the loop in the same dtype.** A per-step error ``r`` grows
  by at most ``lip`` per step, so ``|s_l - loop_l| <= sum_{j<l} lip^j (r + 2 eps (1 + max|s|))``
  (the second term: both sides' rounding). For contracting chains this is a few
  tolerances; for expansive or chaotic ones it is vacuous, as it must be:
  no method reproduces a chaotic loop beyond its own rounding except the loop.
* **Fallback from the start is the loop bit for bit**, overflow included
  (gain 2 and up with relu/silu/gelu overflows float32 and bfloat16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from seqpar.runtime import solve_chain

from tests.conftest import sequential_loop


def tanh_step(s, x, W, U):
    return torch.tanh(s @ W.T + x @ U.T)


def sigmoid_step(s, x, W, U):
    return torch.sigmoid(s @ W.T + x @ U.T)


def gelu_step(s, x, W, U):
    return F.gelu(s @ W.T + x @ U.T)


def relu_step(s, x, W, U):
    return torch.relu(s @ W.T + x @ U.T)


def silu_step(s, x, W, U):
    return F.silu(s @ W.T + x @ U.T)


STEPS = {"tanh": tanh_step, "sigmoid": sigmoid_step, "gelu": gelu_step, "relu": relu_step, "silu": silu_step}
MAX_SLOPE = {"tanh": 1.0, "sigmoid": 0.25, "gelu": 1.13, "relu": 1.0, "silu": 1.1}
DEFAULT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 8e-3}


@st.composite
def chains(draw):
    width = draw(st.integers(1, 32))
    depth = draw(st.integers(1, min(512, 1024 // width)))
    return {
        "width": width,
        "depth": depth,
        "batch": draw(st.integers(1, 2)),
        "activation": draw(st.sampled_from(sorted(STEPS))),
        "gain": draw(st.floats(0.1, 3.0)),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
        "jacobian": draw(st.sampled_from(["full", "diag", "identity"])),
        "seed": draw(st.integers(0, 2**16)),
    }


def make_chain(case):
    generator = torch.Generator().manual_seed(case["seed"])
    width, dtype = case["width"], case["dtype"]

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(dtype)

    W = randn(width, width, scale=case["gain"] / width**0.5)
    U = randn(width, width, scale=1 / width**0.5)
    return randn(case["batch"], width), randn(case["depth"], case["batch"], width), (W, U)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(chains())
def test_fuzzed_chain_equals_the_sequential_loop(case):
    step = STEPS[case["activation"]]
    s0, xs, shared = make_chain(case)
    dtype, depth = case["dtype"], case["depth"]
    states, stats = solve_chain(step, s0, xs, shared, jacobian=case["jacobian"], return_stats=True)
    loop = sequential_loop(step, s0, xs, shared)
    assert states.shape == loop.shape and states.dtype == dtype

    if stats.sequential_steps == depth:
        torch.testing.assert_close(states, loop, rtol=0, atol=0, equal_nan=True)
        return
    assert bool(torch.isfinite(states).all()) or stats.fallback is not None

    tol = DEFAULT_TOL[dtype]
    eps = torch.finfo(dtype).eps
    lip = float(shared[0].double().abs().sum(dim=1).max()) * MAX_SLOPE[case["activation"]]
    finite = torch.isfinite(loop).all().item() and torch.isfinite(states).all().item()
    if not finite:
        return
    size = float(max(states.double().abs().max(), loop.double().abs().max()))
    scale = tol + tol * size

    # Backward error, measured in float64 so it holds the solver to its own tolerance.
    s64, xs64, shared64 = states.double(), xs.double(), [t.double() for t in shared]
    prev = torch.cat([s0.double().unsqueeze(0), s64[:-1]])
    residual = float((s64 - step(prev, xs64, *shared64)).abs().max())
    rounding = 2 * eps * (1 + size) * (1 + lip)
    assert residual <= (1 + 2 * lip) * scale + rounding, (residual, stats)

    # Forward error vs the same-dtype loop: per-step errors amplified by at most lip per step.
    per_step = residual + 2 * eps * (1 + size) * (1 + lip)
    growth = torch.tensor(lip, dtype=torch.float64) ** torch.arange(depth, dtype=torch.float64)
    bound = torch.cumsum(growth, 0).clamp(max=1e300) * per_step
    error = (states.double() - loop.double()).abs().flatten(1).amax(dim=1)
    assert bool((error <= bound).all()), (float((error / bound).max()), stats)


def expansive_step(s, x, W):
    return torch.relu(s @ W.T + x)


@settings(max_examples=4, deadline=None, derandomize=True)
@given(st.sampled_from([torch.float32, torch.bfloat16]), st.integers(200, 512), st.sampled_from(["full", "diag"]))
def test_expansive_chain_that_overflows_falls_back_to_the_exact_loop(dtype, depth, jacobian):
    # Gain 2 on a growing relu chain: 2^200 overflows float32 and bfloat16 (max ~2^128),
    # so Newton's first update is non-finite and the loop runs from s0.
    W = 2 * torch.eye(4, dtype=dtype)
    s0, xs = torch.ones(1, 4, dtype=dtype), torch.ones(depth, 1, 4, dtype=dtype)
    states, stats = solve_chain(expansive_step, s0, xs, (W,), jacobian=jacobian, return_stats=True)
    assert "non-finite" in stats.fallback and stats.sequential_steps == depth
    torch.testing.assert_close(states, sequential_loop(expansive_step, s0, xs, (W,)), rtol=0, atol=0, equal_nan=True)
