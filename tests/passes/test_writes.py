"""Per-step writes into one buffer (``out[:, t] = y_t``) moved after the loop, where nothing observes them.

Each case is checked twice: what the pass did to the graph (moved or left),
and that the compiled model equals eager in float64 (1e-9 absolute, as the
zoo: the moved writes are the same values; a parallel solve of at most 16
steps stops at a relative update of 1e-10), gradients included.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn

from seqpar.passes.writes import sink_buffer_writes
from tests.e2e.test_backend import F64_ATOL, chain_reports, compile_with


class BufferRNN(nn.Module):
    """A GRU cell over time writing each readout into a preallocated buffer; ``order`` says where step ``t``
    writes, ``observe`` makes every step read the buffer, ``after`` changes the value after its write."""

    def __init__(self, order="forward", observe=False, after=False, broadcast=False):
        super().__init__()
        self.cell, self.readout = nn.GRUCell(4, 8), nn.Linear(8, 3)
        self.order, self.observe, self.after, self.broadcast = order, observe, after, broadcast

    def forward(self, x):
        steps = x.shape[1]
        h, out = x.new_zeros(x.shape[0], 8), x.new_zeros(x.shape[0], steps, 3)
        for t in range(steps):
            h = self.cell(x[:, t], h)
            if self.observe:
                h = h * out.mean()
            y = self.readout(h)
            slot = t if self.order == "forward" else steps - 1 - t
            if self.broadcast:
                out[:, slot] = y[:1]
            else:
                out[:, slot] = y
            if self.after:
                y.mul_(2)
                h = h + y.sum()
        return out


def captured(model, x):
    """Dynamo's graph of ``model(x)`` and its inputs."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm

    torch._dynamo.reset()
    torch.compile(model, backend=backend)(x)
    (found,) = graphs
    return found


def writes_in(gm):
    return [node for node in gm.graph.nodes if node.op == "call_function" and node.target is operator.setitem]


def case(seed=0, **kind):
    torch.manual_seed(seed)
    return BufferRNN(**kind).double(), torch.randn(2, 12, 4, dtype=torch.float64)


@pytest.mark.parametrize("order", ["forward", "backward"])
def test_writes_nothing_observes_become_one_write_of_the_stacked_values(order):
    model, x = case(order=order)
    gm, inputs = captured(model, x)
    with torch.no_grad():
        before = gm(*inputs)
    assert len(writes_in(gm)) == 12
    assert sink_buffer_writes(gm) == 1
    (write,) = writes_in(gm)
    assert write.args[2].target is torch.stack
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), before, atol=0, rtol=0)  # the same values, moved
    compiled, backend = compile_with(model, policy="parallel")
    x = x.clone().requires_grad_()
    got, want = compiled(x), model(x)
    torch.testing.assert_close(got, want, atol=F64_ATOL, rtol=0)
    (chain,) = chain_reports(backend)
    assert (chain.kind, chain.decision, chain.outputs) == ("recurrent", "parallel", 1)
    weights = torch.randn(want.shape, dtype=torch.float64)
    wrt = [x, *model.parameters()]
    for got_grad, want_grad in zip(torch.autograd.grad((weights * got).sum(), wrt),
                                   torch.autograd.grad((weights * want).sum(), wrt), strict=True):
        torch.testing.assert_close(got_grad, want_grad, atol=F64_ATOL, rtol=0)


@pytest.mark.parametrize("kind", [{"observe": True}, {"after": True}, {"broadcast": True}],
                         ids=["buffer_read_between_writes", "value_changed_after_its_write", "broadcast_write"])
def test_writes_that_could_be_observed_stay_and_the_model_stays_exact(kind):
    model, x = case(**kind)
    gm, _ = captured(model, x)
    before = len(writes_in(gm))
    assert sink_buffer_writes(gm) == 0 and len(writes_in(gm)) == before
    compiled, backend = compile_with(model, policy="parallel")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=F64_ATOL, rtol=0)
    assert all(chain.decision == "rejected" for chain in chain_reports(backend))


def test_a_value_read_from_the_buffer_itself_stays():
    # The last write copies out[:, 0], which the first wrote: moved before the writes, it would copy zeros.
    def fill(x):
        out = x.new_zeros(x.shape)
        first = out[:, 0]
        for t in range(x.shape[1]):
            out[:, t] = x[:, t] * 2 if t < x.shape[1] - 1 else first
        return out

    gm, _ = captured(fill, torch.randn(2, 6, 3))
    assert sink_buffer_writes(gm) == 0 and len(writes_in(gm)) == 6


class TwoBuffers(nn.Module):
    """Each step writes its readout and its state into two buffers."""

    def __init__(self):
        super().__init__()
        self.cell, self.readout = nn.GRUCell(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        steps = x.shape[1]
        h = x.new_zeros(x.shape[0], 8)
        readouts, states = x.new_zeros(x.shape[0], steps, 3), x.new_zeros(steps, x.shape[0], 8)
        for t in range(steps):
            h = self.cell(x[:, t], h)
            readouts[:, t] = self.readout(h)
            states[t] = h
        return readouts, states


def test_every_buffer_written_per_step_is_moved_and_the_values_stay():
    torch.manual_seed(0)
    model, x = TwoBuffers().double(), torch.randn(2, 12, 4, dtype=torch.float64)
    gm, inputs = captured(model, x)
    with torch.no_grad():
        before = gm(*inputs)
    assert sink_buffer_writes(gm) == 2 and len(writes_in(gm)) == 2
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), before, atol=0, rtol=0)
    compiled, _ = compile_with(model, policy="parallel")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=F64_ATOL, rtol=0)
