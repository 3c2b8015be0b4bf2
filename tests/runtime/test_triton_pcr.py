"""The Triton affine-recurrence kernels agree with the torch PCR path and a float64 loop.

Runs under the Triton interpreter on CPU (``TRITON_INTERPRET=1``, about 4 ms per
program instance), so the shapes are small; a ``chunk`` of 4 or 8 makes short
chains take two or three levels of the chunked recursion. With
``SEQPAR_TRITON_DEVICE=cuda`` (``scripts/gpu_check.sh``) the same tests run the
compiled kernels on a GPU.
"""

import os

DEVICE = os.environ.get("SEQPAR_TRITON_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from seqpar.runtime import pcr  # noqa: E402
from seqpar.runtime.kernels import triton_pcr  # noqa: E402

pytestmark = pytest.mark.triton

KINDS = ("full", "diag", "identity")


def random_system(kind, length, batch, width, seed, dtype=torch.float32):
    """A contractive system: full blocks ``randn / (1.5 sqrt(w))`` (products shrink by about
    1/1.5 a step), diagonal entries in ``(-0.9, 0.9)``; ``c`` standard normal."""
    generator = torch.Generator().manual_seed(seed)
    c = torch.randn(length, batch, width, generator=generator)
    if kind == "full":
        A = torch.randn(length, batch, width, width, generator=generator) / (1.5 * width**0.5)
    elif kind == "diag":
        A = torch.rand(length, batch, width, generator=generator) * 1.8 - 0.9
    else:
        A = None
    return (None if A is None else A.to(DEVICE, dtype)), c.to(DEVICE, dtype)


def sequential_reference(A, c, kind, reverse):
    """The recurrence step by step in float64: ``y_l = A_l y_{l-1} + c_l`` or
    ``y_l = A_{l+1}^T y_{l+1} + c_l``."""
    c = c.double()
    A = None if A is None else A.double()
    y = torch.zeros_like(c)
    state = torch.zeros_like(c[0])
    length = c.shape[0]
    for l in reversed(range(length)) if reverse else range(length):
        operator = l + 1 if reverse else l
        if operator < length and kind == "full":
            block = A[operator].transpose(-1, -2) if reverse else A[operator]
            state = (block @ state.unsqueeze(-1)).squeeze(-1)
        elif operator < length and kind == "diag":
            state = A[operator] * state
        elif operator == length:
            state = torch.zeros_like(state)
        state = state + c[l]
        y[l] = state
    return y


def relative_error(y, reference):
    return ((y.double() - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


# (L, N, w, chunk): a single step, a chain that is not a power of two with three
# recursion levels, state width 1 with a wide batch, and the widest blocks (w = 32,
# the tl.dot path) on a short chain.
SHAPES = [(1, 1, 1, 4), (37, 2, 3, 4), (37, 3, 1, 8), (9, 2, 32, 4)]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}-N{}-w{}-C{}".format(*s))
def test_float32_solve_matches_float64_loop_and_torch_path(shape, kind, reverse):
    # Contractive systems keep the float32 error near a few ulps of max |y|: 1e-5 relative.
    length, batch, width, chunk = shape
    A, c = random_system(kind, length, batch, width, seed=length * 100 + width)
    y = triton_pcr.solve_chunked(A, c, kind, reverse, chunk)
    assert y.dtype == torch.float32 and y.shape == c.shape
    assert relative_error(y, sequential_reference(A, c, kind, reverse)) < 1e-5
    torch_path = pcr.solve_affine_recurrence(A, c, kind, reverse=reverse)
    assert relative_error(y, torch_path.double()) < 1e-5


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_float32(dtype, kind, reverse):
    # The kernels upcast on load and sum in float32, so the only large error is the
    # final rounding to the input dtype (bf16: 2^-8 relative): compare with the
    # float64 solve of the rounded inputs at 1e-2 of max |y|.
    A, c = random_system(kind, 37, 2, 4, seed=7, dtype=dtype)
    y = triton_pcr.solve_chunked(A, c, kind, reverse, 8)
    assert y.dtype == dtype
    assert relative_error(y, sequential_reference(A, c, kind, reverse)) < 1e-2


@pytest.mark.parametrize("kind", ["full", "diag"])
def test_float64_inputs_are_solved_in_float64(kind):
    # w = 16 takes the broadcast product for full blocks (tl.dot is float32 only).
    A, c = random_system(kind, 11, 2, 16, seed=3, dtype=torch.float64)
    y = triton_pcr.solve_chunked(A, c, kind, True, 4)
    assert y.dtype == torch.float64
    assert relative_error(y, sequential_reference(A, c, kind, True)) < 1e-12


@pytest.mark.parametrize(
    "kind, length, width", [("full", 40, 2), ("diag", 140, 3), ("identity", 140, 3)]
)
def test_public_solve_with_default_chunks_matches_torch_path(kind, length, width):
    # Two chunks at the default chunk sizes (32 for full, 128 for the scanned kinds).
    A, c = random_system(kind, length, 2, width, seed=11)
    for reverse in (False, True):
        y = triton_pcr.solve_affine_recurrence(A, c, kind, reverse=reverse)
        expected = pcr.solve_affine_recurrence(A, c, kind, reverse=reverse)
        assert relative_error(y, expected.double()) < 1e-5


def test_available_here():
    assert triton_pcr.available()


def test_op_is_traceable_by_torch_compile():
    A, c = random_system("full", 6, 2, 3, seed=5)
    compiled = torch.compile(
        lambda A, c: 2 * triton_pcr.solve_affine_recurrence(A, c, "full", reverse=True),
        backend="aot_eager",
        fullgraph=True,
    )
    expected = 2 * sequential_reference(A, c, "full", True)
    assert relative_error(compiled(A, c), expected) < 1e-5
    torch.library.opcheck(triton_pcr.triton_affine_recurrence, (A, c, "full", True))
    torch.library.opcheck(triton_pcr.triton_affine_recurrence, (None, c, "identity", False))


def test_mismatched_operator_shape_is_rejected():
    A, c = random_system("diag", 5, 2, 3, seed=0)
    with pytest.raises(ValueError, match="needs A of shape"):
        triton_pcr.solve_affine_recurrence(A, c, "full")


def test_empty_chain_gives_empty_result():
    c = torch.zeros(0, 2, 3, device=DEVICE)
    assert triton_pcr.solve_affine_recurrence(None, c, "identity").shape == (0, 2, 3)
