"""A kept-sequential chain of an inference graph runs in blocks, its states never held at once.

xLSTM's memory ``C_t = f_t C_{t-1} + i_t (k_t v_t^T)`` (in miniature, with a per-step readout) kept sequential
held all ``T`` states for the readout to be evaluated at once: 1 GiB at 4096 steps for one sequence at hidden
1024, where eager holds one (``seqpar.passes.stream``, ``seqpar.runtime.stream``). Under ``torch.no_grad`` the
graph now calls ``seqpar::chain_stream``, which runs the loop in blocks and evaluates each block's readouts at
once. Tolerances: the states are the loop's own, but the gates' ``sigmoid`` is computed for all steps at once,
whose vectorised kernel can round 1 ulp apart from eager's per-step call on some CPUs (an Intel Xeon here:
1.4e-16 relative), and the readouts are evaluated batched, in another summation order: float64 within 1e-12
relative of eager.
"""

from __future__ import annotations

import pytest
import torch

from seqpar.backend import SeqparBackend
from seqpar.runtime import stream
from seqpar.speed import DECIDED_AFTER
from seqpar.testing import models as zoo

ROLLED = {"policy": "sequential", "sequential_form": "rolled", "inner": "eager", "min_chain": 4}
TOL = 1e-12


class Memory(torch.nn.Module):
    """``C_t = sigmoid(f_t) C_{t-1} + k_t v_t^T``; ``read="after"``: ``h_t = q_t C_t``, ``"before"``: ``q_t C_{t-1}``
    (the readout of the state the step starts from); ``states=True`` also returns every ``C_t`` stacked."""

    def __init__(self, dim=8, key=6, value=10, read="after", states=False):
        super().__init__()
        self.k, self.v, self.q = torch.nn.Linear(dim, key), torch.nn.Linear(dim, value), torch.nn.Linear(dim, key)
        self.forget = torch.nn.Linear(dim, 1)
        self.key, self.value, self.read, self.states = key, value, read, states

    def forward(self, x):
        k, v, q, forget = self.k(x), self.v(x), self.q(x), self.forget(x)
        memory = x.new_zeros(x.shape[0], self.key, self.value)
        readout, memories = [], []
        for t in range(x.shape[1]):
            before = memory
            memory = torch.sigmoid(forget[:, t, :, None]) * memory + k[:, t, :, None] * v[:, t, None, :]
            readout.append((q[:, t, None, :] @ (memory if self.read == "after" else before)).squeeze(1))
            memories.append(memory)
        out = (torch.stack(readout, 1), memory)
        return out + (torch.stack(memories),) if self.states else out


def run(model, x, grad=False):
    torch._dynamo.reset()
    backend = SeqparBackend(ROLLED)
    function = torch.compile(model, backend=backend)
    with torch.set_grad_enabled(grad):
        return function(x), backend


def ops_called(backend) -> set[str]:
    return {name for graph in backend.graphs for name in ("chain_stream", "chain_solve", "chain_outputs")
            if f"seqpar.{name}." in graph.rewritten_code}


@pytest.mark.parametrize("read", ["after", "before"])
@pytest.mark.parametrize("block_steps", [1, 7, 40, 1000])  # blocks of one step, with a shorter last one, whole
def test_inference_runs_in_blocks_with_eagers_values(monkeypatch, read, block_steps):
    torch.manual_seed(0)
    model, x = Memory(read=read).double(), torch.randn(2, 40, 8, dtype=torch.float64)
    step_bytes = 2 * 6 * 10 * 8  # the packed state (N, w) = (2, 60) in float64
    monkeypatch.setattr(stream, "BLOCK_BYTES", block_steps * step_bytes)
    (readout, memory), backend = run(model, x)
    with torch.no_grad():
        want_readout, want_memory = model(x)
    assert ops_called(backend) == {"chain_stream"}
    assert float((memory - want_memory).abs().max() / want_memory.abs().max()) <= TOL
    assert float((readout - want_readout).abs().max() / want_readout.abs().max()) <= TOL
    (chain,) = [chain for graph in backend.graphs for chain in graph.chains if chain.decision != "rejected"]
    assert f"its states are not held (the loop runs in blocks of {min(block_steps, 40)} steps" in chain.reason
    assert chain.stats["loop"] == "generated" and chain.stats["sequential_steps"] == 40


def test_a_differentiated_graph_keeps_every_state_for_its_adjoint():
    torch.manual_seed(0)
    model, x = Memory().double(), torch.randn(2, 24, 8, dtype=torch.float64)
    (readout, memory), backend = run(model, x, grad=True)
    assert ops_called(backend) == {"chain_solve", "chain_outputs"}
    (readout.square().sum() + memory.sum()).backward()
    got = [parameter.grad.clone() for parameter in model.parameters()]
    model.zero_grad()
    want_readout, want_memory = model(x)
    (want_readout.square().sum() + want_memory.sum()).backward()
    for mine, eager in zip(got, (parameter.grad for parameter in model.parameters())):
        assert float((mine - eager).abs().max() / eager.abs().max()) <= TOL


def test_states_read_after_the_chain_are_held():
    """The graph returns every state: the chain keeps its states buffer (``chain_solve``), streamed nothing."""
    torch.manual_seed(0)
    model, x = Memory(states=True).double(), torch.randn(2, 24, 8, dtype=torch.float64)
    (readout, memory, memories), backend = run(model, x)
    with torch.no_grad():
        want = model(x)
    assert "chain_stream" not in ops_called(backend)
    for got, eager in zip((readout, memory, memories), want):
        assert float((got - eager).abs().max() / eager.abs().max()) <= TOL


def test_a_float32_chain_in_blocks_equals_the_whole_chain(monkeypatch):
    """The blocks change where the readouts are evaluated, not the states: float32 values of a run in blocks of
    5 steps are those of one block (states bit for bit; readouts to a float32 rounding of their scale)."""
    torch.manual_seed(0)
    model, x = Memory(), torch.randn(3, 33, 8)
    monkeypatch.setattr(stream, "BLOCK_BYTES", 5 * 3 * 60 * 4)
    (readout, memory), _ = run(model, x)
    monkeypatch.setattr(stream, "BLOCK_BYTES", 1 << 30)
    (whole_readout, whole_memory), _ = run(model, x)
    assert torch.equal(memory, whole_memory)
    torch.testing.assert_close(readout, whole_readout, rtol=0, atol=4e-7 * float(whole_readout.abs().max()))


def test_the_stream_op_has_no_derivative():
    """Called where autograd records (never by seqpar: its graphs that record autograd call chain_solve), the op
    says so instead of returning values without a gradient."""
    torch.manual_seed(0)
    model, x = Memory().double(), torch.randn(2, 12, 8, dtype=torch.float64)
    _, backend = run(model, x)
    ((_, program),) = [item for graph in backend.graphs for item in graph.programs]
    placeholders = [node for node in program.lowered.graph.nodes if node.op == "placeholder"]
    xs = [torch.randn(12, *node.meta["val"].shape, dtype=torch.float64)
          for node in placeholders[1 : 1 + program.xs_spec.num_leaves]]
    s0 = torch.zeros(2, 60, dtype=torch.float64, requires_grad=True)
    final, _ = torch.ops.seqpar.chain_stream(program.id, s0, xs, [], [])
    with pytest.raises(RuntimeError, match="chain_stream has no derivative"):
        final.sum().backward()


def test_mambas_loop_runs_its_fused_step_in_blocks(monkeypatch):
    """Mamba's reference loop in miniature, kept sequential for cost with inner="inductor": its step compiled by
    inductor (the fused loop) runs block by block, through the speed trial's calls. Float32, compared with the
    float64 model: no further from it than eager's own float32 loop, up to a factor 4 (a few roundings per step,
    on a contractive chain), or 1e-6 relative (as tests/e2e/test_fused_loop.py)."""
    torch.manual_seed(0)
    model, x = zoo.SelectiveScan().eval(), torch.randn(1, 80, 64)
    monkeypatch.setattr(stream, "BLOCK_BYTES", 7 * 64 * 24 * 4)  # blocks of 7 steps of the (1, 64 x 24) state
    torch._dynamo.reset()
    backend = SeqparBackend({"inner": "inductor"})
    function = torch.compile(model, backend=backend)
    with torch.no_grad():
        outs = [function(x) for _ in range(DECIDED_AFTER + 3)]
        eager = model(x)
        exact = model.double()(x.double())
    (report,) = [chain for graph in backend.graphs for chain in graph.chains if chain.decision != "rejected"]
    assert ops_called(backend) == {"chain_stream"} and "blocks of 7 steps" in report.reason
    assert "fused loop" in report.reason
    own = float((eager.double() - exact).abs().max() / exact.abs().max())
    for out in outs:
        assert float((out.double() - exact).abs().max() / exact.abs().max()) <= max(4 * own, 1e-6)


class ReadoutStack(torch.nn.Module):
    """``h_l = tanh(W_l h_{l-1} + b_l)`` over ``depth`` layers of their own, each layer's ``h_l . r_l`` read after the
    stack: per-layer parameters handed to the chain unstacked, and a per-step output."""

    def __init__(self, depth=24, width=6):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))
        self.readouts = torch.nn.Parameter(torch.randn(depth, width))

    def forward(self, h):
        taps = []
        for layer, readout in zip(self.layers, self.readouts):
            h = torch.tanh(layer(h))
            taps.append(h @ readout)
        return torch.stack(taps, -1), h


def test_a_layer_stack_with_readouts_runs_in_blocks(monkeypatch):
    torch.manual_seed(0)
    model, x = ReadoutStack().double(), torch.randn(3, 6, dtype=torch.float64)
    monkeypatch.setattr(stream, "BLOCK_BYTES", 5 * 3 * 6 * 8)  # blocks of 5 layers, the last of 4
    (taps, h), backend = run(model, x)
    with torch.no_grad():
        want_taps, want_h = model(x)
    (chain,) = [chain for graph in backend.graphs for chain in graph.chains if chain.decision != "rejected"]
    assert ops_called(backend) == {"chain_stream"} and "blocks of 5 steps" in chain.reason
    assert float((h - want_h).abs().max() / want_h.abs().max()) <= TOL
    assert float((taps - want_taps).abs().max() / want_taps.abs().max()) <= TOL


def test_inference_mode_and_the_graph_check():
    """Under ``torch.inference_mode`` (tensors without a version counter) with ``verify=True``: the graph check
    of the first call runs on the streamed graph, the chain's check says the loop is its own reference."""
    torch.manual_seed(0)
    model, x = Memory().double(), torch.randn(2, 30, 8, dtype=torch.float64)
    torch._dynamo.reset()
    backend = SeqparBackend({**ROLLED, "verify": True})
    function = torch.compile(model, backend=backend)
    with torch.inference_mode():
        outs = [function(x) for _ in range(2)]
        want = model(x)
    assert ops_called(backend) == {"chain_stream"}
    (graph,) = backend.graphs
    assert not graph.fell_back
    for out in outs:
        for got, eager in zip(out, want):
            assert float((got - eager).abs().max() / eager.abs().max()) <= TOL
