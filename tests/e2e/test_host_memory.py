"""The speed trial's original call on a CPU where host memory is short (seqpar.memory, seqpar.backend).

Memory is not exhausted here: ``available_bytes`` is replaced by a reading that is below the reserve, as the
kernel would report it with the machine nearly full. Values and gradients against eager in float64 (F64_ATOL
as in test_backend).
"""

import gc
import weakref

import pytest
import torch

from seqpar import memory

from .test_backend import compile_with
from .test_out_of_memory import CountingStack
from .test_speed_trial import fake_clock, rolled_chain, training_step


def test_the_bound_counts_every_computed_tensor_but_views_twice():
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.graph)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(lambda x: (x * 2).sin().view(-1).t(), backend=capture)(torch.randn(4, 8, dtype=torch.float64))
    assert memory.training_bound(graphs[0]) == 2 * (32 + 32) * 8  # mul and sin; view and t share sin's storage


def test_only_host_tensors_count_in_the_bound_and_in_what_is_saved(monkeypatch):
    graph = torch.fx.symbolic_trace(lambda x: (x * 2).sin()).graph
    for node, device in zip(graph.nodes, ["cpu", "meta", "cpu", "cpu"]):  # x, mul (on a device), sin, output
        node.meta["example_value"] = torch.empty(4, 8, dtype=torch.float64, device=device)
    assert memory.training_bound(graph) == 2 * 32 * 8  # sin's value alone
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**40)
    on_device = torch.randn(64, device="meta", requires_grad=True)
    with memory.HeadroomGuard(2**40, []) as guard:
        on_device.exp().sum()  # saves exp's output, on the (meta) device
    assert guard.saved == 0


def test_the_guard_counts_each_saved_storage_once_and_not_the_inputs(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**40)
    x = torch.randn(64, 64, dtype=torch.float64, requires_grad=True)
    with memory.HeadroomGuard(2**40, [x]) as guard:
        y = x.exp()  # saves its result y
        z = y.sin()  # saves y again
        (z * x).sum()  # saves z and the input x
    assert guard.saved == 2 * 64 * 64 * 8


def test_under_the_guard_autograd_gives_its_gradients_its_errors_and_frees_what_it_saved(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**40)
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def f(x):
        return (x.exp().sin() * x).tanh().sum()

    gradient, = torch.autograd.grad(f(x), x, create_graph=True)
    second, = torch.autograd.grad(gradient.sum(), x)
    with memory.HeadroomGuard(2**40, [x]):
        guarded, = torch.autograd.grad(f(x), x, create_graph=True)
        guarded_second, = torch.autograd.grad(guarded.sum(), x)
        y = x.exp()  # saves its output y
        z = y.sin()
        kept = weakref.ref(y)
        y.add_(1)
    torch.testing.assert_close((guarded, guarded_second), (gradient, second), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()  # as eager: y changed since it was saved
    collecting = gc.isenabled()
    gc.disable()
    try:
        del y, z
        assert kept() is None  # no reference cycle through the saved output: freed without the garbage collector
    finally:
        if collecting:
            gc.enable()


def test_a_sparse_tensor_saved_under_the_guard_is_kept_and_differentiated(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**40)
    monkeypatch.setattr(memory, "CHECK_EVERY", 1)
    sparse = torch.randn(4, 4, dtype=torch.float64).to_sparse().requires_grad_()
    dense = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    expected = torch.autograd.grad(torch.sparse.mm(sparse, dense).sin().sum(), dense)
    with memory.HeadroomGuard(2**40, [dense]) as guard:
        out = torch.sparse.mm(sparse, dense).sin().sum()
    torch.testing.assert_close(torch.autograd.grad(out, dense), expected, atol=0, rtol=0)
    assert guard.saved == 4 * 3 * 8  # the product, saved by sin; the sparse input has no storage to count


def test_the_memory_available_is_read_on_this_machine():
    available = memory.available_bytes()
    with open("/proc/meminfo") as meminfo:
        total = int(meminfo.readline().split()[1]) * 1024  # MemTotal, the first line
    assert 0 < available <= total


def test_a_call_that_fits_runs_unguarded(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**33)
    x = torch.randn(4, 4)
    assert memory.headroom_guard(2**32, [x]) is None  # 4 GiB of 8, less the 1 GiB reserve
    assert isinstance(memory.headroom_guard(2**33 - 2**29, [x]), memory.HeadroomGuard)


@pytest.mark.parametrize("when", ["during its forward", "at its forward's end"])
def test_an_original_call_short_of_host_memory_stops_and_the_rewrite_is_kept(monkeypatch, when):
    # 1 MiB available, under the 512 MiB reserve: the guard stops the call at its first check.
    ran = fake_clock(monkeypatch, original_seconds=1.0, rewritten_seconds=2.0,  # the original would win
                     backward_seconds={"original": 1.0, "rewritten": 2.0})
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**20)
    if when == "during its forward":
        monkeypatch.setattr(memory, "CHECK_EVERY", 1)
    model, inputs = rolled_chain()
    compiled, backend = compile_with(model)
    for _ in range(5):
        training_step(compiled, model, inputs)
    graph = backend.graphs[0]
    assert ran == ["rewritten", "original"]  # timed calls: the stopped one computed by the rewrite, then no more
    assert graph.speed.kept == "rewritten" and not graph.fell_back
    assert ("speed trial stopped: the original graph ran out of memory at call 3 (OutOfHeadroom: host memory: "
            "0.00 GiB available after") in graph.chains[0].reason
    assert "under the 0.50 GiB kept for it): the rewritten graph runs from then on" in graph.chains[0].reason


def test_an_original_that_could_not_run_again_is_not_called_where_memory_is_short(monkeypatch):
    ran = fake_clock(monkeypatch, original_seconds=1.0, rewritten_seconds=2.0,
                     backward_seconds={"original": 1.0, "rewritten": 2.0})
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**20)
    torch.manual_seed(0)
    model = CountingStack(depth=64).double().eval()  # rolled, as rolled_chain
    compiled, backend = compile_with(model)
    eager = CountingStack(depth=64).double().eval()
    eager.load_state_dict(model.state_dict())
    x = torch.randn(8, 4, dtype=torch.float64)
    for _ in range(5):
        training_step(compiled, eager, [x])
    graph = backend.graphs[0]
    assert "original" not in ran and graph.speed.kept == "rewritten"
    assert model.calls.item() == eager.calls.item() == 5  # each call counted once
    reason = graph.chains[0].reason
    assert ("speed trial stopped: the original graph was not run: it may need up to 0.00 GiB of host memory, with "
            "0.00 GiB available and 0.50 GiB of it kept for the backward, and a call stopped part-way could not run "
            "again (iadd (iadd) writes in place to the graph's input") in reason
    assert reason.endswith("): the rewritten graph runs from then on")
