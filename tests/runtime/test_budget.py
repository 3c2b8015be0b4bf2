"""A parallel solve's Jacobian blocks bounded by the device's memory (:mod:`seqpar.runtime.budget`).

The device's memory is replaced by a small number so that chains of a few
hundred positions meet the bound here; what the solve computes under the bound
(a sliding window, runs) is exact, so its results are compared with the loop in
float64 at the tolerances of the unbounded solve (Newton to 1e-10 relative:
within 1e-9 on these contracting chains; the adjoint solve is linear).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from seqpar.runtime import budget, solve_chain, spec
from seqpar.runtime.budget import memory_window, positions_per_run

from tests.conftest import rnn_chain, rnn_step, sequential_loop

TOL = 1e-9


def layout(device: str, batch: int, width: int, dtype=torch.float32):
    return SimpleNamespace(device=torch.device(device), batch_size=batch, width=width, dtype=dtype)


def memory_of(monkeypatch, total: int) -> None:
    monkeypatch.setattr(budget, "device_memory", lambda device: total)


def test_a_gpu_takes_the_whole_chain_where_its_blocks_fit_and_runs_that_fit_where_not(monkeypatch):
    # 80 GiB: 5 GiB of blocks per evaluation. A GRU-size state (N = 1024, w = 32, float32) has 4 MiB dense blocks
    # per position: 1280 positions fit; diagonal ones (128 KiB) fit 40960.
    memory_of(monkeypatch, 80 * 2**30)
    gru = layout("cuda", 1024, 32)
    assert positions_per_run(gru, 4096, "full") == 1280
    assert positions_per_run(gru, 1000, "full") == 1000
    assert positions_per_run(gru, 4096, "diag") == 4096
    assert memory_window(gru, 4096, "full", None) == 1280
    assert memory_window(gru, 1000, "full", None) is None  # the whole chain fits
    assert memory_window(gru, 4096, "full", 512) == 512  # a smaller window asked for stays
    assert memory_window(gru, 4096, "identity", None) is None  # Picard holds no blocks
    # Half precision: the linear solve holds its blocks in float32, so they count at 4 bytes a value.
    assert positions_per_run(layout("cuda", 1024, 32, torch.bfloat16), 4096, "full") == 1280


def test_on_cpu_runs_are_cache_sized_and_never_exceed_the_memory_bound(monkeypatch):
    small = layout("cpu", 4, 8)  # 1 KiB dense blocks: 1 MiB runs of 1024 positions
    memory_of(monkeypatch, 2**40)
    assert positions_per_run(small, 4096, "full") == spec.CPU_RUN_BYTES // 1024
    assert positions_per_run(layout("cpu", 2**16, 64), 4096, "full") == spec.CPU_RUN_MIN  # 1 GiB blocks
    memory_of(monkeypatch, 16 * 2**20)  # 1 MiB of blocks per evaluation
    assert positions_per_run(layout("cpu", 2**16, 64), 4096, "full") == 1  # one position even above the bound


def test_the_device_memory_of_this_cpu_is_its_memory_and_unknown_devices_are_unbounded():
    total = budget.device_memory(torch.device("cpu"))
    assert total is not None and 2**28 < total < 2**50
    assert budget.device_memory(torch.device("meta")) is None
    assert memory_window(layout("meta", 2**16, 64), 10**6, "full", None) is None


@pytest.mark.parametrize("adjoint", ["parallel", "sequential"])
def test_newton_under_a_memory_bound_takes_a_window_and_equals_the_loop(monkeypatch, caplog, adjoint):
    # Elman chain, batch 3, w = 6, float64: 864 bytes of dense blocks per position; a device of 16 * 50 * 864
    # bytes bounds one evaluation to 50 of the 200 positions. The iteration budget grows with the window (no
    # fallback) and the parallel adjoint takes runs of 50 as well.
    s0, xs, shared = rnn_chain(200, width=6, batch=(3,))
    memory_of(monkeypatch, spec.DEVICE_MEMORY_SHARE * 50 * 3 * 36 * 8)
    inputs = [s0.clone().requires_grad_(), xs.clone().requires_grad_(), *[t.clone().requires_grad_() for t in shared]]
    with caplog.at_level(logging.INFO, logger="seqpar.runtime"):
        states, stats = solve_chain(rnn_step, inputs[0], inputs[1], tuple(inputs[2:]), jacobian="full",
                                    adjoint=adjoint, return_stats=True)
    assert stats.window == 50 and stats.converged and stats.fallback is None
    assert "50 of 200 positions evaluated at once" in caplog.text
    expected = sequential_loop(rnn_step, *inputs[:2], tuple(inputs[2:]))
    torch.testing.assert_close(states, expected, atol=TOL, rtol=0)
    weights = torch.randn(states.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad((weights * states).sum(), inputs)
    want = torch.autograd.grad((weights * expected).sum(), inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=TOL, rtol=0)


def test_without_a_bound_the_whole_chain_is_one_window():
    s0, xs, shared = rnn_chain(200, width=6, batch=(3,))
    _, stats = solve_chain(rnn_step, s0, xs, shared, jacobian="full", return_stats=True)
    assert stats.window is None


def test_an_affine_chain_under_a_memory_bound_is_solved_in_runs_that_fit(monkeypatch):
    # s_l = a_l * s_{l-1} + b_l (diagonal affine): one linear solve, taken in runs of 40 diagonal blocks
    # (4 x 16 float64 values each, 512 bytes).
    generator = torch.Generator().manual_seed(2)
    a = torch.rand(300, 4, 16, generator=generator, dtype=torch.float64)
    b = torch.randn(300, 4, 16, generator=generator, dtype=torch.float64)
    s0 = torch.randn(4, 16, generator=generator, dtype=torch.float64)
    memory_of(monkeypatch, spec.DEVICE_MEMORY_SHARE * 40 * 512)
    step = lambda s, x: x[0] * s + x[1]  # noqa: E731
    states, stats = solve_chain(step, s0, (a, b), return_stats=True)
    assert stats.window == 40 and stats.iterations == 1 and stats.structure == "diagonal affine"
    torch.testing.assert_close(states, sequential_loop(step, s0, (a, b)), atol=1e-12, rtol=0)
