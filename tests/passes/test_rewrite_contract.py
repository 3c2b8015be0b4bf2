"""The rewrite's contract (STYLE.md): after ``graph.lint()`` every node it created carries a fake example value
of the shape and dtype the node computes when the rewritten graph runs."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import seqpar.backend as backend_module
from seqpar.backend import SeqparBackend
from seqpar.testing import models


class ShapeRecorder(fx.Interpreter):
    """Runs a graph and records each node's output shape and dtype."""

    def __init__(self, gm):
        super().__init__(gm)
        self.seen = {}

    def run_node(self, node):
        result = super().run_node(node)
        if isinstance(result, torch.Tensor):
            self.seen[node.name] = (tuple(result.shape), result.dtype)
        return result


@pytest.mark.parametrize("build", ["deep_mlp", "stacked_mlp", "hand_lstm", "conv_resnet", "unrolled_rnn"])
def test_every_node_of_a_rewritten_graph_has_an_example_value_matching_its_result(build, monkeypatch):
    graphs = []

    def recording(name):
        def compile_graph(gm, example_inputs):
            graphs.append((gm, example_inputs))
            return gm

        return compile_graph

    monkeypatch.setattr(backend_module, "lookup_backend", recording)
    torch._dynamo.reset()
    model, inputs = getattr(models, build)()
    backend = SeqparBackend({"policy": "parallel", "min_chain": 4})
    with torch.no_grad():  # sin: compute besides the chain, so the graph goes to the inner backend
        torch.compile(lambda *args: torch.sin(model(*args)[0] if build == "hand_lstm" else model(*args)),
                      backend=backend)(*inputs)
    assert any(chain.form == "solver" for graph in backend.graphs for chain in graph.chains)
    assert graphs, "the rewritten graph reached the inner backend"
    for gm, example_inputs in graphs:
        recorder = ShapeRecorder(gm)
        with torch.no_grad():
            recorder.run(*example_inputs)
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output") or node.name not in recorder.seen:
                continue
            value = node.meta.get("example_value", node.meta.get("val"))
            assert isinstance(value, torch.Tensor), f"{node.name} has no example value"
            assert (tuple(value.shape), value.dtype) == recorder.seen[node.name], node.name
