"""Per-chain decisions: forward and backward separately, always with a reason."""

import pytest
import torch

from seqpar.options import Options
from seqpar.passes.policy import decide, never_rewritten

from tests.conftest import chain_record as make_chain


def test_cpu_long_narrow_chain_is_parallel_both_ways():
    decision = decide(make_chain(4096, (1, 2)), Options(), "cpu", lyapunov=-0.3)
    assert (decision.method, decision.adjoint, decision.form, decision.jacobian) == ("parallel", "parallel", "solver", "full")
    assert "CPU cost model" in decision.reason and "Lyapunov exponent -0.3" in decision.reason


def test_cpu_parallel_adjoint_where_parallel_forward_loses():
    # The MLP grid (RESULTS.md, session 3): at L = 1024, N*w = 16 the forward wins 1.2x at best,
    # the adjoint 14x; N*w = 8 wins both; N*w = 512 wins neither.
    decision = decide(make_chain(1024, (1, 16)), Options(), "cpu", lyapunov=None)
    assert (decision.method, decision.adjoint, decision.form) == ("sequential", "parallel", "rolled")
    assert decision.label == "parallel"
    decision = decide(make_chain(1024, (1, 8)), Options(), "cpu", lyapunov=None)
    assert (decision.method, decision.adjoint, decision.form) == ("parallel", "parallel", "solver")
    decision = decide(make_chain(1024, (16, 32)), Options(), "cpu", lyapunov=None)
    assert (decision.method, decision.adjoint) == ("sequential", "sequential")


def test_cpu_dense_adjoint_stops_where_its_blocks_outgrow_the_sequential_vjps():
    # RESULTS.md, "The dense adjoint in runs": on GRU and Elman cells the adjoint in runs wins up to
    # N*w^2 = 8192 block values per position ((2, 64): 1.2-1.5x) and loses at 16384 ((4, 64), N*w = 256: 0.91x).
    decision = decide(make_chain(1024, (2, 64)), Options(), "cpu", lyapunov=None)
    assert (decision.method, decision.adjoint) == ("sequential", "parallel")
    decision = decide(make_chain(1024, (4, 64)), Options(), "cpu", lyapunov=None)
    assert (decision.method, decision.adjoint) == ("sequential", "sequential")
    assert "N*w^2 <= 8192" in decision.reason


def test_chaotic_chain_stays_sequential_with_the_exponent_in_the_reason():
    decision = decide(make_chain(4096, (1, 2)), Options(), "cpu", lyapunov=0.25)
    assert (decision.method, decision.adjoint) == ("sequential", "sequential")
    assert "Lyapunov exponent 0.25 > 0" in decision.reason


def test_wide_state_gets_no_dense_jacobian():
    decision = decide(make_chain(256, (4, 16, 8, 8)), Options(), "cpu", lyapunov=None)
    assert (decision.method, decision.adjoint) == ("sequential", "sequential")
    assert "w=1024 > 64" in decision.reason


@pytest.mark.parametrize("length, form", [(16, "unrolled"), (64, "rolled")])
def test_sequential_form_auto_rolls_long_chains(length, form):
    decision = decide(make_chain(length, (16, 64)), Options(), "cpu", lyapunov=None)
    assert decision.form == form


def test_forced_policies():
    chain = make_chain(32, (16, 32))
    assert decide(chain, Options(policy="parallel"), "cpu", None).method == "parallel"
    sequential = decide(make_chain(4096, (1, 2)), Options(policy="sequential", sequential_form="unrolled"), "cpu", None)
    assert (sequential.method, sequential.adjoint, sequential.form) == ("sequential", "sequential", "unrolled")


def test_gpu_cost_model_parallelises_moderate_widths():
    decision = decide(make_chain(256, (16, 32)), Options(), "cuda", lyapunov=-1.0)
    assert (decision.method, decision.adjoint) == ("parallel", "parallel")
    assert "GPU cost model" in decision.reason


def test_denoise_chain_takes_the_jacobian_estimate_where_steps_scale_far_from_one():
    decision = decide(make_chain(100, (2, 8), kind="denoise"), Options(), "cuda", lyapunov=-0.02)
    assert (decision.method, decision.jacobian, decision.window) == ("parallel", "estimate", 32)
    assert "window 32 x |lambda| 0.02 = 0.64 >= 0.5" in decision.reason


def test_denoise_chain_near_the_identity_keeps_picard_and_says_why():
    decision = decide(make_chain(250, (2, 8), kind="denoise"), Options(), "cuda", lyapunov=-0.01)
    assert (decision.method, decision.jacobian, decision.window) == ("parallel", "identity", 32)
    assert "window 32 x |lambda| 0.01 = 0.32 < 0.5" in decision.reason


def test_forced_parallel_denoise_chain_has_no_probe_keeps_picard_and_a_sequential_adjoint():
    decision = decide(make_chain(50, (1, 64), kind="denoise"), Options(policy="parallel"), "cpu", lyapunov=None)
    assert (decision.method, decision.adjoint, decision.jacobian) == ("parallel", "sequential", "identity")
    assert "no Lyapunov probe" in decision.reason and "adjoint sequential" in decision.reason


def test_asked_for_jacobian_is_kept_for_denoise_chains():
    decision = decide(make_chain(50, (2, 8), kind="denoise"), Options(policy="parallel", jacobian="diag"), "cpu", None)
    assert decision.jacobian == "diag" and "jacobian='diag' was asked for" in decision.reason


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_chain_autograd_does_not_record_has_no_parallel_adjoint_and_no_rolled_form_for_it(device):
    """An inference graph runs no backward: a parallel adjoint would only roll the forward loop (L >= 32 on a CPU)
    and call the chain parallel in explain while every direction that runs is sequential."""
    decision = decide(make_chain(48, (1, 16), recorded=False), Options(), device, lyapunov=-0.5)
    assert (decision.method, decision.adjoint, decision.form, decision.label) == (
        "sequential", "sequential", "unrolled", "sequential")
    assert "no adjoint: autograd records nothing through this chain" in decision.reason
    assert decide(make_chain(48, (1, 16)), Options(), device, lyapunov=-0.5).adjoint == "parallel"
    forced = decide(make_chain(48, (1, 16), recorded=False), Options(adjoint="parallel"), device, lyapunov=None)
    assert (forced.adjoint, forced.form) == ("sequential", "unrolled")


@pytest.mark.parametrize("options, length, recorded, device, never", [
    ({}, 31, True, "cpu", True),  # under every line: adjoint from 32, forward and rolling from 64
    ({}, 32, True, "cpu", False),
    ({}, 63, False, "cpu", True),  # no adjoint to solve: the forward's and rolling's 64 steps
    ({}, 64, False, "cpu", False),
    ({}, 63, False, "cuda", True),  # a GPU's forward from 64 steps
    ({}, 12, True, "cuda", False),  # a GPU's adjoint from any length where the blocks fit
    ({"adjoint": "parallel"}, 12, True, "cpu", False),
    ({"adjoint": "parallel"}, 40, False, "cpu", True),
    ({"policy": "parallel"}, 12, False, "cpu", False),
    ({"policy": "sequential", "sequential_form": "unrolled"}, 4096, True, "cpu", True),
    ({"sequential_form": "rolled"}, 12, False, "cpu", False),
])
def test_never_rewritten_holds_exactly_where_decide_keeps_the_chain_unrolled_at_every_size(options, length, recorded,
                                                                                          device, never):
    chain = make_chain(length, (1, 4), recorded=recorded)
    assert never_rewritten(chain, Options(**options), device) == never
    if never:  # decide agrees at sizes from the narrowest to the widest, whatever the probe and structure
        for shape in [(1, 1), (1, 4), (64, 64), (1024, 4096)]:
            for lyapunov in (None, -1.0):
                decision = decide(make_chain(length, shape, recorded=recorded), Options(**options), device, lyapunov)
                assert (decision.method, decision.adjoint, decision.form) == ("sequential", "sequential", "unrolled")
