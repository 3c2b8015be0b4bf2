"""The rolled form: a chain kept sequential runs its steps as one generated loop inside the chain op.

The loop is the step's aten calls written out (``seqpar.runtime.rolled``): the
same kernels on the same values as the eager loop, so the states are eager's
bit for bit where the ops are (an ``nn.Sequential`` of ``Linear`` and an
activation), which a chaotic chain, kept sequential because rounding grows
there, needs; everywhere else equal to float64 rounding. The layer parameters
are read where they are on every call (no stack, no cache), so updates
through ``p.data`` are seen.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

import seqpar
from seqpar.backend import SeqparBackend
from seqpar.runtime import ops, rolled, solve_chain
from seqpar.runtime.ops import call_state
from seqpar.testing import models as zoo

F64_ATOL = 1e-12
ROLLED = {"policy": "sequential", "sequential_form": "rolled", "min_chain": 4, "inner": "eager"}


def compile_rolled(model, **options):
    torch._dynamo.reset()
    backend = SeqparBackend({**ROLLED, **options})
    return torch.compile(model, backend=backend), backend


def mlp(depth=32, width=8, gain=1.0, act=nn.Tanh, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        linear = nn.Linear(width, width)
        nn.init.normal_(linear.weight, std=gain / width**0.5)
        layers += [linear, act()]
    return nn.Sequential(*layers).to(dtype).eval()


def the_program(backend):
    ((report, program),) = [item for graph in backend.graphs for item in graph.programs]
    return report, program


def test_kept_sequential_mlp_runs_the_generated_loop_and_equals_eager():
    model = mlp()
    x = torch.randn(4, 8, dtype=torch.float64)
    compiled, backend = compile_rolled(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=F64_ATOL, rtol=0)
    report, program = the_program(backend)
    assert (report.form, report.method) == ("rolled", "sequential")
    assert call_state(program).last_stats.loop == "generated" and call_state(program).last_stats.seconds > 0


@pytest.mark.parametrize("act, gain", [(nn.Tanh, 3.0), (nn.Sigmoid, 8.0), (nn.GELU, 1.0), (nn.ReLU, 1.0),
                                       (nn.SiLU, 1.5)])
def test_kept_sequential_chain_is_eager_bit_for_bit_in_float32(act, gain):
    # Near-neutral or chaotic chains (Tanh at gain 3): rounding differences grow like exp(lambda l), so only
    # the same kernels in the same order agree after 256 layers. A chain kept sequential because it was asked
    # for (or because the probe found it unpredictable: tests/runtime/test_dense_loop.py) runs eager's kernels.
    model = mlp(depth=256, width=8, gain=gain, act=act, dtype=torch.float32)
    x = torch.randn(1, 8)
    compiled, backend = compile_rolled(model)
    with torch.no_grad():
        expected = model(x)
        assert torch.isfinite(expected).all() and torch.equal(compiled(x), expected)
    report, program = the_program(backend)
    assert (report.method, report.form) == ("sequential", "rolled")
    assert call_state(program).last_stats.loop == "generated"


def test_gradients_through_the_rolled_form_equal_eager():
    model = mlp(depth=24)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    compiled, _ = compile_rolled(model)
    got = torch.autograd.grad(compiled(x).square().sum(), [x, *model.parameters()])
    want = torch.autograd.grad(model(x).square().sum(), [x, *model.parameters()])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=F64_ATOL, rtol=0)


@pytest.mark.parametrize("adjoint", ["sequential", "parallel"])
def test_frozen_layers_get_no_gradient_and_the_others_eager_gradients(adjoint):
    model = mlp(depth=16)
    for index, parameter in enumerate(model.parameters()):
        parameter.requires_grad_(index % 4 != 0)  # every other layer's weight frozen
    x = torch.randn(3, 8, dtype=torch.float64)
    compiled, _ = compile_rolled(model, policy="auto", adjoint=adjoint)
    trained = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(compiled(x).square().sum(), trained)
    want = torch.autograd.grad(model(x).square().sum(), trained)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=0)
    assert all(p.grad is None for p in model.parameters())


def test_in_place_updates_through_p_data_are_seen_on_the_next_call():
    model = mlp(depth=16)
    x = torch.randn(4, 8, dtype=torch.float64)
    compiled, _ = compile_rolled(model)
    with torch.no_grad():
        compiled(x)
        for parameter in model.parameters():
            parameter.data.mul_(0.5)  # leaves _version alone
        torch.testing.assert_close(compiled(x), model(x), atol=F64_ATOL, rtol=0)
        model[4].weight.data.copy_(torch.randn(8, 8, dtype=torch.float64))
        torch.testing.assert_close(compiled(x), model(x), atol=F64_ATOL, rtol=0)


def test_optimizer_steps_are_seen_by_the_rolled_form():
    model, eager_model = mlp(depth=16), mlp(depth=16)
    x = torch.randn(4, 8, dtype=torch.float64)
    compiled, _ = compile_rolled(model)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, eager_model)]
    for _ in range(3):
        for net, optimizer in zip((compiled, eager_model), optimizers):
            optimizer.zero_grad()
            net(x).square().sum().backward()
            optimizer.step()
    torch.testing.assert_close(compiled(x), eager_model(x), atol=1e-10, rtol=0)


ZOO = {
    "gelu_mlp": lambda: zoo.deep_mlp(depth=12, width=8, act="gelu"),
    "mlp_layernorm": lambda: zoo.mlp_layernorm(),
    "mlp_sequence_input": lambda: zoo.deep_mlp(depth=8, width=6, seq=5),
    "modulelist": lambda: zoo.modulelist_mlp(),
    "stacked_mlp": lambda: zoo.stacked_mlp(),
    "residual_mlp": lambda: zoo.residual_mlp(),
    "conv_resnet": lambda: zoo.conv_resnet(),
    "preln_transformer": lambda: zoo.preln_transformer(),
    "transformer_encoder": lambda: zoo.transformer_stack(),
    "gru_cell": lambda: zoo.gru_cell_loop(),
    "hand_lstm": lambda: zoo.hand_lstm(),
    "weight_tied": lambda: zoo.weight_tied_loop(),
    "scanned_mlp": lambda: zoo.scanned_mlp(),
    "scan_lstm": lambda: zoo.scan_lstm(),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_in_the_rolled_form_equals_eager_with_gradients_in_float64(name):
    model, inputs = ZOO[name]()
    model = model.double()
    inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    compiled, backend = compile_rolled(model)
    torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=1e-10, rtol=0)
    got = torch.autograd.grad(compiled(*inputs).square().sum(), list(model.parameters()))
    want = torch.autograd.grad(model(*inputs).square().sum(), list(model.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=0)
    programs = [program for graph in backend.graphs for _, program in graph.programs]
    assert programs and all(call_state(program).last_stats.loop == "generated" for program in programs)


def test_a_step_the_generator_cannot_write_out_calls_the_step_and_says_why(monkeypatch):
    def refuse(*args):
        raise ValueError("no such op")

    monkeypatch.setattr(rolled, "generate_loop", refuse)
    model = mlp(depth=8)
    x = torch.randn(4, 8, dtype=torch.float64)
    compiled, backend = compile_rolled(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=F64_ATOL, rtol=0)
    _, program = the_program(backend)
    assert call_state(program).last_stats.loop == "step calls"
    (loop,) = rolled.loops(program).values()
    assert loop.reason == "ValueError: no such op"


def weight_tied_step(s, x, W):
    return torch.tanh(s @ W.T + x)


def test_recorded_sequential_loop_has_the_plain_loops_values_and_gradients():
    # run_steps under autograd (create_graph=True, the float64 reference): the loop without out= buffers.
    torch.manual_seed(1)
    W = (0.5 * torch.randn(5, 5, dtype=torch.float64)).requires_grad_()
    s0 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    xs = torch.randn(20, 3, 5, dtype=torch.float64)
    states = solve_chain(weight_tied_step, s0, xs, (W,), forward="sequential", adjoint="sequential")
    state, expected = s0, []
    for x in xs:
        state = weight_tied_step(state, x, W)
        expected.append(state)
    expected = torch.stack(expected)
    torch.testing.assert_close(states, expected, atol=F64_ATOL, rtol=0)
    (gW,) = torch.autograd.grad(states.square().sum(), [W], create_graph=True)
    (wW,) = torch.autograd.grad(expected.square().sum(), [W], create_graph=True)
    torch.testing.assert_close(gW, wW, atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.autograd.grad(gW.sum(), [s0])[0], torch.autograd.grad(wW.sum(), [s0])[0],
                               atol=1e-10, rtol=0)


def tied_step(s, x, W):
    return torch.tanh(s @ W.T + x)


def test_the_generated_loop_computes_loop_invariant_nodes_once():
    # A weight-tied step reads one W every step: W^T is taken once, before the loop.
    s0, xs, W = torch.randn(3, 5, dtype=torch.float64), torch.randn(20, 3, 5, dtype=torch.float64), torch.randn(5, 5)
    states = solve_chain(tied_step, s0, xs, (W.double(),), forward="sequential")
    expected = s0
    for x in xs:
        expected = tied_step(expected, x, W.double())
    torch.testing.assert_close(states[-1], expected, atol=F64_ATOL, rtol=0)
    (program, *_) = [program for program in ops._PROGRAMS.values() if program.step is tied_step]
    (loop,) = rolled.loops(program).values()
    before, body = loop.source.split("def rolled_into")[0].split("for l in range")
    assert re.search(r"= _c\d+\(sh0[,)]", before) and "sh0" not in body


def test_explain_says_which_form_runs_and_what_a_step_costs():
    model = mlp(depth=64, width=16)
    report = seqpar.explain(model, torch.randn(16, 16, dtype=torch.float64), options={"policy": "sequential"})
    (chain,) = report.chains
    assert chain.form == "rolled"
    assert "us per step" in chain.step_cost and "measured" in chain.step_cost and "generated loop" in chain.step_cost
    assert "us per step" in str(report)


def binding_examples():
    """Arguments for every aten overload the generated loop calls through a ``torch`` binding."""
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    a, W, b = r(4, 8), r(8, 8), r(8)
    return {
        "mm": (a, W), "addmm": (b, a, W), "bmm": (r(2, 4, 8), r(2, 8, 8)), "matmul": (r(2, 4, 8), W),
        "linear": (a, W, b), "conv2d": (r(1, 2, 5, 5), r(3, 2, 3, 3), r(3)),
        "layer_norm": (a, [8], r(8), r(8), 1e-5), "batch_norm": (a, r(8), r(8), r(8), r(8).abs(), False, 0.1, 1e-5, False),
        "softmax": (a, -1), "tanh": (a,), "sigmoid": (a,), "relu": (a,), "gelu": (a,), "silu": (a,),
        "add": (a, r(4, 8)), "sub": (a, r(4, 8)), "mul": (a, r(4, 8)), "t": (W,), "permute": (a, [1, 0]),
        "transpose": (a, 0, 1), "reshape": (a, [8, 4]), "view": (a, [8, 4]), "chunk": (a, 2, -1), "cat": ([a, W], 0),
    }


@pytest.mark.parametrize("overload", sorted(rolled.BINDINGS, key=str), ids=str)
def test_each_torch_binding_the_loop_calls_computes_its_aten_overload(overload):
    name = overload.overloadpacket.__name__
    args = binding_examples()[name.rstrip("_")]
    binding = rolled.BINDINGS[overload]

    def call(fn):
        copied = [arg.clone() if isinstance(arg, torch.Tensor) else arg for arg in args]
        if overload._overloadname == "out":
            out = torch.empty(0)
            return fn(*copied, out=out), out
        result = fn(*copied)
        return result, copied[0]  # an in-place op's result is its first argument

    (want, want_first), (got, got_first) = call(overload), call(binding)
    for w, g in zip(torch.utils._pytree.tree_leaves((want, want_first)), torch.utils._pytree.tree_leaves((got, got_first))):
        assert torch.equal(w, g)


def test_a_scan_kept_sequential_inside_an_inductor_graph_equals_eager():
    """The first call of an inductor graph runs the op inside aot_autograd's aliasing-check dispatch mode,
    where make_fx records nothing: the loop generated there returned the trace's fake constant (the call
    failed with "Cannot access data pointer"). Such a trace is refused and the loop generated on a later call."""
    torch.manual_seed(2)
    gru = nn.GRU(16, 16, batch_first=True).eval()
    x = torch.randn(1, 32, 16)
    torch._dynamo.reset()
    compiled = torch.compile(seqpar.scan_rnn(gru), backend="seqpar")
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(compiled(x)[0], gru(x)[0], atol=1e-5, rtol=1e-5)
