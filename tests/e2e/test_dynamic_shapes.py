"""A compiled model called with a new batch size: Dynamo retraces with a symbolic batch dim, seqpar specialises.

Without specialising, the chains of the symbolic graph were rejected ("symbolic shape") and left unrolled to
the inner compiler (minutes of inductor for a long loop, no parallel solve). Values in float64 against eager
(the solver's stopping tolerance, 1e-12 of the states' scale over 64 contracting steps).
"""

import pytest
import torch

from seqpar.backend import PerShape, SeqparBackend


def recurrence(x, a, b):
    h, out = torch.zeros(x.shape[0], x.shape[2], dtype=x.dtype), []
    for t in range(x.shape[1]):
        h = torch.tanh(a * h + x[:, t] + b)
        out.append(h)
    return torch.stack(out, dim=1)


def inputs(batch, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 64, 4, generator=generator, dtype=torch.float64)
    return x, 0.5 * torch.rand(4, generator=generator, dtype=torch.float64), torch.randn(4, dtype=torch.float64)


def compiled(inner="eager"):
    torch._dynamo.reset()
    backend = SeqparBackend({"policy": "parallel", "inner": inner})
    return torch.compile(recurrence, backend=backend), backend


def test_a_new_batch_size_is_solved_in_parallel_at_its_static_shape():
    run, backend = compiled()
    for batch in (2, 5, 3):
        args = inputs(batch, seed=batch)
        torch.testing.assert_close(run(*args), recurrence(*args), rtol=0, atol=1e-12)
    assert [[(chain.decision, chain.state_shape) for chain in graph.chains] for graph in backend.graphs] == [
        [("parallel", (2, 4))], [("parallel", (5, 4))], [("parallel", (3, 4))]]


def test_a_shape_seen_before_reuses_its_compilation():
    run, backend = compiled()
    for batch in (2, 5, 5, 3, 5):
        run(*inputs(batch))
    assert len(backend.graphs) == 3  # 2 (static), then 5 and 3 once each through the symbolic graph


def test_gradients_through_the_specialised_graph_equal_eager():
    run, _ = compiled()
    run(*inputs(2))
    args = [tensor.requires_grad_() for tensor in inputs(6)]
    got = torch.autograd.grad(run(*args).square().sum(), args)
    want = torch.autograd.grad(recurrence(*args).square().sum(), args)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-11 * w.abs().max().item())


def test_inductor_compiles_each_specialisation():
    run, backend = compiled(inner="inductor")
    for batch in (2, 4):
        args = inputs(batch)
        torch.testing.assert_close(run(*args), recurrence(*args), rtol=0, atol=1e-12)
    assert [chain.decision for chain in backend.graphs[-1].chains] == ["parallel"]


def test_the_symbolic_graph_is_handed_to_the_per_shape_wrapper():
    backend = SeqparBackend({"inner": "eager"})
    graphs = []
    torch._dynamo.reset()
    run = torch.compile(recurrence, backend=lambda gm, example: graphs.append(backend(gm, example)) or graphs[-1])
    run(*inputs(2))
    run(*inputs(3))
    assert isinstance(graphs[-1], PerShape)


def test_a_symbolic_graph_without_chains_goes_to_the_inner_backend_as_it_is():
    backend = SeqparBackend({"inner": "eager"})
    graphs = []
    torch._dynamo.reset()
    run = torch.compile(lambda x: torch.tanh(x) * 2, backend=lambda gm, example: graphs.append(backend(gm, example))
                        or graphs[-1])
    for batch in (2, 3, 4):
        x = torch.randn(batch, 5)
        torch.testing.assert_close(run(x), torch.tanh(x) * 2)
    assert len(graphs) == 2 and not isinstance(graphs[-1], PerShape)  # one symbolic graph serves batch 3 and 4


def short_recurrence(x, a, b):
    """``recurrence`` over the first 12 steps: a chain shorter than any length from which a CPU solves or rolls one."""
    return recurrence(x[:, :12], a, b)


@pytest.mark.parametrize("options, specialised", [
    ({"policy": "auto"}, False),
    ({"policy": "sequential", "sequential_form": "unrolled"}, False),
    ({"policy": "parallel"}, True),
])
def test_a_symbolic_graph_whose_chains_no_size_would_rewrite_keeps_its_symbolic_sizes(inner_compiles, options,
                                                                                       specialised):
    """GPT-2's generation with a growing cache: Dynamo traces the step with a symbolic cache length, and its 12
    blocks are kept in the graph at every size. Specialised, each length cost a compile of its own (seconds a
    token) and, past 8 lengths, ran eager's kernels; inductor alone compiles the symbolic graph once."""
    backend = SeqparBackend({"inner": "inductor", **options})
    graphs = []
    torch._dynamo.reset()
    run = torch.compile(short_recurrence,
                        backend=lambda gm, example: graphs.append(backend(gm, example)) or graphs[-1])
    for batch in (2, 3, 4, 5):
        args = inputs(batch)
        torch.testing.assert_close(run(*args), short_recurrence(*args), rtol=0, atol=1e-12)
    assert isinstance(graphs[-1], PerShape) == specialised
    if not specialised:
        # Dynamo's first graph, then its symbolic one for batch 3, 4 and 5
        assert [symbolic for _, symbolic in inner_compiles] == [False, True]



def forty_steps(x, a, b):
    """``recurrence`` over 40 steps: its adjoint would be solved in parallel on a CPU (from 32 steps), its forward
    neither solved nor rolled (from 64)."""
    return recurrence(x[:, :40], a, b)


@pytest.mark.parametrize("differentiated", [False, True])
def test_an_inference_graph_keeps_its_symbolic_sizes_below_the_forward_lines(inner_compiles, differentiated):
    """Generation through a 24- to 48-block transformer (GPT-2 medium to XL) runs under ``no_grad``: no adjoint,
    so its chain of blocks is rewritten at no size below 64 and one symbolic compile serves every cache length.
    Where autograd records the chain, its adjoint is parallel from 32 steps: the graph is specialised."""
    backend = SeqparBackend({"inner": "inductor"})
    graphs = []
    torch._dynamo.reset()
    run = torch.compile(forty_steps, backend=lambda gm, example: graphs.append(backend(gm, example)) or graphs[-1])
    for batch in (2, 3, 4):
        x, a, b = inputs(batch)
        with torch.set_grad_enabled(differentiated):
            got = run(x, a.requires_grad_(), b)
        torch.testing.assert_close(got, forty_steps(x, a, b), rtol=0, atol=1e-12)
    assert isinstance(graphs[-1], PerShape) == differentiated
    if not differentiated:
        assert [symbolic for _, symbolic in inner_compiles] == [False, True]
        assert [chain.decision for graph in backend.graphs for chain in graph.chains] == ["sequential"] * 2

def test_specialisations_stop_at_a_limit_and_later_shapes_run_the_traced_graph(monkeypatch):
    # A loop over ever new sizes (generation with a growing length) must not compile without end.
    monkeypatch.setattr(PerShape, "MAX_SPECIALISATIONS", 2)
    backend = SeqparBackend({"inner": "eager"})
    graphs = []
    torch._dynamo.reset()
    run = torch.compile(recurrence, backend=lambda gm, example: graphs.append(backend(gm, example)) or graphs[-1])
    for batch in (2, 3, 4, 5, 6):
        args = inputs(batch)
        torch.testing.assert_close(run(*args), recurrence(*args), rtol=0, atol=1e-12)
    per_shape = graphs[-1]
    assert isinstance(per_shape, PerShape) and len(per_shape.compiled) == 2 and per_shape.told


class GainedRecurrence(torch.nn.Module):
    """``h_t = tanh(gain * a * h_{t-1} + x_t + b)`` with ``gain`` a float attribute: under ``dynamic=True``
    Dynamo passes it as a 0-d tensor and reads it with ``item()``, a number the graph reads at every call."""

    def __init__(self, gain: float):
        super().__init__()
        self.gain = gain

    def forward(self, x, a, b):
        h, out = torch.zeros(x.shape[0], x.shape[2], dtype=x.dtype), []
        for t in range(x.shape[1]):
            h = torch.tanh(self.gain * (a * h) + x[:, t] + b)
            out.append(h)
        return torch.stack(out, dim=1)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_dynamic_true_with_a_float_attribute_is_specialised_per_shape_and_value(inner):
    # The static copy's fake values once failed at the float's item() (DataDependentOutputException):
    # transformers' Mamba and RWKV under dynamic=True did not run at all. The number is part of the key now.
    model = GainedRecurrence(0.5)
    torch._dynamo.reset()
    backend = SeqparBackend({"policy": "parallel", "inner": inner})
    run = torch.compile(model, backend=backend, dynamic=True)
    for batch, gain in ((2, 0.5), (5, 0.5), (5, 0.25), (3, 0.75), (5, 0.25)):
        model.gain = gain
        args = inputs(batch, seed=batch)
        torch.testing.assert_close(run(*args), model(*args), rtol=0, atol=1e-12)
    assert [chain.decision for graph in backend.graphs for chain in graph.chains] == ["parallel"] * 4


def buffer_recurrence(x, a):
    out, h = torch.zeros_like(x), torch.zeros(x.shape[0], x.shape[2], dtype=x.dtype)
    for t in range(x.shape[1]):
        h = torch.tanh(a * h + x[:, t])
        out[:, t] = h
    return out


def test_a_recurrence_writing_a_buffer_keeps_its_chain_at_every_sequence_length():
    # At a second length Dynamo traces a static graph whose sizes are SymInts it specialised (the loop over
    # range(x.shape[1]) fixes them); the buffer-writes pass took those for symbolic sizes and the chain was
    # rejected ("setitem mutates a tensor in place"): RecurrentGemma and RWKV lost their chains so.
    torch._dynamo.reset()
    backend = SeqparBackend({"policy": "parallel", "inner": "eager", "min_chain": 4})
    run = torch.compile(buffer_recurrence, backend=backend)
    a = (0.5 * torch.rand(4, dtype=torch.float64)).requires_grad_()
    for length in (16, 24, 32, 24):
        x = torch.randn(3, length, 4, dtype=torch.float64, requires_grad=True)
        got, want = run(x, a), buffer_recurrence(x, a)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        got_grads = torch.autograd.grad(got.square().sum(), (x, a))
        want_grads = torch.autograd.grad(want.square().sum(), (x, a))
        for g, w in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-11 * w.abs().max().item())
    assert [[(chain.length, chain.decision) for chain in graph.chains] for graph in backend.graphs] == [
        [(16, "parallel")], [(24, "parallel")], [(32, "parallel")]]
