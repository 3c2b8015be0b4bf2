"""The fused Newton step agrees with the unfused torch step (Jacobians, then the PCR solve).

Runs under the Triton interpreter on CPU (``TRITON_INTERPRET=1``, a few ms per
program instance), so the shapes are small; a ``chunk`` of 4 or 8 makes the
37-step chains take two or three levels of the chunked recursion.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from seqpar.runtime import pcr  # noqa: E402
from seqpar.runtime.kernels import triton_newton  # noqa: E402

pytestmark = pytest.mark.triton

ACTIVATIONS = {
    "identity": lambda z: z,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "silu": torch.nn.functional.silu,
    "gelu": lambda z: torch.nn.functional.gelu(z, approximate="tanh"),
}


def random_chain(length, batch, width, seed, dtype=torch.float32, gain=0.9, batched_bias=False):
    """``(W, b, s0, S)``: ``W_l`` with entries ``N(0, gain^2 / w)`` (``E |W x|^2 = gain^2 |x|^2``,
    so products of Jacobians shrink on average), ``b``, ``s0`` and a random, unconverged iterate ``S``."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(dtype)

    W = randn(length, width, width, scale=gain / width**0.5)
    b = randn(*((length, batch, width) if batched_bias else (length, width)), scale=0.5)
    return W, b, randn(batch, width), randn(length, batch, width)


def unfused_reference(W, b, s0, S, activation, jacobian="full"):
    """``(ds, F)`` in float64 by torch: ``F``, ``g'`` by autograd, ``J``, then the PCR solve."""
    W, b, s0, S = (t.double() for t in (W, b, s0, S))
    W = W.expand(S.shape[0], *W.shape[-2:])
    prev = torch.cat([s0[None], S[:-1]])
    z = torch.einsum("lij,lnj->lni", W, prev) + (b if b.dim() == 3 else b[:, None])
    z.requires_grad_(True)
    F = ACTIVATIONS[activation](z)
    (dg,) = torch.autograd.grad(F.sum(), z)
    F = F.detach()
    if jacobian == "full":
        A = dg[..., :, None] * W[:, None]
    else:
        A = dg * torch.diagonal(W, dim1=-2, dim2=-1)[:, None]
    return pcr.solve_affine_recurrence(A, F - S, jacobian), F


def relative_error(y, reference):
    return ((y.double() - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("width", [1, 3, 8])
@pytest.mark.parametrize("length", [1, 5, 37])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_float32_step_matches_unfused_reference(activation, length, width, batch):
    # With W_l scaled by 0.9 / sqrt(w) (and |g'| <= 1.13) errors are not amplified along
    # the chain, so the kernel stays within a few float32 ulps times w of max |ds|: 1e-5
    # relative. One chunk of 64 steps: the per-step math of every activation and shape
    # (the chunked recursion, which does not depend on g, is covered below).
    W, b, s0, S = random_chain(length, batch, width, seed=100 * length + 10 * width + batch)
    ds = triton_newton.fused_newton_update(W, b, s0, S, activation, chunk=64)
    assert ds.dtype == torch.float32 and ds.shape == S.shape
    expected, _ = unfused_reference(W, b, s0, S, activation)
    assert relative_error(ds, expected) < 1e-5


@pytest.mark.parametrize("width", [1, 8])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_bfloat16_inputs_accumulate_in_float32(activation, width):
    # The arithmetic is float32; the only large error is rounding ds to bfloat16 (2^-8
    # relative): 1e-2 of max |ds| against the float64 step of the rounded inputs.
    # (Loads and stores are the only dtype-dependent code; one chunk keeps this quick.)
    W, b, s0, S = random_chain(37, 2, width, seed=width, dtype=torch.bfloat16)
    ds = triton_newton.fused_newton_update(W, b, s0, S, activation, chunk=64)
    assert ds.dtype == torch.bfloat16
    expected, _ = unfused_reference(W, b, s0, S, activation)
    assert relative_error(ds, expected) < 1e-2


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("length, chunk", [(37, 4), (40, 32)])
def test_chunked_solve_matches_unfused_reference(activation, length, chunk):
    # chunk 4: 10 chunk maps, solved in two more levels; 32 (the default) on 40 steps: two chunks.
    W, b, s0, S = random_chain(length, 2, 3, seed=length + chunk)
    ds = triton_newton.fused_newton_update(W, b, s0, S, activation, chunk=chunk)
    expected, _ = unfused_reference(W, b, s0, S, activation)
    assert relative_error(ds, expected) < 1e-5


@pytest.mark.parametrize("activation", ["tanh", "gelu"])
@pytest.mark.parametrize("length, width, chunk", [(37, 3, 4), (37, 8, 8)])
def test_diagonal_variant_matches_quasi_newton_reference(activation, length, width, chunk):
    W, b, s0, S = random_chain(length, 2, width, seed=length + width)
    ds = triton_newton.fused_newton_update(W, b, s0, S, activation, jacobian="diag", chunk=chunk)
    expected, _ = unfused_reference(W, b, s0, S, activation, jacobian="diag")
    assert relative_error(ds, expected) < 1e-5


def test_values_are_returned_on_request():
    W, b, s0, S = random_chain(37, 2, 3, seed=1)
    ds, F = triton_newton.fused_newton_update(W, b, s0, S, "silu", chunk=8, return_values=True)
    expected_ds, expected_F = unfused_reference(W, b, s0, S, "silu")
    assert relative_error(ds, expected_ds) < 1e-5
    assert relative_error(F, expected_F) < 1e-6


def test_shared_weight_and_per_batch_bias():
    # An Elman cell s_l = tanh(W s_{l-1} + (U x_l + b)): one W for every step, the input
    # projection as a per-batch bias (L, N, w).
    W, b, s0, S = random_chain(37, 2, 4, seed=2, batched_bias=True)
    ds = triton_newton.fused_newton_update(W[0], b, s0, S, "tanh", chunk=4)
    expected, _ = unfused_reference(W[0], b, s0, S, "tanh")
    assert relative_error(ds, expected) < 1e-5


def test_widest_state_uses_the_dot_product_path():
    # w = 32 composes chunk maps with tl.dot (ieee float32).
    W, b, s0, S = random_chain(9, 1, 32, seed=3)
    ds = triton_newton.fused_newton_update(W, b, s0, S, "tanh", chunk=4)
    expected, _ = unfused_reference(W, b, s0, S, "tanh")
    assert relative_error(ds, expected) < 1e-5


def test_float64_inputs_are_solved_in_float64():
    W, b, s0, S = random_chain(11, 2, 3, seed=4, dtype=torch.float64)
    ds = triton_newton.fused_newton_update(W, b, s0, S, "sigmoid", chunk=4)
    expected, _ = unfused_reference(W, b, s0, S, "sigmoid")
    assert ds.dtype == torch.float64
    assert relative_error(ds, expected) < 1e-12


def test_newton_iterations_converge_to_the_sequential_loop():
    # s_l = tanh(W_l s_{l-1} + b_l), gain 0.9: Newton from S = s0 everywhere reaches the
    # loop's states; after k iterations the first k states are exact, and quadratic
    # convergence finishes the rest well before 12.
    W, b, s0, _ = random_chain(37, 2, 8, seed=5)
    states, state = [], s0
    for l in range(37):
        state = torch.tanh(state @ W[l].T + b[l])
        states.append(state)
    expected = torch.stack(states)
    S = s0.expand(37, *s0.shape).clone()
    for iteration in range(1, 13):
        S = S + triton_newton.fused_newton_update(W, b, s0, S, "tanh", chunk=8)
        if (S - expected).abs().max() < 1e-5:
            break
    assert (S - expected).abs().max() < 1e-5, f"not converged after {iteration} iterations"


def test_available_under_the_interpreter():
    assert triton_newton.available()


def test_op_is_traceable_by_torch_compile():
    W, b, s0, S = random_chain(6, 2, 3, seed=6)
    compiled = torch.compile(
        lambda W, b, s0, S: S + triton_newton.fused_newton_update(W, b, s0, S, "tanh", chunk=4),
        backend="aot_eager",
        fullgraph=True,
    )
    expected, _ = unfused_reference(W, b, s0, S, "tanh")
    assert relative_error(compiled(W, b, s0, S) - S, expected) < 1e-5
    torch.library.opcheck(triton_newton.fused_newton_update_op, (W, b, s0, S, "tanh", "full", 4, True))
    torch.library.opcheck(triton_newton.fused_newton_update_op, (W, b, s0, S, "relu", "diag", None, False))


def test_mismatched_shapes_and_names_are_rejected():
    W, b, s0, S = random_chain(5, 2, 3, seed=0)
    with pytest.raises(ValueError, match="needs W of shape"):
        triton_newton.fused_newton_update(W[:, :2], b, s0, S, "tanh")
    with pytest.raises(ValueError, match="activation must be one of"):
        triton_newton.fused_newton_update(W, b, s0, S, "softplus")
    with pytest.raises(ValueError, match="w <= 32"):
        triton_newton.fused_newton_update(W, b, s0, torch.zeros(5, 2, 33), "tanh")


def test_empty_chain_gives_empty_result():
    W, b, s0, S = random_chain(0, 2, 3, seed=0)
    assert triton_newton.fused_newton_update(W, b, s0, S, "tanh").shape == (0, 2, 3)
