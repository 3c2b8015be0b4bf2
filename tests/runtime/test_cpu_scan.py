"""The compiled CPU substitution: when it is used, and what happens without it.

Its numbers are checked against the sequential loops in ``test_pcr.py`` (both
methods); here: "auto" picks it for plain CPU tensors , not fake tensors,
and a machine without a C compiler (or ``SEQPAR_CPU_KERNEL=0``) gets the
torch-op PCR with the reason logged, never an error, unless substitution was
asked for by name.
"""

from __future__ import annotations

import logging

import pytest
import torch

from seqpar.runtime import solve_affine_recurrence, solve_chain
from seqpar.runtime.kernels import cpu_scan


def dense_system(length=50, batch=2, width=3, dtype=torch.float64):
    generator = torch.Generator().manual_seed(7)
    A = torch.randn(length, batch, width, width, generator=generator, dtype=dtype) / width
    c = torch.randn(length, batch, width, generator=generator, dtype=dtype)
    return A, c


@pytest.fixture
def without_compiler(monkeypatch, tmp_path):
    """A machine whose C compiler is missing and whose kernel cache is empty."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SEQPAR_CACHE_DIR", str(tmp_path / "cache"))
    cpu_scan._library.cache_clear()
    yield
    cpu_scan._library.cache_clear()  # the next user rebuilds (or finds) the real kernel


def test_the_kernel_builds_here_and_auto_uses_it():
    assert cpu_scan.available(), cpu_scan.disabled_reason()
    A, c = dense_system()
    auto = solve_affine_recurrence(A, c, "full")
    assert torch.equal(auto, solve_affine_recurrence(A, c, "full", method="substitution"))


def test_inputs_are_not_modified():
    A, c = dense_system()
    A_before, c_before = A.clone(), c.clone()
    solve_affine_recurrence(A, c, "full", method="substitution", reverse=True)
    assert torch.equal(A, A_before) and torch.equal(c, c_before)


def test_non_contiguous_blocks_are_solved_as_their_values():
    A, c = dense_system()
    A_t = A.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, transposed strides
    c_strided = torch.cat([c, c], dim=-1)[..., : c.shape[-1]]
    expected = solve_affine_recurrence(A, c, "full", method="pcr")
    torch.testing.assert_close(solve_affine_recurrence(A_t, c_strided, "full"), expected, rtol=0, atol=1e-12)


def test_inputs_that_require_grad_are_refused_by_name():
    A, c = dense_system()
    with pytest.raises(ValueError, match="not differentiable"):
        solve_affine_recurrence(A.requires_grad_(True), c, "full")
    with torch.no_grad():
        solve_affine_recurrence(A, c, "full")


def test_fake_tensors_are_not_taken_by_the_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        A, c = torch.empty(5, 1, 2, 2, dtype=torch.float64), torch.empty(5, 1, 2, dtype=torch.float64)
        assert not cpu_scan.supports(A, c)


def test_without_a_compiler_auto_falls_back_to_pcr_and_says_why(without_compiler, caplog):
    A, c = dense_system()
    with caplog.at_level(logging.WARNING, logger="seqpar.runtime"):
        assert not cpu_scan.available()
    assert "no-such-compiler" in cpu_scan.disabled_reason()
    assert "torch-op PCR" in caplog.text
    expected = solve_affine_recurrence(A, c, "full", method="pcr")
    assert torch.equal(solve_affine_recurrence(A, c, "full"), expected)
    with pytest.raises(ValueError, match="substitution.*no-such-compiler"):
        solve_affine_recurrence(A, c, "full", method="substitution")


def test_chains_solve_exactly_without_the_kernel(without_compiler):
    generator = torch.Generator().manual_seed(3)
    W = torch.randn(40, 3, 3, generator=generator, dtype=torch.float64) * 0.5
    s0 = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    states = solve_chain(lambda s, w: torch.tanh(s @ w.T), s0, W)
    s, expected = s0, []
    for w in W:
        s = torch.tanh(s @ w.T)
        expected.append(s)
    torch.testing.assert_close(states, torch.stack(expected), rtol=1e-9, atol=1e-9)


def test_environment_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv("SEQPAR_CPU_KERNEL", "0")
    assert cpu_scan.disabled_reason() == "SEQPAR_CPU_KERNEL=0"
    A, c = dense_system()
    assert torch.equal(solve_affine_recurrence(A, c, "full"), solve_affine_recurrence(A, c, "full", method="pcr"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["full", "diag"])
def test_fused_newton_update_equals_the_update_in_torch_ops(kind, dtype):
    # s + y with (I - S) y = F - s, the first state set to F_0, ratios max|y| / (atol + rtol max|s_new|) per state.
    generator = torch.Generator().manual_seed(5)
    length, batch, width = 40, 3, 4
    shape = (length, batch, width, width) if kind == "full" else (length, batch, width)
    A = (torch.randn(*shape, generator=generator, dtype=torch.float64) * 0.4).to(dtype)
    F = torch.randn(length, batch, width, generator=generator, dtype=torch.float64).to(dtype)
    s = torch.randn(length, batch, width, generator=generator, dtype=torch.float64).to(dtype)
    F[:25] = s[:25] + 1e-7 * torch.randn(25, batch, width, generator=generator, dtype=torch.float64).to(dtype)
    update = solve_affine_recurrence(A, F - s, kind, method="pcr")
    expected = s + update
    expected[0] = F[0]
    ratios = (update.abs().amax(-1) / (expected.abs().amax(-1) * 1e-4 + 1e-4)).amax(1)
    first, largest, finite = cpu_scan.newton_update(A, F, s, kind, 1e-4, 1e-4)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(s, expected, rtol=0, atol=64 * eps)
    assert torch.equal(s[0], F[0])  # exact, not s_0 + (F_0 - s_0)
    assert first == int(torch.nonzero(ratios > 1)[0]) and finite
    assert largest == pytest.approx(float(ratios.max()), rel=1e-4)


def test_fused_newton_update_reports_non_finite_updates_and_treats_zero_over_zero_as_converged():
    A = torch.zeros(4, 1, 2, dtype=torch.float64)
    s = torch.zeros(4, 1, 2, dtype=torch.float64)
    F = torch.zeros(4, 1, 2, dtype=torch.float64)
    first, largest, finite = cpu_scan.newton_update(A, F, s, "diag", 0.0, 1e-6)  # every ratio 0 / 0
    assert (first, largest, finite) == (4, 0.0, True)
    F[2, 0, 1] = float("inf")
    first, largest, finite = cpu_scan.newton_update(A, F, s.clone(), "diag", 1e-6, 1e-6)
    assert not finite


def test_fused_newton_update_takes_states_wider_than_any_stack_buffer():
    # A denoiser's latent as one diagonal block row: 2**21 values (16 MiB in float64) per position.
    length, width = 3, 1 << 21
    A = torch.full((length, 1, width), 0.5, dtype=torch.float64)
    F = torch.ones(length, 1, width, dtype=torch.float64)
    s = torch.zeros(length, 1, width, dtype=torch.float64)
    first, largest, finite = cpu_scan.newton_update(A, F, s, "diag", 1e-8, 1e-8)
    assert finite and first == 0
    assert torch.equal(s[:, 0, 0], torch.tensor([1.0, 1.5, 1.75], dtype=torch.float64))  # s + y, y_l = 0.5 y_{l-1} + 1
