"""``passes.passthrough``: outputs of body-graph calls that return one of their operands, read from the operand.

Only activation checkpointing's calls can return an operand: Dynamo refuses an ``invoke_subgraph`` body that
does ("Higher order ops do not support aliasing"). The chains this makes are tested with the zoo
(tests/passes/test_detect.py, tests/e2e/test_backend.py) and T5 (tests/passes/test_t5.py). Float64;
tolerance as the zoo's (``F64_ATOL``, 1e-9 absolute).
"""

from __future__ import annotations

import torch

from seqpar.passes.passthrough import read_returned_inputs
from seqpar.passes.pipeline import copy_graph_module
from seqpar.passes.tokens import subgraph_body, subgraph_call
from seqpar.testing import models as zoo
from tests.e2e.test_backend import F64_ATOL


def captured(model, inputs):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend)(*inputs)
    (graph,) = graphs
    return graph


def body_outputs(gm):
    return [len([n for n in subgraph_body(call).graph.nodes if n.op == "output"][0].args[0])
            for call in gm.graph.nodes if subgraph_call(call) is not None]


def test_the_graph_copied_from_keeps_its_bodies_and_both_still_compute_the_model():
    # The pass works on the pipeline's copy, which shares the bodies with Dynamo's graph (the probe and the
    # speed trial run that one): pruned bodies are copies of their own.
    model, (x,) = zoo.checkpointed_stack(8, passthrough=True)
    model, x = model.double(), x.double()
    gm, example_inputs = captured(model, (x,))
    before = body_outputs(gm)
    copy = copy_graph_module(gm)
    assert read_returned_inputs(copy) == 7  # blocks 0..6 (Dynamo pruned the last block's unread bias)
    assert before == [2] * 7 + [1] and body_outputs(gm) == before and body_outputs(copy) == [1] * 8
    for graph in (gm, copy):
        torch.testing.assert_close(graph(*example_inputs), (model(x),), atol=F64_ATOL, rtol=0)


def test_calls_of_one_body_share_its_pruned_copy():
    # Blocks 0..6 return the bias unchanged and their bodies are alike (every weight an operand): called through
    # block 0's body, they get one pruned copy between them, and the graph still computes the model.
    model, (x,) = zoo.checkpointed_stack(8, passthrough=True)
    model, x = model.double(), x.double()
    gm, example_inputs = captured(model, (x,))
    shared = copy_graph_module(gm)
    calls = [node for node in shared.graph.nodes if subgraph_call(node) is not None]
    for call in calls[1:7]:
        call.update_arg(0, calls[0].args[0])
    shared.graph.eliminate_dead_code()
    shared.recompile()
    assert read_returned_inputs(shared) == 7
    assert len({call.args[0].target for call in calls[:7]}) == 1 and body_outputs(shared) == [1] * 8
    torch.testing.assert_close(shared(*example_inputs), (model(x),), atol=F64_ATOL, rtol=0)
