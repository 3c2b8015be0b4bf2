"""A call that runs out of memory: the rewritten graph hands the graph back to the original, an original graph
that runs out in the speed trial ends the trial, and a graph that cannot run again passes the error on
(seqpar.backend, seqpar.passes.rerun).

Memory is not exhausted here: the chain op's Newton solve (or the speed trial's call of the original graph)
raises ``torch.OutOfMemoryError`` as an allocator does. Values and gradients against eager in float64
(F64_ATOL as in test_backend).
"""

import logging

import pytest
import torch
import torch.fx as fx

from seqpar.passes.effects import BATCHNORM_TRAINING
from seqpar.passes.rerun import rerun_hazard
from seqpar.testing import models as zoo

from .test_backend import F64_ATOL, compile_with, to_double
from .test_speed_trial import fake_clock, rolled_chain


def out_of_memory_in_newton(monkeypatch) -> list:
    """Make every Newton solve of a chain op raise ``torch.OutOfMemoryError``; returns the list of raised calls."""
    raised = []

    def newton_solve(*args, **kwargs):
        raised.append(args)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr("seqpar.runtime.ops.newton_solve", newton_solve)
    return raised


def test_a_rewritten_graph_out_of_memory_runs_the_original_from_then_on(monkeypatch, caplog):
    raised = out_of_memory_in_newton(monkeypatch)
    model, (x,) = to_double(*zoo.deep_mlp(depth=16, width=4))
    compiled, backend = compile_with(model, policy="parallel")
    with caplog.at_level(logging.WARNING, logger="seqpar"):
        for _ in range(3):
            x_compiled, x_eager = x.clone().requires_grad_(), x.clone().requires_grad_()
            out, expected = compiled(x_compiled), model(x_eager)
            torch.testing.assert_close(out, expected, atol=F64_ATOL, rtol=0)
            out.square().sum().backward()
            expected.square().sum().backward()
            torch.testing.assert_close(x_compiled.grad, x_eager.grad, atol=F64_ATOL, rtol=0)
    assert len(raised) == 1  # the chain op is not called again
    graph = backend.graphs[0]
    assert graph.fell_back
    why = "the rewritten graph ran out of memory at call 1 (OutOfMemoryError: CUDA out of memory."
    assert why in graph.chains[0].reason and "original graph used" in graph.chains[0].reason
    assert why in caplog.text and "running the original graph from now on" in caplog.text


def test_an_original_graph_out_of_memory_in_the_speed_trial_keeps_the_rewrite(monkeypatch):
    ran = fake_clock(monkeypatch, original_seconds=1.0, rewritten_seconds=2.0)  # the original would win

    def timed_call(function, args):
        if isinstance(function, fx.GraphModule):
            ran.append("original")
            raise torch.OutOfMemoryError("CPU out of memory")
        ran.append("rewritten")
        return function(*args), 2.0

    monkeypatch.setattr("seqpar.backend.timed_call", timed_call)
    model, inputs = rolled_chain()
    compiled, backend = compile_with(model)
    with torch.no_grad():
        for _ in range(5):
            torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=F64_ATOL, rtol=0)
    graph = backend.graphs[0]
    assert ran == ["rewritten", "original"] and graph.speed.kept == "rewritten" and not graph.fell_back
    assert ("speed trial stopped: the original graph ran out of memory at call 3 (OutOfMemoryError: CPU out of "
            "memory): the rewritten graph runs from then on") in graph.chains[0].reason


class CountingStack(torch.nn.Module):
    """A deep tanh MLP (``depth`` layers of width 4) that counts its calls in a buffer, in place: a call stopped
    part-way has changed it."""

    def __init__(self, depth: int = 16):
        super().__init__()
        self.stack = zoo.deep_mlp(depth=depth, width=4)[0]
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        self.calls += 1
        return self.stack(x)


def test_a_graph_that_writes_its_inputs_passes_the_error_on(monkeypatch, caplog):
    raised = out_of_memory_in_newton(monkeypatch)
    model = CountingStack().double()
    compiled, backend = compile_with(model, policy="parallel")
    with caplog.at_level(logging.WARNING, logger="seqpar"), pytest.raises(torch.OutOfMemoryError):
        compiled(torch.randn(4, 4, dtype=torch.float64))
    assert len(raised) == 1 and not backend.graphs[0].fell_back
    assert "ran out of memory at call 1" in caplog.text and "cannot run again" in caplog.text
    assert "writes in place to the graph's input" in caplog.text


def traced(fn, *args) -> fx.Graph:
    """The graph Dynamo traces for ``fn(*args)`` (one graph)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.graph)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, fullgraph=True)(*args)
    assert len(graphs) == 1
    return graphs[0]


def fill_own_buffer(x):
    out = torch.zeros_like(x)
    for t in range(x.shape[1]):
        out[:, t] = x[:, t] * 2
    out.add_(1)
    return out


def test_a_graph_that_writes_only_tensors_it_made_may_run_again():
    assert rerun_hazard(traced(fill_own_buffer, torch.randn(2, 5))) is None


@pytest.mark.parametrize("fn, hazard", [
    (lambda x: x.add_(1) * 2, "writes in place to the graph's input"),
    (lambda x: x[:, 0].mul_(3).sum(), "writes in place to the graph's input"),
    (lambda x: x + torch.randn_like(x), "draws random numbers"),
    (lambda x: torch.nn.functional.batch_norm(x, torch.zeros(5), torch.ones(5), training=True), BATCHNORM_TRAINING),
])
def test_a_graph_with_a_trace_of_a_stopped_call_may_not_run_again(fn, hazard):
    assert hazard in rerun_hazard(traced(fn, torch.randn(2, 5)))


def test_a_write_to_a_parameter_is_a_hazard():
    layer = torch.nn.Linear(5, 5).requires_grad_(False)

    def step(x):
        layer.weight.mul_(0.5)
        return layer(x)

    assert "writes in place to the graph's input" in rerun_hazard(traced(step, torch.randn(2, 5)))


def test_a_grad_mode_switch_is_a_hazard():
    # A call stopped inside ``torch.no_grad()`` leaves grad mode off: the graph has no ``finally``.
    def step(x):
        with torch.no_grad():
            y = x * 2
        return x * y

    assert "changes global state" in rerun_hazard(traced(step, torch.randn(2, 5, requires_grad=True)))
