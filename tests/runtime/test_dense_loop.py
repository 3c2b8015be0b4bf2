"""The compiled loop for small dense layer chains kept sequential for cost (``seqpar.runtime.dense_step``).

``s_l = h(s_{l-1} W_l^T + b_l)`` runs as one C call instead of two operator
calls per step. Its states differ from eager's by rounding only (double
accumulation, activations evaluated in double), so it is used only where the
policy kept a chain sequential for cost and the probe found the chain
contractive (errors do not grow); a chain kept sequential because it is
unpredictable, ``policy="sequential"``, a fallback and a reference run
eager's kernels, bit for bit. Tolerances: float32 states are compared with
the float64 loop; the compiled loop must be no further from it than eager's
own float32 loop is, up to a factor 4 (both are a few float32 roundings per
step away, on chains whose errors do not grow) or 1e-6 relative, whichever
is larger.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from seqpar.backend import SeqparBackend
from seqpar.runtime.kernels import cpu_dense_loop
from seqpar.runtime.ops import call_state
from tests.runtime.test_rolled import mlp as rolled_mlp

ACTIVATIONS = {
    "identity": lambda z: z, "relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
    "silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
}
MODULES = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "silu": nn.SiLU, "gelu": nn.GELU}

pytestmark = pytest.mark.skipif(not cpu_dense_loop.available(torch.float32), reason="no C compiler")


def eager_loop(s0, weight, bias, activation, layout, dtype):
    h, states, s = ACTIVATIONS[activation], [], s0.to(dtype)
    for l in range(weight.shape[0]):
        W = weight[l].to(dtype)
        s = h(F.linear(s, W if layout == 1 else W.T, None if bias is None else bias[l].to(dtype)))
        states.append(s)
    return torch.stack(states)


def relative_error(states, exact):
    return float((states.double() - exact).abs().max() / exact.abs().max())


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("layout", [1, 0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_kernel_equals_the_eager_loop_to_rounding(activation, layout, dtype):
    generator = torch.Generator().manual_seed(3)
    length, batch, width = 40, 5, 8
    weight = torch.randn(length, width, width, generator=generator, dtype=dtype) * 0.8 / width**0.5
    bias = torch.randn(length, width, generator=generator, dtype=dtype) * 0.3
    s0 = torch.randn(batch, width, generator=generator, dtype=dtype)
    out = torch.empty(length, batch, width, dtype=dtype)
    assert cpu_dense_loop.run(s0, weight, bias, out, layout, activation) is out
    exact = eager_loop(s0, weight, bias, activation, layout, torch.float64)
    if dtype == torch.float64:
        torch.testing.assert_close(out, exact, atol=1e-13, rtol=1e-12)
    else:
        eager = eager_loop(s0, weight, bias, activation, layout, dtype)
        assert relative_error(out, exact) <= max(4 * relative_error(eager, exact), 1e-6)


def test_one_shared_weight_and_no_bias():
    generator = torch.Generator().manual_seed(4)
    W = torch.randn(6, 6, generator=generator, dtype=torch.float64) / 6
    s0 = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    out = torch.empty(12, 3, 6, dtype=torch.float64)
    cpu_dense_loop.run(s0, W, None, out, 0, "tanh")
    torch.testing.assert_close(out, eager_loop(s0, W.expand(12, 6, 6), None, "tanh", 0, torch.float64),
                               atol=1e-14, rtol=0)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_extreme_values_give_pytorchs_results(activation):
    """NaN stays NaN (``relu`` included), infinities and tiny values give what the ATen formulas give in
    float64, and every value is within a float32 rounding of the float64 formula's (evaluated in double, the
    loop is more accurate than float32 ATen where a formula cancels: gelu(-3) there is 4e-5 off, relatively).
    Float32 ATen itself is no reference for the infinities: its AVX512 gelu gives gelu(inf) = nan (AVX2 and
    scalar code give inf)."""
    z = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 1e-30, -100.0, 100.0, 1e-7, -3.0, 1e30])
    width = z.numel()
    out = torch.empty(1, 1, width)
    cpu_dense_loop.run(torch.zeros(1, width), torch.zeros(width, width), z, out, 1, activation)
    want = ACTIVATIONS[activation](z.double()).float()
    torch.testing.assert_close(out[0, 0], want, atol=1e-30, rtol=2e-7, equal_nan=True)


@pytest.mark.parametrize("bad", ["dtype", "shape", "layout", "bias shape"])
def test_tensors_it_cannot_read_are_refused_before_anything_is_written(bad):
    s0, W, b = torch.randn(2, 4), torch.randn(3, 4, 4), torch.randn(3, 4)
    out = torch.full((3, 2, 4), 7.0)
    if bad == "dtype":
        W = W.double()
    elif bad == "shape":
        W = torch.randn(3, 4, 5)
    elif bad == "layout":
        W = torch.randn(3, 4, 4).transpose(1, 2)
    else:
        b = torch.randn(3, 5)
    assert cpu_dense_loop.run(s0, W, b, out, 1, "tanh") is None
    assert torch.equal(out, torch.full((3, 2, 4), 7.0))


def mlp(depth, width, gain=0.5, act=nn.Tanh):
    return rolled_mlp(depth=depth, width=width, gain=gain, act=act, dtype=torch.float32)


def compiled_chain(model, x, **options):
    torch._dynamo.reset()
    backend = SeqparBackend({"sequential_form": "rolled", "inner": "eager", **options})
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        out = compiled(x)
    ((report, program),) = [item for graph in backend.graphs for item in graph.programs]
    return compiled, out, report, program


@pytest.mark.parametrize("activation", sorted(MODULES))
def test_a_contractive_chain_kept_sequential_for_cost_runs_the_compiled_loop(activation):
    model, x = mlp(96, 8, act=MODULES[activation]), torch.randn(4, 8)
    compiled, out, report, program = compiled_chain(model, x)
    assert report.method == "sequential" and (report.lyapunov or -1) < 0  # None: -inf (relu units off)
    assert call_state(program).last_stats.loop == "compiled" and "compiled C loop" in report.step_cost
    with torch.no_grad():
        exact, eager = model.double()(x.double()), model.float()(x)
    assert relative_error(out, exact) <= max(4 * relative_error(eager, exact), 1e-6)


def test_the_compiled_loop_reads_the_weights_of_this_call():
    model, x = mlp(96, 8), torch.randn(4, 8)
    compiled, _, _, program = compiled_chain(model, x)
    with torch.no_grad():
        for p in model.parameters():
            p.data.mul_(-1.5)
        out = compiled(x)
        torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
    assert call_state(program).last_stats.loop == "compiled"


def test_gradients_and_unpredictable_or_forced_chains_keep_eagers_kernels():
    x = torch.randn(4, 8)
    chaotic, width = mlp(96, 8, gain=3.0), 8
    _, out, report, program = compiled_chain(chaotic, x)
    assert report.lyapunov > 0 and call_state(program).last_stats.loop == "generated"
    with torch.no_grad():
        assert torch.equal(out, chaotic(x))  # bit for bit: eager's kernels in eager's order
    contractive = mlp(96, width)
    _, out, _, program = compiled_chain(contractive, x, policy="sequential")
    assert call_state(program).last_stats.loop == "generated"
    with torch.no_grad():
        assert torch.equal(out, contractive(x))
    compiled, _, _, program = compiled_chain(contractive, x)
    loss = compiled(x).square().sum()  # autograd records: the differentiable loop, eager's kernels
    loss.backward()
    grads = [p.grad.clone() for p in contractive.parameters()]
    contractive.zero_grad()
    contractive(x).square().sum().backward()
    for got, want in zip(grads, (p.grad for p in contractive.parameters())):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_a_large_step_keeps_eagers_kernels():
    """64 rows of 16 values: one BLAS call per step beats the plain C loop, which is not used there."""
    model, x = mlp(96, 16), torch.randn(64, 16)
    _, out, report, program = compiled_chain(model, x)
    assert report.method == "sequential" and call_state(program).last_stats.loop == "generated"
