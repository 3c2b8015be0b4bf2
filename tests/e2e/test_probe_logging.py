"""The predictability probe's expected failures are quiet: one INFO line, the details at DEBUG.

A step with no forward-mode derivative (CPU flash attention, as in a diffusers
UNet's attention blocks) is estimated in reverse mode; a graph the probe cannot
run is left without an estimate. Neither is the user's problem, so neither
prints a traceback (torch.fx prints one to stderr for any error in a
GraphModule's generated code).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from seqpar.backend import SeqparBackend
from seqpar.runtime.lyapunov import largest_lyapunov_exponent

PROBE = "predictability probe"


def attention_step(s, x_leaves, shared):
    """``s + 0.1 sdpa(s, s, s) + x`` on (B, H, T, D): CPU flash attention has no forward-mode formula."""
    return s + 0.1 * torch.nn.functional.scaled_dot_product_attention(s, s, s) + x_leaves[0]


def probe_lines(caplog, level):
    return [record for record in caplog.records if PROBE in record.getMessage() and record.levelno == level]


def test_a_step_without_forward_mode_derivative_is_one_info_line_with_the_error_at_debug(caplog):
    s0, xs = torch.randn(1, 1, 4, 8), torch.randn(6, 1, 1, 4, 8)
    with caplog.at_level(logging.DEBUG, logger="seqpar"):
        exponent = largest_lyapunov_exponent(attention_step, 6, s0, [xs], [])
    assert math.isfinite(exponent)  # estimated in reverse mode
    (info,) = probe_lines(caplog, logging.INFO)
    assert "reverse mode" in info.getMessage() and "\n" not in info.getMessage()
    assert "_scaled_dot_product_flash_attention_for_cpu" in info.getMessage()
    (debug,) = probe_lines(caplog, logging.DEBUG)
    assert debug.exc_info is not None  # the traceback goes to DEBUG handlers only


class AttentionUNetLoop(torch.nn.Module):
    """``x <- x - 0.1 unet(x, t)`` over 4 timesteps, with a tiny diffusers UNet2DModel that has
    attention blocks (random weights): one chain whose step calls CPU flash attention."""

    def __init__(self):
        super().__init__()
        diffusers = pytest.importorskip("diffusers")
        torch.manual_seed(0)
        self.unet = diffusers.UNet2DModel(
            sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        )

    def forward(self, x):
        for t in range(4):
            x = x - 0.1 * self.unet(x, t).sample
        return x


def test_probing_a_unet_with_attention_prints_no_traceback_and_logs_one_info_line(capfd, caplog):
    torch._dynamo.reset()
    model = AttentionUNetLoop().eval()
    backend = SeqparBackend({"inner": "eager", "min_chain": 4})  # policy "auto" runs the probe
    with caplog.at_level(logging.INFO, logger="seqpar"), torch.no_grad():
        torch.compile(model, backend=backend)(torch.randn(1, 1, 8, 8))
    torch._dynamo.reset()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "FX-traced Module" not in err
    (info,) = probe_lines(caplog, logging.INFO)
    assert "no forward-mode derivative" in info.getMessage() and "\n" not in info.getMessage()
    assert [chain.lyapunov for graph in backend.graphs for chain in graph.chains if chain.lyapunov is not None]
