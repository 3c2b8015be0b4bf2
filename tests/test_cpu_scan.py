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

from seqpar.runtime import cpu_scan, solve_affine_recurrence, solve_chain


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
