"""The PCR driver solves ``y_l = A_l y_{l-1} + c_l`` exactly like the sequential recursion.

References are plain loops in float64. PCR reassociates the products, so in
float64 it agrees with the loop to a few ulps of the largest intermediate; the
blocks here have norm <= ~1, so 1e-12 absolute is a safe bound. Every test runs
both methods: the torch-op PCR and the compiled substitution (the CPU default).
The longer lengths reach PCR's chunked two-level scans (``L * N >= 1024``).
"""

from __future__ import annotations

import pytest
import torch

from seqpar.runtime import solve_affine_recurrence

LENGTHS = [1, 2, 3, 7, 8, 33, 347, 1030]
KINDS = ["full", "diag", "identity"]
METHODS = ["pcr", "substitution"]


def apply_block(A, kind, l, y, transpose=False):
    if kind == "identity":
        return y
    if kind == "diag":
        return A[l] * y
    block = A[l].transpose(-1, -2) if transpose else A[l]
    return (block @ y.unsqueeze(-1)).squeeze(-1)


def forward_loop(A, c, kind):
    y, out = torch.zeros_like(c[0]), []
    for l in range(c.shape[0]):
        y = apply_block(A, kind, l, y) + c[l]
        out.append(y)
    return torch.stack(out)


def reverse_loop(A, c, kind):
    length = c.shape[0]
    out = [None] * length
    y = torch.zeros_like(c[0])
    for l in reversed(range(length)):
        y = c[l] + (apply_block(A, kind, l + 1, y, transpose=True) if l + 1 < length else 0)
        out[l] = y
    return torch.stack(out)


def system(kind, length, batch=3, width=4, dtype=torch.float64):
    generator = torch.Generator().manual_seed(length)
    c = torch.randn(length, batch, width, generator=generator, dtype=torch.float64)
    if kind == "full":
        A = torch.randn(length, batch, width, width, generator=generator, dtype=torch.float64) / width
    elif kind == "diag":
        A = torch.rand(length, batch, width, generator=generator, dtype=torch.float64) * 1.8 - 0.9
    else:
        A = None
    return (None if A is None else A.to(dtype)), c.to(dtype)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_recurrence_equals_sequential_loop(kind, length, method):
    A, c = system(kind, length)
    y = solve_affine_recurrence(A, c, kind, method=method)
    torch.testing.assert_close(y, forward_loop(A, c, kind), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("kind", KINDS)
def test_reverse_recurrence_is_the_transposed_system(kind, length, method):
    A, c = system(kind, length)
    y = solve_affine_recurrence(A, c, kind, reverse=True, method=method)
    torch.testing.assert_close(y, reverse_loop(A, c, kind), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["full", "diag"])
def test_wide_and_batched_blocks_reach_every_pcr_layout(kind, method):
    # w = 9 > SMALL_WIDTH takes batched matmul; L * N = 40960 blocks the chunked diagonal scan.
    A, c = system(kind, 1280, batch=32, width=9)
    y = solve_affine_recurrence(A, c, kind, method=method)
    torch.testing.assert_close(y, forward_loop(A, c, kind), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["full", "diag"])
def test_reverse_recurrence_ignores_the_first_block(kind, method):
    A, c = system(kind, 9)
    changed = A.clone()
    changed[0] = 123.0
    torch.testing.assert_close(
        solve_affine_recurrence(changed, c, kind, reverse=True, method=method),
        solve_affine_recurrence(A, c, kind, reverse=True, method=method),
        rtol=0,
        atol=1e-12,
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_result_has_the_shape_and_dtype_of_c(kind, method):
    A, c = system(kind, 5, dtype=torch.float32)
    y = solve_affine_recurrence(A, c, kind, method=method)
    assert y.shape == c.shape and y.dtype == torch.float32


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["identity", "diag", "full"])
def test_half_precision_accumulates_in_float32(kind, dtype, method):
    # 512 copies of q = round(1/3): a running sum kept in bf16 stalls at 128 (ulp 1 > 2q)
    # and one kept in fp16 drifts (ulp 0.125 at 128..256); accumulated in float32 the
    # sum is exact to ~1e-5 and only the final rounding remains: within one ulp of 512 q.
    length = 512
    c = torch.full((length, 1, 2), 1 / 3, dtype=dtype)
    q = float(c[0, 0, 0])
    A = {
        "identity": None,
        "diag": torch.ones(length, 1, 2, dtype=dtype),
        "full": torch.eye(2, dtype=dtype).expand(length, 1, 2, 2),
    }[kind]
    y = solve_affine_recurrence(A, c, kind, method=method)
    assert y.dtype == dtype
    exact = torch.arange(1, length + 1, dtype=torch.float64) * q
    ulp = exact.to(dtype).float().abs() * torch.finfo(dtype).eps
    assert bool(((y[:, 0, 0].double() - exact).abs() <= ulp).all())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_matches_the_float32_solve_rounded_once(kind, method):
    A, c = system(kind, 33, dtype=torch.bfloat16)
    float32 = solve_affine_recurrence(None if A is None else A.float(), c.float(), kind, method=method)
    # One rounding to bf16 at the end: identical up to float32 reassociation, i.e. at most 1 bf16 ulp.
    y = solve_affine_recurrence(A, c, kind, method=method)
    torch.testing.assert_close(y, float32.to(torch.bfloat16), rtol=2**-7, atol=1e-6)


def test_unknown_kind_raises_value_error():
    with pytest.raises(ValueError, match="kind"):
        solve_affine_recurrence(None, torch.zeros(3, 1, 2), "lower")


def test_unknown_method_raises_value_error():
    with pytest.raises(ValueError, match="method"):
        solve_affine_recurrence(None, torch.zeros(3, 1, 2), "identity", method="thomas")
