"""Never silently wrong: the cases a user met (issue 11), each equal to eager PyTorch.

Tolerances: float64 models compare to eager with 1e-9 (the solver's float64
tolerance is 1e-10 relative, conditioning of these contracting chains is
O(1)); float32 cases state theirs where they appear.
"""

from __future__ import annotations

import logging
import sys

import pytest
import torch
import torch.nn as nn

import seqpar
from seqpar.backend import SeqparBackend
from seqpar.testing.models import hand_lstm
from seqpar.runtime import adjoint, budget, spec, step_cache
from seqpar.runtime.adjoint import adjoint_in_runs as in_runs
from seqpar.verify import compare_outputs

from tests.conftest import sequential_loop

TOL = 1e-9


def tanh_mlp(depth: int, width: int, *, bias: bool = True, scale: float = 1.0, dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width, bias=bias), nn.Tanh()]
    model = nn.Sequential(*layers).to(dtype)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(scale)
    return model


def compiled(model, **options):
    torch._dynamo.reset()
    backend = SeqparBackend(options)
    return torch.compile(model, backend=backend), backend


def chain_reports(backend):
    return [chain for graph in backend.graphs for chain in graph.chains if chain.decision != "rejected"]


def distance(a, b):
    """``max |a - b| / max |b|``, in float64."""
    return float((a.detach().double() - b.detach()).abs().max() / b.detach().abs().max())


def gradients(model, x, out):
    wanted = [p for p in model.parameters() if p.requires_grad] + ([x] if x.requires_grad else [])
    return torch.autograd.grad(out.square().sum(), wanted)


@pytest.mark.parametrize("policy", ["auto", "parallel", "sequential"])
def test_interleaved_frozen_parameters_get_eager_gradients(policy):
    model = tanh_mlp(40, 8)
    for index, parameter in enumerate(model.parameters()):
        parameter.requires_grad_(index % 3 != 0)
    x = torch.randn(4, 8, dtype=torch.float64)
    want = gradients(model, x, model(x))
    fn, backend = compiled(model, policy=policy)
    got = gradients(model, x, fn(x))
    assert chain_reports(backend)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("policy", ["auto", "parallel"])
def test_a_layer_stacks_adjoint_in_runs_gives_eager_gradients(monkeypatch, policy):
    # One byte of run budget: the parallel adjoint (auto's choice too: N*w = 32) takes runs of CPU_RUN_MIN = 32
    # layers, the last run first; 100 layers leave a first run of 4, evaluated over 32 with a zero cotangent after
    # it. Each run slices the per-layer weights, every third of them frozen (no gradient, no VJP output).
    monkeypatch.setattr(spec, "CPU_RUN_BYTES", 1)
    runs = []
    monkeypatch.setattr(adjoint, "adjoint_in_runs", lambda *args: runs.append(args[-1]) or in_runs(*args))
    model = tanh_mlp(100, 8)
    for index, parameter in enumerate(model.parameters()):
        parameter.requires_grad_(index % 3 != 0)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    want = gradients(model, x, model(x))
    fn, backend = compiled(model, policy=policy)
    got = gradients(model, x, fn(x))
    assert [chain.adjoint for chain in chain_reports(backend)] == ["parallel"] and runs == [spec.CPU_RUN_MIN]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=TOL, atol=TOL)


def test_a_stack_whose_blocks_exceed_the_device_memory_is_solved_over_a_window_and_says_so(monkeypatch):
    # 40 layers of width 8 at batch 4, float64: 2 KiB of dense Jacobian blocks per layer. A device of
    # 16 * 10 * 2 KiB bounds one evaluation to 10 layers: Newton over a sliding window of 10 (and the adjoint in
    # runs of 10), outputs and gradients equal to eager's, the reason in explain.
    monkeypatch.setattr(budget, "device_memory", lambda device: spec.DEVICE_MEMORY_SHARE * 10 * 4 * 64 * 8)
    model = tanh_mlp(40, 8)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    want_out = model(x)
    want = gradients(model, x, want_out)
    fn, backend = compiled(model, policy="parallel")
    out = fn(x)
    got = gradients(model, x, out)
    (chain,) = chain_reports(backend)
    assert chain.method == "parallel" and chain.stats["window"] == 10 and chain.stats["converged"]
    assert "10 of 40 positions evaluated at once" in chain.reason and "exceed 1/16 of the cpu memory" in chain.reason
    torch.testing.assert_close(out, want_out, rtol=TOL, atol=TOL)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("policy", ["auto", "parallel"])
def test_all_parameters_frozen_gradient_with_respect_to_the_input(policy):
    model = tanh_mlp(40, 8).requires_grad_(False)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    (want,) = gradients(model, x, model(x))
    fn, _ = compiled(model, policy=policy)
    (got,) = gradients(model, x, fn(x))
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)


def test_unfreezing_after_compilation_gives_the_new_parameters_gradients():
    model = tanh_mlp(40, 8).requires_grad_(False)
    x = torch.randn(4, 8, dtype=torch.float64)
    fn, _ = compiled(model, policy="parallel")
    fn(x)
    model.requires_grad_(True)
    want = gradients(model, x, model(x))
    got = gradients(model, x, fn(x))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("update", ["add", "clamp", "copy"])
def test_weights_changed_through_data_are_used_by_the_next_call(update):
    model = tanh_mlp(64, 8)
    x = torch.randn(4, 8, dtype=torch.float64)
    fn, _ = compiled(model, policy="parallel")
    with torch.no_grad():
        fn(x)
        for parameter in model.parameters():
            if update == "add":  # a hand-written SGD step
                parameter.data.add_(0.1 * torch.randn_like(parameter))
            elif update == "clamp":  # WGAN weight clipping
                parameter.data.clamp_(-0.05, 0.05)
            else:  # an EMA copy
                parameter.data.copy_(0.5 * parameter.data)
        torch.testing.assert_close(fn(x), model(x), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("jacobian", ["identity", "diag", "estimate", "full"])
@pytest.mark.parametrize("scale", [1e-4, 1e-6])
def test_small_states_are_solved_to_relative_accuracy(jacobian, scale):
    """States of 1e-4 .. 1e-6 (and smaller: no bias, contracting) in float32, any Jacobian: relative error at
    most 1e-4 (the float32 stopping tolerance is 1e-5 relative; the chain contracts)."""
    model = tanh_mlp(32, 72, bias=False, scale=0.9, dtype=torch.float32)
    x = scale * torch.randn(4, 72)
    fn, backend = compiled(model, policy="parallel", jacobian=jacobian)
    with torch.no_grad():
        got, want = fn(x), model(x)
    assert [chain.jacobian for chain in chain_reports(backend)] == [jacobian]
    error = (got - want).abs().amax(dim=-1) / want.abs().amax(dim=-1)
    assert float(error.max()) < 1e-4


def test_verification_rejects_a_wrong_result_at_any_scale():
    want = 1e-6 * torch.randn(8, 16)
    assert not compare_outputs(want, 1.9 * want).ok
    assert compare_outputs(want, want * (1 + 1e-6)).ok


def test_verification_judges_against_float64_where_the_reference_rounds_far():
    """A float32 reference that is itself far from the float64 result (a chaotic chain): a result no further from
    float64 than the reference passes, one much further fails."""
    exact = torch.randn(4, 16, dtype=torch.float64)
    reference = (exact + 0.1 * torch.randn_like(exact)).float()
    assert compare_outputs(reference, (exact - 0.1 * torch.randn_like(exact)).float(), exact).ok
    assert not compare_outputs(reference, (exact + 2.0).float(), exact).ok


def conv_stack(depth: int = 8, channels: int = 4) -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.Tanh()]
    return nn.Sequential(*layers).double()


def test_channels_last_conv_stack_in_parallel_gives_eager_values_and_gradients():
    model = conv_stack().to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()
    out = model(x)
    want = gradients(model, x, out)
    fn, backend = compiled(model, policy="parallel")
    got_out = fn(x)
    torch.testing.assert_close(got_out, out, rtol=TOL, atol=TOL)
    for g, w in zip(gradients(model, x, got_out), want, strict=True):
        torch.testing.assert_close(g, w, rtol=TOL, atol=TOL)
    assert chain_reports(backend)[0].form == "solver"


@pytest.mark.parametrize("layout", ["transposed", "expanded", "offset"])
def test_non_contiguous_inputs_in_parallel_give_eager_values(layout):
    model = tanh_mlp(16, 8)
    base = torch.randn(8, 8, dtype=torch.float64)
    x = {"transposed": base.T, "expanded": base[:1].expand(4, 8), "offset": base[2:6]}[layout]
    fn, _ = compiled(model, policy="parallel")
    with torch.no_grad():
        torch.testing.assert_close(fn(x), model(x), rtol=TOL, atol=TOL)


def elman(s, w):
    return torch.tanh(s @ w)


def test_solve_chain_with_a_fresh_lambda_each_call_traces_once():
    W = 0.3 * torch.randn(16, 4, 4, dtype=torch.float64)
    s0 = torch.randn(2, 4, dtype=torch.float64)
    steps = [lambda s, w: torch.tanh(s @ w) for _ in range(5)]  # five function objects, one code
    for step in steps:
        states = seqpar.solve_chain(step, s0, W)
    traced = {id(program) for program, (cached, _) in step_cache._cache.values() if getattr(cached, "__code__", None) is steps[0].__code__}
    assert len(traced) == 1
    torch.testing.assert_close(states, sequential_loop(elman, s0, W), rtol=TOL, atol=TOL)


def test_solve_chain_caches_at_most_capacity_programs(monkeypatch):
    monkeypatch.setattr(step_cache, "CAPACITY", 4)
    W = 0.3 * torch.randn(16, 4, 4, dtype=torch.float64)
    s0 = torch.randn(2, 4, dtype=torch.float64)
    for gain in range(10):  # ten different closures: ten programs, four kept
        seqpar.solve_chain(lambda s, w: torch.tanh(gain * s @ w), s0, W)
    assert len(step_cache._cache) <= 4


STEP_SIZE = 0.5


def scaled_elman(s, w):
    return torch.tanh(s @ w) * STEP_SIZE


class Damped:
    def __init__(self, factor):
        self.factor = factor

    def step(self, s, w):
        return torch.tanh(s @ w) * self.factor


def test_solve_chain_sees_a_python_float_that_changed_between_calls(monkeypatch, caplog):
    global STEP_SIZE
    W = 0.3 * torch.randn(16, 4, 4, dtype=torch.float64)
    s0 = torch.randn(2, 4, dtype=torch.float64)
    seqpar.solve_chain(scaled_elman, s0, W)
    monkeypatch.setattr(sys.modules[__name__], "STEP_SIZE", 2.0)
    torch.testing.assert_close(seqpar.solve_chain(scaled_elman, s0, W), sequential_loop(scaled_elman, s0, W))
    # an attribute read through self is invisible to the cache key: the first-step check retraces
    damped = Damped(0.5)
    seqpar.solve_chain(damped.step, s0, W)
    damped.factor = 0.25
    with caplog.at_level(logging.WARNING, logger="seqpar.runtime"):
        torch.testing.assert_close(seqpar.solve_chain(damped.step, s0, W), sequential_loop(damped.step, s0, W))
    assert "retraced" in caplog.text


def test_double_backward_through_solve_chain_equals_eager():
    W = (0.3 * torch.randn(16, 4, 4, dtype=torch.float64)).requires_grad_()
    s0 = torch.randn(2, 4, dtype=torch.float64)

    def grad_norm(states_of):
        (g,) = torch.autograd.grad(states_of(W).square().sum(), W, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), W)
        return g, gg

    got = grad_norm(lambda w: seqpar.solve_chain(elman, s0, w))
    want = grad_norm(lambda w: sequential_loop(elman, s0, w))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=TOL, atol=TOL)


@pytest.mark.slow  # about 30 s on a quiet 2-core machine (80 s loaded)
def test_llama_hidden_states_solved_by_picard_are_as_close_to_float64_as_eager():
    """A 40-layer float32 Llama stack (random weights, from a config) with ``output_hidden_states=True``, solved
    in parallel (Picard: wide states): every hidden state at most twice as far from the float64 model's as
    eager's is (relative to its scale); eager's own distance is about 4e-7."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=40, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=100, max_position_embeddings=64)
    model = LlamaModel(config).eval()
    exact_model = LlamaModel(config).eval()
    exact_model.load_state_dict(model.state_dict())
    exact_model.double()
    ids = torch.randint(0, 100, (2, 16))

    def hidden_states(fn):
        with torch.no_grad():
            return fn(ids, output_hidden_states=True, use_cache=False).hidden_states

    def distance(states, exact):
        return max(float((a.double() - e).abs().max() / e.abs().max()) for a, e in zip(states, exact))

    exact = hidden_states(exact_model)
    fn, backend = compiled(model, policy="parallel")
    got = hidden_states(fn)
    assert [(chain.kind, chain.form) for chain in chain_reports(backend)] == [("transformer", "solver")]
    assert distance(got, exact) <= 2 * distance(hidden_states(model), exact)


def test_gradient_through_a_parallel_ddim_loop_over_a_unet_with_respect_to_the_latent():
    """Guidance-style optimisation of the initial latent: d(sample)/d(x_T) through a 4-step DDIM loop over a tiny
    diffusers UNet, solved in parallel with the sequential adjoint (group norm's backward on the batched,
    non-contiguous activations), equals eager's (float64)."""
    from seqpar.testing.sampling import make_sample, sampling_loop
    from tests.e2e.test_denoise import compile_sample

    loop = sampling_loop("ddim", "unet", 4)
    fn, backend = compile_sample(loop.sample, tol=None)
    latent = loop.x.clone().requires_grad_()
    (got,) = torch.autograd.grad(fn(latent, loop.noise).square().sum(), latent)
    eager_latent = loop.x.clone().requires_grad_()
    reference = make_sample(loop.sched, loop.model)(eager_latent, loop.noise)
    (want,) = torch.autograd.grad(reference.square().sum(), eager_latent)
    assert ("denoise", "solver") in [(chain.kind, chain.form) for chain in chain_reports(backend)]
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL * float(want.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("policy", ["parallel", "sequential"])
def test_half_precision_chains_are_as_close_to_float64_as_eager(dtype, policy):
    """Half precision (the solver accumulates in float32, stores states in ``dtype``): values and gradients at
    most twice as far from the float64 model's as eager's, plus two ulps (relative to each tensor's scale)."""
    model = tanh_mlp(16, 8, dtype=dtype)
    exact_model = tanh_mlp(16, 8)
    x = torch.randn(4, 8, dtype=dtype, requires_grad=True)
    exact_x = x.detach().double().requires_grad_()

    def values_and_gradients(module, inputs, out):
        return [out, *gradients(module, inputs, out.float() if out.dtype != torch.float64 else out)]

    exact = values_and_gradients(exact_model, exact_x, exact_model(exact_x))
    eager = values_and_gradients(model, x, model(x))
    fn, _ = compiled(model, policy=policy)
    got = values_and_gradients(model, x, fn(x))

    for g, e, reference in zip(got, eager, exact, strict=True):
        assert distance(g, reference) <= 2 * distance(e, reference) + 2 * torch.finfo(dtype).eps


@pytest.mark.parametrize("options", [{}, {"policy": "parallel"}, {"policy": "sequential", "sequential_form": "rolled"}])
def test_a_bfloat16_autocast_region_is_as_close_to_float64_as_eager(options):
    """A float32 model called inside ``torch.autocast("cpu", bfloat16)`` (the chain op runs with autocast off:
    a kept-sequential step crashed on a bfloat16 state against float32 weights): values and gradients at most
    twice as far from the float64 model's as eager's, plus four bfloat16 ulps times the amplification of
    rounding errors the float32 model shows for that tensor (the input's gradient through 48 layers is ill
    conditioned: float32 gives it ~1e-5 relative, 100 ulps; eager's bfloat16 error on it varies from 1% to 70%
    with the seed, and one float32 run estimates the amplification within a factor of about 2); called outside the region afterwards, float32 values (no trace made under autocast reused)."""
    model, exact_model = tanh_mlp(48, 8, dtype=torch.float32), tanh_mlp(48, 8)
    x = torch.randn(4, 8, requires_grad=True)
    exact_x = x.detach().double().requires_grad_()
    exact = [exact_model(exact_x), *gradients(exact_model, exact_x, exact_model(exact_x))]
    fn, backend = compiled(model, **options)

    def values_and_gradients(call, autocast=True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = call(x)
        return [out, *gradients(model, x, out.float())]

    amplification = [max(1.0, distance(f, e) / torch.finfo(torch.float32).eps)
                     for f, e in zip(values_and_gradients(model, autocast=False), exact, strict=True)]
    eager = values_and_gradients(model)
    for _ in range(8):  # past the speed trial: both forms
        got = values_and_gradients(fn)
        for g, e, reference, growth in zip(got, eager, exact, amplification, strict=True):
            allowed = 2 * distance(e, reference) + 4 * torch.finfo(torch.bfloat16).eps * growth
            assert distance(g, reference) <= allowed
    assert chain_reports(backend)
    plain = fn(x)
    assert plain.dtype == torch.float32
    torch.testing.assert_close(plain, model(x), rtol=1e-5, atol=1e-5 * float(model(x).abs().max()))


def test_a_fused_loop_under_autocast_is_as_close_to_float64_as_eager():
    """The hand-written LSTM's kept-sequential loop (compiled by inductor, the autocast casts traced into its
    step) in a bfloat16 autocast region: every ``h_t`` as close to float64 as eager's (see above)."""
    model, (x,) = hand_lstm(96, 4, 16, 2, outputs="all")
    exact = model.double()(x.double())[0]
    model.float()
    fn, backend = compiled(model)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        eager = model(x)[0]
        for _ in range(8):
            assert distance(fn(x)[0], exact) <= 2 * distance(eager, exact) + 2 * torch.finfo(torch.bfloat16).eps
    assert [chain.stats["loop"] for chain in chain_reports(backend)] == ["fused"]


def test_solve_chain_keeps_a_trace_per_autocast_state_and_converges_at_its_precision(caplog):
    """A step traced inside an autocast region is not the step outside it: no stale trace, no retrace warning.
    Inside, float32 states whose products round to bfloat16 are solved to bfloat16's tolerance (to float32's
    they never converged: 40 iterations, then the loop): as close to float64 as eager's loop, plus two ulps;
    outside, eager's values to float32's tolerance."""
    torch.manual_seed(0)
    weight = torch.randn(8, 8) * 0.3
    s0, xs = torch.randn(2, 8), torch.randn(64, 2, 8)

    def step(s, x, w):
        return torch.tanh(s @ w + x)

    def loop(s, weight, xs):
        states = []
        for x in xs:
            s = step(s, x, weight)
            states.append(s)
        return torch.stack(states)

    exact = loop(s0.double(), weight.double(), xs.double())
    step_cache.clear()
    with caplog.at_level(logging.WARNING, logger="seqpar"):
        for autocast in (True, False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                want = loop(s0, weight, xs)
                got, stats = seqpar.solve_chain(step, s0, xs, (weight,), return_stats=True)
            assert stats.converged and stats.fallback is None
            if autocast:
                assert distance(got, exact) <= distance(want, exact) + 2 * torch.finfo(torch.bfloat16).eps
            else:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert "retraced" not in caplog.text


def test_the_default_tolerance_follows_the_coarsest_precision_the_step_computes_at():
    """A float32 step with bfloat16 products written in it converges (at bfloat16's tolerance) as close to
    float64 as its loop, plus two ulps; an elementwise step inside an autocast region (nothing it computes is
    lowered) keeps float32's tolerance: its loop's values to 1e-5."""
    torch.manual_seed(0)
    weight, s0, xs = torch.randn(8, 8) * 0.3, torch.randn(2, 8), torch.randn(64, 2, 8)

    def rounded_step(s, x, w):
        return torch.tanh((s.bfloat16() @ w.bfloat16()).float() + x)

    def elementwise_step(s, x, w):
        return torch.tanh(0.5 * s + x) * w[0, 0]

    def loop(step, s, xs, w):
        states = []
        for x in xs:
            s = step(s, x, w)
            states.append(s)
        return torch.stack(states)

    got, stats = seqpar.solve_chain(rounded_step, s0, xs, (weight,), return_stats=True)
    assert stats.converged and stats.fallback is None
    exact = loop(lambda s, x, w: torch.tanh(s @ w + x), s0.double(), xs.double(), weight.double())
    want = loop(rounded_step, s0, xs, weight)
    assert distance(got, exact) <= distance(want, exact) + 2 * torch.finfo(torch.bfloat16).eps
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = seqpar.solve_chain(elementwise_step, s0, xs, (weight,))
        torch.testing.assert_close(got, loop(elementwise_step, s0, xs, weight), rtol=1e-5, atol=1e-5)


def test_double_backward_through_a_compiled_chain_equals_eager():
    """A Hessian-vector product through ``torch.compile(backend="seqpar")`` (a graph of the chain op alone runs
    without the inner compiler, so the op's create_graph path is used)."""
    model = tanh_mlp(16, 4)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)

    def hessian_vector(fn):
        (g,) = torch.autograd.grad(fn(x).square().sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), x)
        return g, gg

    want = hessian_vector(model)
    fn, _ = compiled(model, policy="parallel")
    for g, w in zip(hessian_vector(fn), want, strict=True):
        torch.testing.assert_close(g, w, rtol=TOL, atol=TOL)


class GatedDiagonal(nn.Module):
    """``s_t = sigmoid(x_t A) * s_{t-1} + x_t B`` (affine and diagonal in ``s``), ``y_t = s_t * c`` stacked."""

    def __init__(self, inputs: int, width: int):
        super().__init__()
        self.A, self.B = nn.Linear(inputs, width), nn.Linear(inputs, width)
        self.c = nn.Parameter(torch.randn(width))

    def forward(self, x):
        s, ys = torch.zeros(x.shape[0], self.c.shape[0], dtype=x.dtype), []
        for t in range(x.shape[1]):
            s = torch.sigmoid(self.A(x[:, t])) * s + self.B(x[:, t])
            ys.append(s * self.c)
        return torch.stack(ys, 1)


def backward_twice_and_in_reverse(fn, model, x):
    """The gradients a user's autograd calls take: two passes over one graph (``retain_graph=True``), then two
    calls' graphs differentiated in the reverse order of the calls, with respect to the input and the weights."""
    wanted = [x] + list(model.parameters())
    first = fn(x)
    once = torch.autograd.grad(first.square().sum(), wanted, retain_graph=True)
    twice = torch.autograd.grad(first.sin().sum(), wanted)
    earlier, later = fn(x), fn(2 * x)
    later_grads = torch.autograd.grad(later.square().sum(), wanted)
    earlier_grads = torch.autograd.grad(earlier.cos().sum(), wanted)
    return [first, earlier, later, *once, *twice, *later_grads, *earlier_grads]


SOLVER, SEQUENTIAL_ADJOINT, ROLLED = ("parallel", "parallel", "solver"), ("parallel", "sequential", "solver"), \
    ("sequential", "sequential", "rolled")


@pytest.mark.parametrize("build, options, path, said", [
    (lambda: (tanh_mlp(16, 4), torch.randn(3, 4)), {"policy": "parallel"}, SOLVER, ""),
    (lambda: (tanh_mlp(16, 4), torch.randn(3, 4)), {"policy": "parallel", "adjoint": "sequential"},
     SEQUENTIAL_ADJOINT, ""),
    (lambda: (hand_lstm(steps=12)[0], torch.randn(2, 12, 3)), {"policy": "parallel"}, SOLVER, ""),
    (lambda: (hand_lstm(steps=70)[0], torch.randn(2, 70, 3)), {"policy": "sequential", "sequential_form": "rolled"},
     ROLLED, ""),
    (lambda: (GatedDiagonal(3, 5), torch.randn(2, 12, 3)), {"policy": "parallel"}, SOLVER, "one linear solve"),
], ids=["dense", "dense-sequential-adjoint", "lstm", "lstm-rolled", "affine-diagonal"])
def test_a_graph_differentiated_twice_and_calls_differentiated_in_reverse_order_equal_eager(build, options, path,
                                                                                          said):
    """The chain ops keep what their backward needs per call: a second backward of one graph, and the backward of
    an earlier call after a later call's, see that call's states and weights (an adjoint cached on the program, or
    freed by the first backward, would give another call's gradients)."""
    torch.manual_seed(0)
    model, x = build()
    model, x = model.double(), x.double().requires_grad_(True)
    want = backward_twice_and_in_reverse(model, model, x)
    fn, backend = compiled(model, **options)
    got = backward_twice_and_in_reverse(fn, model, x)
    (chain,) = chain_reports(backend)
    assert (chain.method, chain.adjoint, chain.form) == path and said in chain.reason
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=TOL, atol=TOL * w.abs().max().item())


def chains_after_two_batch_sizes(model, dynamic: bool):
    """The chain reports of ``model`` compiled with ``dynamic`` and called at batch sizes 3 and 5 (values checked)."""
    torch._dynamo.reset()
    backend = SeqparBackend({"policy": "parallel"})
    fn = torch.compile(model, backend=backend, dynamic=dynamic)
    for batch in (3, 5):
        x = torch.randn(batch, 8, dtype=torch.float64)
        torch.testing.assert_close(fn(x), model(x), rtol=TOL, atol=TOL)
    return [chain for graph in backend.graphs for chain in graph.chains]


def test_dynamic_shapes_are_compiled_per_size_and_every_size_solved():
    """A graph with symbolic sizes (``dynamic=True``) is specialised per size (``backend.PerShape``): its chains
    are solved as under ``dynamic=False``, not left unrolled."""
    model = tanh_mlp(16, 8)
    for dynamic in (True, False):
        assert [chain.form for chain in chains_after_two_batch_sizes(model, dynamic)] == ["solver", "solver"]


class _CountingDropoutMLP(nn.Module):
    """Dropout, a call counter updated in place, then a 64-layer chain (kept rolled by policy auto)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.dropout = nn.Dropout(0.5)
        self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(64)]).double()
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        self.calls.add_(1)
        return self.layers(self.dropout(x))


def test_the_compile_time_probe_leaves_buffers_and_the_random_stream_as_they_were():
    # Policy auto runs the original graph once at compile time (the Lyapunov probe). That run updated the
    # caller's buffers (the counter read 2 after one call); its random draws are undone by Dynamo, which
    # restores the random streams after a compile (asserted here all the same: the mask is eager's).
    model, x = _CountingDropoutMLP(), torch.randn(4, 4, dtype=torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=SeqparBackend({"inner": "eager", "min_chain": 4}))
    with torch.no_grad():
        torch.manual_seed(1)
        got = compiled(x)
        assert model.calls.item() == 1
        torch.manual_seed(1)
        torch.testing.assert_close(got, model(x), rtol=0, atol=1e-12)  # the same dropout mask as eager's


@pytest.mark.parametrize("policy", ["auto", "parallel"])
def test_verified_calls_update_buffers_once_and_compare_from_the_inputs_the_call_found(policy):
    # The graph check reruns the original graph: on copies of the inputs taken before the compiled call, so the
    # counter is not incremented twice and the reference starts where the compiled call started.
    model, x = _CountingDropoutMLP().eval(), torch.randn(4, 4, dtype=torch.float64)
    torch._dynamo.reset()
    backend = SeqparBackend({"inner": "eager", "min_chain": 4, "policy": policy, "verify": 2})
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for call in range(1, 5):
            torch.testing.assert_close(compiled(x), model.layers(x), rtol=0, atol=1e-12)
            assert model.calls.item() == call
    graph = backend.graphs[0]
    assert not graph.fell_back and all("MISMATCH" not in entry for entry in graph.verification)
    assert any(entry.startswith("call 4: graph ok") for entry in graph.verification)


def _complex_rnn(w, x, s):
    for t in range(x.shape[0]):
        s = torch.tanh(s @ w + x[t])
    return s


def _real_rnn_with_complex_weights(w, x, s):
    for t in range(x.shape[0]):
        s = torch.tanh((s.to(w.dtype) @ w).real + x[t])
    return s


def _integer_recurrence(x, s):
    states = []
    for t in range(x.shape[0]):
        s = (s * 3 + x[t]) % 1000
        states.append(s)
    return torch.stack(states)


@pytest.mark.parametrize("loop", [_complex_rnn, _real_rnn_with_complex_weights])
@pytest.mark.parametrize("policy", ["auto", "parallel"])
def test_complex_chains_are_left_to_the_inner_backend_with_their_gradients(loop, policy):
    # The chain op differentiates real floating-point tensors only: a complex weight of a chain it solved lost its
    # gradient (autograd.grad: "appears to not have been used in the graph"; .backward() left w.grad None), and
    # a complex state was taken as a denoising loop and solved by Picard to float32's tolerance. Such chains are
    # candidates with the reason; values and gradients are eager's (exactly: the same ops run).
    torch.manual_seed(0)
    w = (0.3 * torch.randn(4, 4, dtype=torch.complex128)).requires_grad_()
    state_dtype = torch.complex128 if loop is _complex_rnn else torch.float64
    x, s = torch.randn(96, 4, dtype=state_dtype), torch.randn(4, dtype=state_dtype)
    expected = loop(w, x, s)
    (expected_grad,) = torch.autograd.grad(expected.abs().sum(), w)
    model, backend = compiled(loop, policy=policy)
    got = model(w, x, s)
    (grad,) = torch.autograd.grad(got.abs().sum(), w)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)
    (chain,) = [chain for graph in backend.graphs for chain in graph.chains]
    assert chain.decision == "rejected" and "complex" in chain.reason


def test_an_integer_recurrence_is_a_candidate_with_its_reason():
    torch.manual_seed(0)
    x, s = torch.randint(0, 1000, (96, 4)), torch.randint(0, 1000, (4,))
    model, backend = compiled(_integer_recurrence, policy="parallel")
    assert torch.equal(model(x, s), _integer_recurrence(x, s))
    (chain,) = [chain for graph in backend.graphs for chain in graph.chains]
    assert chain.decision == "rejected" and chain.reason.startswith("the state is torch.int64")


@pytest.mark.parametrize("policy", ["auto", "parallel"])
def test_an_empty_batch_compiles_and_equals_eager(policy):
    # Policy auto failed to compile (BackendCompilerFailed: the probe packed a state of 0 elements); a chain
    # whose state has no elements is now a candidate with the reason, and the graph runs as traced.
    model = tanh_mlp(64, 4)
    x = torch.randn(0, 4, dtype=torch.float64, requires_grad=True)
    compiled_model, backend = compiled(model, policy=policy)
    got = compiled_model(x)
    assert got.shape == (0, 4)
    torch.testing.assert_close(gradients(model, x, got), gradients(model, x, model(x)), rtol=0, atol=0)
    (chain,) = [chain for graph in backend.graphs for chain in graph.chains]
    assert chain.decision == "rejected" and "has no elements" in chain.reason
