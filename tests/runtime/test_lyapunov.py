"""The predictability probe: the largest Lyapunov exponent of a chain, by forward or reverse mode."""

import math

import torch

from seqpar.runtime.lyapunov import largest_lyapunov_exponent


class NoForwardMode(torch.autograd.Function):
    """``tanh`` with a backward but no forward-mode formula (like the fused CPU attention kernel)."""

    @staticmethod
    def forward(s):
        return torch.tanh(s)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad * (1 - out * out)


def diagonal_step(s, x_leaves, shared):
    return s * x_leaves[0]


def test_exponent_of_a_diagonal_linear_chain_is_log_of_the_largest_factor():
    # s_l = diag(0.5, 0.8) s_{l-1}: the product's largest singular value is 0.8^L. Power iteration
    # from a random vector carries the 0.5 component for a few steps: a bias of O(1) / L.
    factors = torch.tensor([0.5, 0.8], dtype=torch.float64).expand(256, 2)
    exponent = largest_lyapunov_exponent(diagonal_step, 256, torch.ones(2, dtype=torch.float64), [factors], [])
    assert abs(exponent - math.log(0.8)) < 0.01


def test_reverse_mode_gives_the_forward_mode_exponent():
    # tanh(W s + b) with W of gain 1.5: the reverse-mode estimate (VJPs along the stored trajectory)
    # is taken when forward mode fails, and averages the same growth rates.
    torch.manual_seed(0)
    W = torch.randn(128, 4, 4, dtype=torch.float64) * 1.5 / 2
    b = torch.randn(128, 4, dtype=torch.float64) * 0.1
    s0 = torch.randn(4, dtype=torch.float64)

    def forward_step(s, x_leaves, shared):
        return torch.tanh(x_leaves[0] @ s + x_leaves[1])

    def reverse_only_step(s, x_leaves, shared):
        return NoForwardMode.apply(x_leaves[0] @ s + x_leaves[1])

    forward = largest_lyapunov_exponent(forward_step, 128, s0, [W, b], [])
    reverse = largest_lyapunov_exponent(reverse_only_step, 128, s0, [W, b], [])
    assert math.isfinite(forward) and abs(forward - reverse) < 0.1  # two estimates of one limit over 128 steps


def test_a_chain_that_overflows_has_an_infinite_exponent():
    factors = torch.full((64, 1), 1e300, dtype=torch.float64)
    assert largest_lyapunov_exponent(diagonal_step, 64, torch.ones(1, dtype=torch.float64), [factors], []) == math.inf


def test_an_exponent_within_the_rounding_of_the_estimate_is_zero():
    # An orthogonal step has lambda = 0 exactly; each log-norm of a float32 tangent carries a rounding of
    # order eps = 1.2e-7, so the estimate is a small number of either sign (xLSTM's memory, whose forget
    # factor saturates at 1, gave +3.7e-9 and was kept sequential as unpredictable). Reported as 0.
    torch.manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    steps = rotation.float().expand(64, 16, 16)

    def rotate(s, x_leaves, shared):
        return x_leaves[0] @ s

    assert largest_lyapunov_exponent(rotate, 64, torch.randn(16), [steps], []) == 0.0
    # A growth of 1.001 per step (lambda = 1e-3) is far above the rounding: still seen.
    growth = torch.full((64, 4), 1.001)
    assert abs(largest_lyapunov_exponent(diagonal_step, 64, torch.ones(4), [growth], []) - math.log(1.001)) < 1e-5
