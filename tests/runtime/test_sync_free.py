"""A Newton loop a GPU can run without stalling (issue "Ready for the first GPU" §2).

On CUDA tensors the host reads a solve's outcome (converged prefix, largest
update, finiteness) every ``CUDA_DECISION_EVERY`` iterations only. Here, on
CPU, the CUDA cadence is forced and the torch-op path taken (no compiled CPU
kernel, whose results are host values anyway), and a dispatch mode counts the
operations that would synchronise a device: reading a scalar (``.item()``,
``float()``, ``bool()``: ``_local_scalar_dense``, ``is_nonzero``), and ops
whose output size depends on values (``nonzero``). The states must equal those
of a decision every iteration and the sequential loop.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from seqpar.runtime import newton, ops, solve_chain, spec

SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
           torch.ops.aten.nonzero.default, torch.ops.aten.equal.default}


class CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in SYNCING
        return func(*args, **(kwargs or {}))


def rnn_step(s, x, W):
    return torch.tanh(s @ W + x)


def chain(length=96, width=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(width, width, generator=generator, dtype=torch.float64) * 0.4 / width**0.5
    xs = torch.randn(length, 3, width, generator=generator, dtype=torch.float64)
    s0 = torch.randn(3, width, generator=generator, dtype=torch.float64)
    return s0, xs, W


def sequential(s0, xs, W):
    states, s = [], s0
    for x in xs:
        s = rnn_step(s, x, W)
        states.append(s)
    return torch.stack(states)


@pytest.fixture
def device_cadence(monkeypatch):
    """The CUDA decision cadence and the torch-op update on CPU; counts the syncs of every newton_solve."""
    monkeypatch.setattr(newton.cpu_scan, "available", lambda dtype=None: False)
    monkeypatch.setattr(newton, "decision_every", lambda device: spec.CUDA_DECISION_EVERY)
    counts = []
    solve = ops.newton_solve

    def counted(*args, **kwargs):
        with CountSyncs() as mode:
            result = solve(*args, **kwargs)
        counts.append((mode.count, result[1]))
        return result

    monkeypatch.setattr(ops, "newton_solve", counted)
    return counts


# Picard converges slowly on this chain (about one position per iteration): a shorter one.
@pytest.mark.parametrize("jacobian, window, length", [("full", None, 96), ("diag", None, 96), ("identity", None, 32),
                                                      ("identity", 8, 48)])
def test_at_most_a_few_syncs_per_decision_and_the_states_are_exact(device_cadence, jacobian, window, length):
    s0, xs, W = chain(length)
    got, stats = solve_chain(rnn_step, s0, xs, (W,), jacobian=jacobian, window=window, return_stats=True)
    ((syncs, solved),) = device_cadence
    assert solved.converged and solved.iterations > spec.CUDA_DECISION_EVERY
    decisions = math.ceil(solved.iterations / spec.CUDA_DECISION_EVERY)
    # A decision reads the largest ratio, the first position above tolerance (nonzero + its index) and,
    # only where the largest ratio is not finite, finiteness: at most 3 syncs.
    assert decisions <= syncs <= 3 * decisions, (syncs, solved.iterations)
    torch.testing.assert_close(got, sequential(s0, xs, W), atol=1e-9, rtol=0)


def test_every_iteration_decides_on_cpu():
    assert spec.decision_every(torch.device("cpu")) == 1
    assert spec.decision_every(torch.device("cuda", 0)) == spec.CUDA_DECISION_EVERY


def test_a_non_finite_value_between_decisions_falls_back_from_the_last_decided_start(device_cadence):
    s0, xs, W = chain(length=64)
    xs[40, 1, 2] = float("nan")  # the sequential loop is NaN from step 41 on, for that batch row
    got = solve_chain(rnn_step, s0, xs, (W,), jacobian="full")
    want = sequential(s0, xs, W)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0, equal_nan=True)
    ((_, solved),) = device_cadence
    assert "non-finite" in (solved.fallback or "")
