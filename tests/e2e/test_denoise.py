"""Denoising loops through the backend: sliding-window Picard (ParaDiGMS) on traceable schedulers.

A user's sampling loop over ``seqpar.diffusion.traceable(scheduler)`` is one
Dynamo graph whose steps form a chain of kind "denoise"; with
``policy="parallel"`` it is solved by Picard iterations over a sliding window,
or with ``jacobian="estimate"`` by quasi-Newton iterations whose Jacobians are
estimated as ``c_l I`` from one VJP per position. Denoisers (``seqpar.testing.sampling``):
a small MLP and a tiny diffusers ``UNet2DModel`` (its step batched over the window after
being lowered to aten ops: see ``seqpar.runtime.program.lower_step``).

Tolerances. The tests run in float64 with ``tol = 1e-10`` (the solver stops
when every update satisfies ``|ds| <= 1e-10 (1 + |s|)``). The error left in a
state after convergence is at most about the last update, and it passes
through the remaining steps, whose Jacobians have norm <= ~1.2 for these
chains (DDIM's ``sqrt(abar_{t-1} / abar_t)``) over a few dozen steps: the
final sample is compared at ``1e-7 (1 + |x|)`` — loose against the 1e-10
stopping rule, tight against the 1e-1..1e0 scale of the samples. Window 1,
and the sequential form, are exact: ``torch.equal``.
"""

from __future__ import annotations

import functools

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import DDIMScheduler  # noqa: E402

import seqpar  # noqa: E402
from seqpar.backend import SeqparBackend  # noqa: E402
from seqpar.runtime import solve_chain  # noqa: E402
from seqpar.testing.sampling import SCHEDULERS, MLPDenoiser, inputs, make_sample, sampling_loop  # noqa: E402

TOL = 1e-10
ATOL = RTOL = 1e-7


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compile_sample(sample, **options):
    options = {"policy": "parallel", "inner": "eager", "min_chain": 4, "tol": TOL, **options}
    backend = SeqparBackend(options)
    return torch.compile(sample, backend=backend), backend


def solved_denoise_chains(backend):
    chains = [chain for graph in backend.graphs for chain in graph.chains if chain.kind == "denoise"]
    return [chain for chain in chains if chain.form == "solver"]


def run_case(scheduler: str, denoiser: str, steps: int, form: str = "loop", **options):
    """``(compiled sample, the sequential loop's sample, backend)``; ``form`` as :func:`make_sample`'s."""
    loop = sampling_loop(scheduler, denoiser, steps, form)
    compiled, backend = compile_sample(loop.sample, **options)
    with torch.no_grad():
        got = compiled(loop.x, loop.noise)
        want = make_sample(loop.sched, loop.model)(loop.x, loop.noise)
    return got, want, backend


def assert_close_to_sequential(got, want):
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


# Euler ancestral computes its step in float32 (as diffusers does), so updates stop
# shrinking near float32 rounding: its tolerance is float32's.
TOL_BY_SCHEDULER = {"ddim": TOL, "ddpm": TOL, "euler_ancestral": 1e-6}
CLOSE_BY_SCHEDULER = {"ddim": 1e-7, "ddpm": 1e-7, "euler_ancestral": 1e-4}


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_mlp_denoiser_loop_is_one_picard_chain_equal_to_the_loop(scheduler):
    got, want, backend = run_case(scheduler, "mlp", 50, tol=TOL_BY_SCHEDULER[scheduler])
    (chain,) = solved_denoise_chains(backend)
    assert chain.length >= 49 and chain.jacobian == "identity"
    assert chain.stats["converged"] and chain.stats["window"] == 32
    assert chain.stats["iterations"] < chain.length  # fewer parallel iterations than steps
    close = CLOSE_BY_SCHEDULER[scheduler]
    torch.testing.assert_close(got, want, atol=close, rtol=close)


@pytest.mark.slow
@pytest.mark.parametrize("steps", [250, 1000])
@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_long_mlp_denoiser_loops_equal_the_loop(scheduler, steps):
    got, want, backend = run_case(scheduler, "mlp", steps, tol=TOL_BY_SCHEDULER[scheduler])
    (chain,) = solved_denoise_chains(backend)
    assert chain.length >= steps - 1
    close = CLOSE_BY_SCHEDULER[scheduler]
    torch.testing.assert_close(got, want, atol=close, rtol=close)


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_scan_loop_is_one_denoise_chain_solved_in_parallel_and_equal_to_the_loop(scheduler):
    """``sched.scan_loop`` reaches the backend as scans; the long run is a "denoise" chain (DDPM's
    last, noise-free step is a run of its own, computed as it is)."""
    got, want, backend = run_case(scheduler, "mlp", 50, form="scan", tol=TOL_BY_SCHEDULER[scheduler])
    (chain,) = solved_denoise_chains(backend)
    assert chain.length == (49 if scheduler == "ddpm" else 50)
    assert chain.stats["converged"] and chain.stats["window"] == 32 and chain.stats["iterations"] < chain.length
    assert "higher_order.scan" not in backend.graphs[0].rewritten_code
    close = CLOSE_BY_SCHEDULER[scheduler]
    torch.testing.assert_close(got, want, atol=close, rtol=close)


@pytest.mark.parametrize("form", ["loop", "scan"])
@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_window_of_one_reproduces_the_loop_bit_for_bit(scheduler, form):
    got, want, backend = run_case(scheduler, "mlp", 20, form=form, window=1)
    (chain,) = solved_denoise_chains(backend)
    assert chain.stats["window"] == 1 and chain.stats["converged"]
    assert chain.stats["fallback"] is None and chain.stats["evaluations"] == chain.stats["iterations"]
    assert torch.equal(got, want)


@pytest.mark.parametrize("scheduler", ["ddpm", "euler_ancestral"])
def test_stochastic_samplers_with_the_same_noise_give_the_same_sample(scheduler):
    loop = sampling_loop(scheduler, "mlp", 20)
    compiled, _ = compile_sample(loop.sample, tol=TOL_BY_SCHEDULER[scheduler])
    with torch.no_grad():
        first, second = compiled(loop.x, loop.noise), compiled(loop.x, loop.noise.clone())
        other = compiled(loop.x, inputs(loop.sched, loop.shape, seed=5)[1])
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)


def test_denoise_chain_is_sequential_on_cpu_under_the_auto_policy():
    got, want, backend = run_case("ddim", "mlp", 20, policy="auto")
    (chain,) = [c for graph in backend.graphs for c in graph.chains if c.kind == "denoise"]
    assert chain.method == "sequential" and "CPU cost model" in chain.reason
    assert torch.equal(got, want)


@pytest.mark.parametrize("window", [0, -3, 2.5, True, "big"])
def test_bad_window_raises_value_error(window):
    with pytest.raises(ValueError, match="window"):
        SeqparBackend({"window": window})


# UNet loops. The tiny UNet has random weights: its noise prediction is not a
# denoiser's, the samples grow to |x| ~ 500 over 50 steps and each step scales
# its input by c_l ~ 1.0..2.1. float64 throughout (the UNet runs in float64).
# DDIM / DDPM stop at |ds| <= 1e-10 (1 + |s|): the loop is matched at 1e-7
# relative (measured: 1e-12). Euler ancestral computes each step in float32
# (as diffusers does), so it stops at float32's 1e-6 (1 + |s|), ~5e-4 at
# |s| = 500, and is matched at 1e-5 relative (measured: 5e-7).
UNET_CLOSE = {"ddim": 1e-7, "ddpm": 1e-7, "euler_ancestral": 1e-5}


def assert_unet_loop_solved_in_parallel(scheduler, steps, form="loop", **options):
    got, want, backend = run_case(scheduler, "unet", steps, form, tol=TOL_BY_SCHEDULER[scheduler], **options)
    (chain,) = solved_denoise_chains(backend)
    assert chain.length >= steps - 1
    assert chain.stats["converged"] and chain.stats["fallback"] is None and chain.stats["sequential_steps"] == 0
    assert chain.adjoint == "sequential"  # a UNet step's dense Jacobian would cost w VJPs
    close = UNET_CLOSE[scheduler]
    torch.testing.assert_close(got, want, atol=close, rtol=close)
    return chain


def test_unet_denoiser_loop_is_solved_in_parallel_and_equals_the_loop():
    """The UNet's step (GroupNorm on the channels-last-strided output of its
    attention block) is batched over the window: it is lowered to aten ops before vmap."""
    chain = assert_unet_loop_solved_in_parallel("ddim", 8, window=4)
    assert chain.stats["window"] == 4


def test_unet_scan_loop_is_solved_in_parallel_and_equals_the_loop():
    """The same UNet step, traced once by Dynamo inside ``scan_loop``'s scan."""
    chain = assert_unet_loop_solved_in_parallel("ddim", 16, form="scan", window=8)
    assert chain.stats["window"] == 8 and chain.length == 16


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_unet_denoiser_loops_of_50_steps_are_solved_in_parallel(scheduler):
    chain = assert_unet_loop_solved_in_parallel(scheduler, 50)
    assert chain.stats["window"] == 32 and chain.stats["iterations"] < chain.length


# As UNET_CLOSE, but Euler ancestral's float32 stopping rule leaves more error over 1000
# steps: measured 2.6e-5 relative with Picard (the rule bounds the last update, and Picard
# converges slowly, so the update understates the error), matched at 1e-4 as the MLP's.
LONG_UNET_CLOSE = {**UNET_CLOSE, "euler_ancestral": 1e-4}


@functools.cache
def unet_loop_sample(scheduler: str, steps: int) -> torch.Tensor:
    """The sequential loop's sample (computed once for both Jacobians: a 1000-step UNet loop takes minutes)."""
    loop = sampling_loop(scheduler, "unet", steps)
    with torch.no_grad():
        return loop.sample(loop.x, loop.noise)


@pytest.mark.slow
@pytest.mark.parametrize("jacobian", ["identity", "estimate"])
@pytest.mark.parametrize("steps", [250, 1000])
@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_long_unet_scan_loops_through_the_backend_equal_the_loop(scheduler, steps, jacobian):
    """T = 250 and 1000 on the same tiny UNet through ``torch.compile(backend="seqpar")``: written
    with ``scan_loop`` Dynamo traces the UNet once (the unrolled loop costs 0.8 to 5 s of Dynamo
    per UNet call on this CPU, quiet to loaded: 13 to 90 minutes at T = 1000), the scan is a "denoise" chain."""
    loop = sampling_loop(scheduler, "unet", steps, form="scan")
    want = unet_loop_sample(scheduler, steps)
    compiled, backend = compile_sample(loop.sample, tol=TOL_BY_SCHEDULER[scheduler], jacobian=jacobian,
                                       max_iters=steps)
    with torch.no_grad():
        got = compiled(loop.x, loop.noise)
    (chain,) = solved_denoise_chains(backend)
    stats = chain.stats
    assert chain.length >= steps - 1 and chain.jacobian == jacobian
    assert stats["converged"] and stats["fallback"] is None and stats["iterations"] < steps
    assert stats["evaluations"] == 32 * stats["iterations"]
    assert stats["jacobian_evaluations"] == (chain.length if jacobian == "estimate" else 0)
    close = LONG_UNET_CLOSE[scheduler]
    torch.testing.assert_close(got, want, atol=close, rtol=close)


def test_raw_diffusers_scheduler_loop_compiles_exactly_and_explain_hints_at_traceable(tmp_path):
    sched = DDIMScheduler(clip_sample=False)
    sched.set_timesteps(10)
    model = MLPDenoiser(sched.alphas_cumprod).double().eval()

    def sample(x):
        for t in sched.timesteps:
            x = sched.step(model(x, t), t, x).prev_sample
        return x

    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    compiled, _ = compile_sample(sample, debug_dir=str(tmp_path))
    with torch.no_grad():
        got, want = compiled(x), sample(x)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert "seqpar.diffusion.traceable" in (tmp_path / "hints.txt").read_text()  # the dump says it too
    torch._dynamo.reset()
    with torch.no_grad():
        report = seqpar.explain(sample, x, options={"policy": "parallel", "min_chain": 4})
    assert report.graph_count >= 8
    assert any("seqpar.diffusion.traceable" in hint for hint in report.hints)


# -- the runtime on UNet building blocks ------------------------------------------------

from seqpar.runtime.program import rayleigh_estimate, sign_probe  # noqa: E402
from seqpar.passes.policy import ESTIMATE_COST  # noqa: E402

# Iteration counts of the estimate tests (deterministic: float64, fixed seeds, one thread or many).
PICARD_ITERATIONS = 33  # the scaling chain, whole-chain Picard (at rtol 1e-11: Picard converges linearly)
WINDOWED_ITERATIONS = 16  # the scaling chain, W = 8: two iterations per window (solve, confirm)
SAMPLER_ITERATIONS = {"ddpm": (23, 13), "euler_ancestral": (28, 10)}  # (Picard, estimate), MLP, T = 50, W = 32


def attention_block_step(s, x, norm_weight, proj):
    """``s + x tanh(group_norm(attention(s)))`` on ``(B, C, H, W)``, as diffusers' mid block:
    the attention output ``transpose(-1, -2).reshape(B, C, H, W)`` is channels-last strided."""
    batch, channels, height, width = s.shape
    tokens = s.reshape(batch, channels, height * width).transpose(1, 2)  # (B, HW, C)
    query = (tokens @ proj).unsqueeze(1)
    attended = torch.nn.functional.scaled_dot_product_attention(query, query, query).squeeze(1)
    mixed = attended.transpose(-1, -2).reshape(batch, channels, height, width)
    return s + x * torch.tanh(torch.nn.functional.group_norm(mixed, 2, norm_weight))


def attention_chain(length=12, requires_grad=False):
    generator = torch.Generator().manual_seed(3)
    s0 = torch.randn(2, 4, 2, 2, generator=generator, dtype=torch.float64)
    xs = 0.3 * torch.rand(length, generator=generator, dtype=torch.float64)
    weight = torch.randn(4, generator=generator, dtype=torch.float64)
    proj = 0.5 * torch.randn(4, 4, generator=generator, dtype=torch.float64)
    return [t.requires_grad_(requires_grad) for t in (s0, xs, weight, proj)]


def attention_loop(s0, xs, weight, proj):
    states, s = [], s0
    for x in xs:
        s = attention_block_step(s, x, weight, proj)
        states.append(s)
    return torch.stack(states)


@pytest.mark.parametrize("jacobian, window", [("identity", None), ("identity", 1), ("full", None), ("estimate", 4)])
def test_group_norm_on_an_attention_output_batches_over_positions(jacobian, window):
    s0, xs, weight, proj = attention_chain()
    states, stats = solve_chain(attention_block_step, s0, xs, (weight, proj), jacobian=jacobian, window=window,
                                batch_ndim=1, return_stats=True)
    assert stats.converged and stats.fallback is None
    torch.testing.assert_close(states, attention_loop(s0, xs, weight, proj), atol=1e-9, rtol=1e-9)


def test_attention_step_gradients_through_dense_jacobians_equal_the_loop():
    """The parallel adjoint multiplies the steps' dense Jacobians: wrong Jacobian rows
    (e.g. a decomposed attention forward differentiated by the fused kernel's formula)
    would show here, where a forward solve still converges to the right states."""
    s0, xs, weight, proj = attention_chain(requires_grad=True)
    states = solve_chain(attention_block_step, s0, xs, (weight, proj), jacobian="full", adjoint="parallel",
                         batch_ndim=1)
    got = torch.autograd.grad(states.square().sum(), (s0, xs, weight, proj))
    want = torch.autograd.grad(attention_loop(s0, xs, weight, proj).square().sum(), (s0, xs, weight, proj))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)


# -- the Jacobian estimate --------------------------------------------------------------


def test_estimate_is_the_rayleigh_quotient_along_the_sign_probe():
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    s = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    value, A = rayleigh_estimate(lambda v: (s @ matrix.T, v @ matrix), s)  # f(s) = s M^T, J = M
    probe = sign_probe(6, torch.float64, "cpu")
    assert set(probe.tolist()) == {-1.0, 1.0}
    assert A.shape == s.shape and torch.equal(A, A[:1, :1].expand_as(A))
    torch.testing.assert_close(A[0, 0], probe @ matrix @ probe / 6)


def scaling_chain(length=64):
    """``s_l = a_l s_{l-1} + b_l``: ``J_l = a_l I``, which the estimate finds exactly at any state."""
    generator = torch.Generator().manual_seed(1)
    a = 0.5 + torch.rand(length, generator=generator, dtype=torch.float64)
    b = torch.randn(length, 2, 5, generator=generator, dtype=torch.float64)
    s0 = torch.randn(2, 5, generator=generator, dtype=torch.float64)
    return s0, (a, b)


def scaling_step(s, x):
    scale, shift = x
    return scale * s + shift


def scaling_loop(s0, xs):
    states, s = [], s0
    for scale, shift in zip(*xs):
        s = scaling_step(s, (scale, shift))
        states.append(s)
    return torch.stack(states)


def test_estimate_is_newton_for_steps_that_scale_the_state():
    """One iteration solves the chain and the next confirms it; the estimates are made
    at the first iteration only (one VJP per position) and reused at the second."""
    s0, xs = scaling_chain()
    states, stats = solve_chain(scaling_step, s0, xs, jacobian="estimate", return_stats=True)
    _, picard = solve_chain(scaling_step, s0, xs, jacobian="identity", return_stats=True)
    assert stats.jacobian == "estimate" and stats.iterations == 2 and picard.iterations == PICARD_ITERATIONS
    assert (stats.evaluations, stats.jacobian_evaluations) == (2 * 64, 64)
    assert (picard.evaluations, picard.jacobian_evaluations) == (PICARD_ITERATIONS * 64, 0)
    torch.testing.assert_close(states, scaling_loop(s0, xs), atol=1e-12, rtol=1e-12)


def test_windowed_estimates_are_made_once_per_position_as_it_enters_the_window():
    """With A = J exactly, a window's first iteration solves its 8 positions and the next
    confirms them (the first's update was large); every position is estimated once."""
    s0, xs = scaling_chain()
    states, stats = solve_chain(scaling_step, s0, xs, jacobian="estimate", window=8, return_stats=True)
    assert stats.converged and stats.window == 8
    assert stats.jacobian_evaluations == 64 and stats.evaluations == 8 * stats.iterations
    assert stats.iterations == WINDOWED_ITERATIONS
    torch.testing.assert_close(states, scaling_loop(s0, xs), atol=1e-12, rtol=1e-12)


def test_window_of_one_with_estimates_reproduces_the_loop_bit_for_bit():
    """W = 1: each position is evaluated once, with its estimate, at an exact state."""
    got, want, backend = run_case("ddpm", "mlp", 20, window=1, jacobian="estimate")
    (chain,) = solved_denoise_chains(backend)
    assert chain.jacobian == "estimate" and chain.stats["converged"]
    assert chain.stats["evaluations"] == chain.stats["jacobian_evaluations"] == chain.stats["iterations"]
    assert torch.equal(got, want)


def backend_with_jacobian(jacobian, **options):
    """A parallel backend whose chains use ``jacobian``."""
    return SeqparBackend({"policy": "parallel", "inner": "eager", "min_chain": 4, "tol": TOL, "jacobian": jacobian,
                          **options})


@pytest.mark.parametrize("scheduler", ["ddpm", "euler_ancestral"])
def test_estimated_jacobians_solve_contracting_samplers_in_fewer_evaluation_equivalents(scheduler):
    """DDPM and Euler ancestral steps contract (c_l < 1), which Picard (A = I) does not model.
    At W = 32 (W |lambda| ~ 3 and 6.5) the estimate needs fewer iterations and, counting a VJP as
    ESTIMATE_COST - 1 forward evaluations, fewer evaluation-equivalents; it makes one VJP per position."""
    loop = sampling_loop(scheduler, "mlp", 50)
    stats = {}
    for jacobian in ("identity", "estimate"):
        torch._dynamo.reset()
        backend = backend_with_jacobian(jacobian, tol=TOL_BY_SCHEDULER[scheduler])
        with torch.no_grad():
            got, want = torch.compile(loop.sample, backend=backend)(loop.x, loop.noise), loop.sample(loop.x, loop.noise)
        (chain,) = solved_denoise_chains(backend)
        assert chain.jacobian == jacobian and chain.stats["jacobian"] == jacobian and chain.stats["converged"]
        close = CLOSE_BY_SCHEDULER[scheduler]
        torch.testing.assert_close(got, want, atol=close, rtol=close)
        stats[jacobian] = chain.stats
    picard, estimate = stats["identity"], stats["estimate"]
    assert (picard["iterations"], estimate["iterations"]) == SAMPLER_ITERATIONS[scheduler]
    assert estimate["evaluations"] == 32 * estimate["iterations"] and picard["evaluations"] == 32 * picard["iterations"]
    assert estimate["jacobian_evaluations"] == estimate["length"] and picard["jacobian_evaluations"] == 0
    cost = estimate["evaluations"] + (ESTIMATE_COST - 1) * estimate["jacobian_evaluations"]
    assert cost < picard["evaluations"]


def test_explain_points_a_long_unrolled_sampling_loop_at_scan_loop():
    loop = sampling_loop("ddim", "mlp", 100)
    with torch.no_grad():
        report = seqpar.explain(loop.sample, loop.x, loop.noise, options={"policy": "sequential"})
    assert any("Dynamo traced 100 denoiser calls" in hint and "sched.scan_loop" in hint for hint in report.hints)
