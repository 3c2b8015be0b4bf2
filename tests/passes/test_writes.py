"""Per-step writes into one buffer (``out[:, t] = y_t``, ``out[t].copy_(y_t)``, ``out.index_copy_(1, i, y_t)``..)
moved after the loop, where nothing observes them.

Each case is checked twice: what the pass did to the graph (moved or left),
and that the compiled model equals eager in float64 (1e-9 absolute, as the
zoo: the moved writes are the same values; a parallel solve of at most 16
steps stops at a relative update of 1e-10), gradients included.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import seqpar
from seqpar.passes.effects import mutates
from seqpar.passes.writes import sink_buffer_writes
from tests.e2e.test_backend import F64_ATOL, chain_reports, compile_with

STEPS = 16


def setitem(out, t, y):
    out[:, t] = y


def setitem_index_tensor(out, t, y):
    out[:, torch.tensor([t])] = y.unsqueeze(1)


def setitem_ellipsis(out, t, y):
    out[..., t, :] = y


def setitem_0d_tensor(out, t, y):
    out[torch.tensor(t)] = y


def setitem_list(out, t, y):
    out[[t]] = y.unsqueeze(0)


def setitem_or_copy(out, t, y):
    if t % 2:
        out[:, t].copy_(y)
    else:
        out[:, t] = y


# How step t writes its readout y (batch, 3) into the buffer, one graph form each: name -> (the buffer's time
# dim, the write).
MOVED_FORMS = {
    "setitem": (1, setitem),
    "copy_": (0, lambda out, t, y: out[t].copy_(y)),
    "copy_dim1": (1, lambda out, t, y: out[:, t].copy_(y)),
    "copy_select": (1, lambda out, t, y: out.select(1, t).copy_(y)),
    "copy_narrow": (1, lambda out, t, y: out.narrow(1, t, 1).copy_(y.unsqueeze(1))),
    "aten_copy_": (1, lambda out, t, y: torch.ops.aten.copy_.default(out[:, t], y)),
    "index_put_": (0, lambda out, t, y: out.index_put_((torch.tensor([t]),), y.unsqueeze(0))),
    "setitem_index_tensor": (1, setitem_index_tensor),
    "index_copy_": (1, lambda out, t, y: out.index_copy_(1, torch.tensor([t]), y.unsqueeze(1))),
    "index_copy_full": (1, lambda out, t, y: out.index_copy_(1, torch.full((1,), t), y.unsqueeze(1))),
    "index_copy_arange": (1, lambda out, t, y: out.index_copy_(1, torch.arange(STEPS)[t:t + 1], y.unsqueeze(1))),
    "setitem_or_copy": (1, setitem_or_copy),
}
# More spellings of the same writes, checked on the graph alone.
SPELLINGS = {
    "setitem_ellipsis": (1, setitem_ellipsis),
    "setitem_0d_tensor": (0, setitem_0d_tensor),
    "setitem_list": (0, setitem_list),
    "copy_trailing_slice": (1, lambda out, t, y: out[:, t, :].copy_(y, non_blocking=False)),
    "copy_select_keywords": (1, lambda out, t, y: torch.select(out, dim=1, index=t).copy_(y)),
    "copy_narrow_from_the_end": (1, lambda out, t, y: out.narrow(1, t - STEPS, 1).copy_(y.unsqueeze(1))),
    "index_put_function_arange_item": (0, lambda out, t, y: torch.index_put_(out, (torch.arange(STEPS)[t],), y)),
    "index_copy_0d": (1, lambda out, t, y: out.index_copy_(1, torch.tensor(t), y.unsqueeze(1))),
}
LEFT_FORMS = {
    "index_put_accumulate": (0, lambda out, t, y: out.index_put_((torch.tensor([t]),), y.unsqueeze(0),
                                                                  accumulate=True)),
    "index_from_data": (1, lambda out, t, y: out.index_copy_(1, (y[:1, 0] * 0).long() + t, y.unsqueeze(1))),
}
FORMS = {**MOVED_FORMS, **SPELLINGS, **LEFT_FORMS}


class BufferRNN(nn.Module):
    """A GRU cell over time writing each readout into a preallocated buffer (in the way ``form`` names);
    ``order`` says where step ``t`` writes, ``observe`` makes every step read the buffer, ``after`` changes the
    value after its write, ``broadcast`` writes one row into the slot of all, ``keep_views`` keeps the view each
    write goes through (``buf[:, t]``) and returns them; ``dtype`` is the buffer's."""

    def __init__(self, form="setitem", order="forward", observe=False, after=False, broadcast=False,
                 keep_views=False, dtype=None):
        super().__init__()
        self.cell, self.readout = nn.GRUCell(4, 8), nn.Linear(8, 3)
        (self.time_dim, self.write), self.dtype = FORMS[form], dtype
        self.order, self.observe, self.after, self.broadcast, self.keep_views = (order, observe, after, broadcast,
                                                                                 keep_views)

    def forward(self, x):
        steps = x.shape[1]
        shape = (steps, x.shape[0], 3) if self.time_dim == 0 else (x.shape[0], steps, 3)
        h, out, views = x.new_zeros(x.shape[0], 8), x.new_zeros(shape, dtype=self.dtype), []
        for t in range(steps):
            h = self.cell(x[:, t], h)
            if self.observe:
                h = h * out.mean()
            y = self.readout(h)
            slot = t if self.order == "forward" else steps - 1 - t
            if self.keep_views:
                views.append(out[:, slot])
                views[-1].copy_(y)
            else:
                self.write(out, slot, y[:1] if self.broadcast else y)
            if self.after:
                y.mul_(2)
                h = h + y.sum()
        return (out, views) if self.keep_views else out


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
    return [node for node in gm.graph.nodes if mutates(node)]


def case(seed=0, **kind):
    torch.manual_seed(seed)
    return BufferRNN(**kind).double(), torch.randn(2, STEPS, 4, dtype=torch.float64)


def assert_moved_into_one_write_of_the_same_values(model, x):
    gm, inputs = captured(model, x)
    with torch.no_grad():
        before = gm(*inputs)
    assert len(writes_in(gm)) == STEPS
    assert sink_buffer_writes(gm) == 1
    (write,) = writes_in(gm)
    assert write.args[2].target in (torch.stack, torch.cat)
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), before, atol=0, rtol=0)  # the same values, moved


@pytest.mark.parametrize("form, order", [("setitem", "backward"), *[(form, "forward") for form in MOVED_FORMS]])
def test_writes_nothing_observes_become_one_write_of_the_stacked_values(form, order):
    model, x = case(form=form, order=order)
    assert_moved_into_one_write_of_the_same_values(model, x)
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


@pytest.mark.parametrize("form", SPELLINGS)
def test_other_spellings_of_a_slot_write_are_moved_too(form):
    assert_moved_into_one_write_of_the_same_values(*case(form=form))


LEFT = {
    "buffer_read_between_writes": {"observe": True},
    "buffer_read_between_copies": {"observe": True, "form": "copy_dim1"},
    "buffer_read_between_index_copies": {"observe": True, "form": "index_copy_"},
    "value_changed_after_its_write": {"after": True},
    "broadcast_write": {"broadcast": True},
    "broadcast_copy": {"broadcast": True, "form": "copy_dim1"},
    "view_kept_and_read_later": {"keep_views": True},
    "index_put_accumulates": {"form": "index_put_accumulate"},
    "index_computed_from_data": {"form": "index_from_data"},
}


@pytest.mark.parametrize("kind", LEFT.values(), ids=LEFT.keys())
def test_writes_that_could_be_observed_stay_and_the_model_stays_exact(kind):
    model, x = case(**kind)
    gm, _ = captured(model, x)
    before = len(writes_in(gm))
    assert sink_buffer_writes(gm) == 0 and len(writes_in(gm)) == before
    compiled, backend = compile_with(model, policy="parallel")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=F64_ATOL, rtol=0)
    assert all(chain.decision == "rejected" for chain in chain_reports(backend))


def test_a_copy_that_converts_the_dtype_is_moved_and_converts_the_same_numbers():
    # A float64 recurrence into a float32 buffer: copy_ rounds each value; the moved write rounds the same
    # values, so the graph's output is bit-equal, and the compiled model's at most one float32 ulp from eager's
    # (its values differ from eager's by 1e-9 before rounding).
    model, x = case(form="copy_dim1", dtype=torch.float32)
    assert_moved_into_one_write_of_the_same_values(model, x)
    compiled, backend = compile_with(model, policy="parallel")
    with torch.no_grad():
        got, want = compiled(x), model(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0, rtol=2.0 ** -23)
    (chain,) = chain_reports(backend)
    assert (chain.decision, chain.outputs) == ("parallel", 1)


def test_through_the_registered_backend_the_copied_readouts_are_one_parallel_chain_output():
    model, x = case(form="copy_")
    options = {"policy": "parallel", "min_chain": 4}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="seqpar", options=options)
    x = x.clone().requires_grad_()
    got, want = compiled(x), model(x)
    torch.testing.assert_close(got, want, atol=F64_ATOL, rtol=0)
    weights = torch.randn(want.shape, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad((weights * got).sum(), x)[0],
                               torch.autograd.grad((weights * want).sum(), x)[0], atol=F64_ATOL, rtol=0)
    (chain,) = seqpar.explain(model, x, options=options).chains
    assert (chain.decision, chain.outputs) == ("parallel", 1)


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


def test_an_index_copy_at_a_negative_position_stays_and_still_raises():
    def fill(x):
        out = x.new_zeros(x.shape)
        for t in range(x.shape[1]):
            out.index_copy_(1, torch.tensor([t - x.shape[1]]), x[:, t:t + 1] * 2)
        return out

    graphs = []
    torch._dynamo.reset()
    with pytest.raises(IndexError, match="out of bounds"):
        torch.compile(fill, backend=lambda gm, _: graphs.append(gm) or gm)(torch.randn(2, 6, 3))
    (gm,) = graphs
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
