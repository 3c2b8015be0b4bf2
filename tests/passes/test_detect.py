"""Detection: which chains ``find_chains`` finds in Dynamo graphs of the zoo, and
that each chain's ``step`` reproduces its segments exactly."""

from __future__ import annotations

import functools
import operator

import pytest
import torch
import torch.fx as fx
from torch.func import jvp, vmap

from seqpar.passes.chain import map_state, state_leaves
from seqpar.passes.detect import BATCHNORM_TRAINING, find_chains
from seqpar.passes.passthrough import read_returned_inputs
from seqpar.runtime.slicing import slice_steps
from seqpar.testing import models as zoo


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def capture(model, inputs, *, no_grad=False, dtype=torch.float64, dedup=False):
    """The graphs Dynamo hands a backend for ``model(*inputs)``, with their real inputs."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    model = model.to(dtype)
    inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(use_graph_deduplication=dedup):
        compiled = torch.compile(model, backend=backend)
        if no_grad:
            with torch.no_grad():
                compiled(*inputs)
        else:
            compiled(*inputs)
    torch._dynamo.reset()
    return graphs


class _Recorder(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.values = {}

    def run_node(self, n):
        result = super().run_node(n)
        self.values[n] = result
        return result


def node_values(gm, inputs):
    recorder = _Recorder(gm)
    with torch.no_grad():
        recorder.run(*inputs)
    return recorder.values


def step_inputs(chain, values, l):
    """``(state, *per_step, *shared)`` of step ``l`` taken from a run of the original graph."""
    state = map_state(values.__getitem__, chain.start if l == 0 else chain.outputs[l - 1])
    per_step = []
    for inp in chain.per_step:
        if inp.kind == "constant":
            per_step.append(torch.tensor(inp.values[l], dtype=chain.state_dtype))
        elif inp.kind == "slice":
            per_step.append(values[inp.nodes[0]].select(inp.dim, inp.start + inp.stride * l))
        else:
            per_step.append(values[inp.nodes[l]])
    return state, per_step, [values[n] for n in chain.shared]


def assert_step_reproduces(chain, values, steps=None):
    steps = steps if steps is not None else sorted({0, 1, chain.length // 2, chain.length - 1})
    for l in steps:
        state, per_step, shared = step_inputs(chain, values, l)
        with torch.no_grad():
            out = chain.step(state, *per_step, *shared)
        # a leaf the graph does not compute (None in the last output) is not compared
        present = [i for i, leaf in enumerate(state_leaves(chain.outputs[l])) if leaf is not None]
        expected = [values[state_leaves(chain.outputs[l])[i]] for i in present]
        torch.testing.assert_close([state_leaves(out)[i] for i in present], expected, rtol=0, atol=0,
                                   msg=lambda m: f"step {l} of {chain.modules[l]!r}: {m}")


def only_chain(model, inputs, **kwargs):
    graphs = capture(model, inputs, **kwargs)
    assert len(graphs) == 1
    gm, example_inputs = graphs[0]
    read_returned_inputs(gm)  # the pipeline's pass before detection (a no-op without body-graph calls)
    chains, candidates = find_chains(gm)
    assert len(chains) == 1, (chains, candidates)
    return gm, example_inputs, chains[0]


# --------------------------------------------------------------------------- #
# chains the zoo must yield
# --------------------------------------------------------------------------- #

# id, constructor, capture kwargs, kind, length, (first module, last module), batch_ndim, per-step kinds
CHAIN_CASES = [
    ("mlp-tanh", lambda: zoo.deep_mlp(16, 8, "tanh"), {}, "layers", 16, ("layers.0", "layers.15"), 1,
     ["parameter", "parameter"]),
    ("mlp-gelu-width2", lambda: zoo.deep_mlp(12, 2, "gelu"), {}, "layers", 12, ("layers.0", "layers.11"), 1,
     ["parameter", "parameter"]),
    ("mlp-relu-width64", lambda: zoo.deep_mlp(8, 64, "relu"), {}, "layers", 8, ("layers.0", "layers.7"), 1,
     ["parameter", "parameter"]),
    ("mlp-sigmoid", lambda: zoo.deep_mlp(8, 4, "sigmoid"), {}, "layers", 8, ("layers.0", "layers.7"), 1,
     ["parameter", "parameter"]),
    ("mlp-sequence-state", lambda: zoo.deep_mlp(8, 4, "silu", seq=3), {}, "layers", 8, ("layers.0", "layers.7"), 2,
     ["parameter", "parameter"]),
    ("mlp-layernorm", lambda: zoo.mlp_layernorm(8, 8), {}, "layers", 8, ("layers.0", "layers.7"), 1,
     ["parameter"] * 4),
    ("mlp-dropout-eval", lambda: zoo.deep_mlp(8, 8, dropout=0.1), {}, "layers", 8, ("layers.0", "layers.7"), 1,
     ["parameter", "parameter"]),
    ("expansive-mlp", lambda: zoo.expansive_mlp(64, 4), {}, "layers", 64, ("layers.0", "layers.63"), 1,
     ["parameter", "parameter"]),
    ("modulelist", lambda: zoo.modulelist_mlp(12, 6), {}, "layers", 12, ("blocks.0", "blocks.11"), 1,
     ["parameter", "parameter"]),
    ("scaled-mlp", lambda: zoo.scaled_mlp(8, 8), {}, "layers", 8, ("layers.0", "layers.7"), 1,
     ["parameter", "parameter", "constant"]),
    ("residual-mlp", lambda: zoo.residual_mlp(10, 8), {}, "residual", 10, ("layers.0", "layers.9"), 1,
     ["parameter"] * 4),
    ("conv-resnet", lambda: zoo.conv_resnet(6), {}, "residual", 6, ("layers.0", "layers.5"), 1, ["parameter"] * 10),
    ("transformer-encoder", lambda: zoo.transformer_stack(6), {}, "transformer", 6, ("layers.0", "layers.5"), 1,
     ["parameter"] * 12),
    ("transformer-encoder-fastpath", lambda: zoo.transformer_stack(6), {"no_grad": True}, "transformer", 6,
     ("layers.0", "layers.5"), 1, ["parameter"] * 12),
    ("preln-transformer", lambda: zoo.preln_transformer(6), {}, "transformer", 6, ("layers.0", "layers.5"), 1,
     ["parameter"] * 12),
    # Dynamo inlines the first call of a nested_compile_region: the invoke_subgraph chain starts at layer 1
    # and the inlined layer 0 joins it by extension
    ("nested-compile-region", lambda: zoo.nested_region_stack(8), {}, "residual", 8, ("layers.0", "layers.7"), 1,
     ["parameter", "parameter"]),
    # every block under torch.utils.checkpoint: one tag_activation_checkpoint call each, each with its own body
    ("checkpointed-blocks", lambda: zoo.checkpointed_stack(8), {}, "residual", 8, ("layers.0", "layers.7"), 1,
     ["parameter", "parameter"]),
    # each block also returns the bias it reads: read from the call's operand, the bias is a shared input (the
    # last body, whose bias output Dynamo pruned, alike once the others drop theirs)
    ("checkpointed-passthrough", lambda: zoo.checkpointed_stack(8, passthrough=True), {}, "residual", 8,
     ("layers.0", "layers.7"), 1, ["parameter", "parameter"]),
    ("graph-deduplication", lambda: zoo.deep_mlp(10, 8), {"dedup": True}, "layers", 9, ("layers.1", "layers.9"), 1,
     ["parameter", "parameter"]),
    ("stacked-parameters", lambda: zoo.stacked_mlp(8, 4), {}, "layers", 8, ("", ""), 1, ["slice", "slice"]),
    ("stacked-parameters-reversed", lambda: zoo.stacked_mlp(8, 4, order="reverse"), {}, "layers", 8, ("", ""), 1,
     ["slice", "slice"]),
    ("stacked-parameters-strided", lambda: zoo.stacked_mlp(8, 4, order="strided"), {}, "layers", 8, ("", ""), 1,
     ["slice", "slice"]),
    ("unrolled-rnn", lambda: zoo.unrolled_rnn(16), {}, "recurrent", 16, ("", ""), 1, ["computed"]),
    ("gru-cell", lambda: zoo.gru_cell_loop(16), {}, "recurrent", 16, ("", ""), 1, ["slice"]),
    ("weight-tied-loop", lambda: zoo.weight_tied_loop(10), {}, "recurrent", 10, ("", ""), 1, []),
    # t[i] * time is computed; the coefficient tables a[i], b[i] are read row by row: slices
    ("denoising-loop", lambda: zoo.toy_denoiser_loop(12), {}, "denoise", 12, ("", ""), 1,
     ["computed", "slice", "slice"]),
]


_BY_ID = {case[0]: case for case in CHAIN_CASES}


@functools.lru_cache(maxsize=None)
def chain_of(case_id):
    """``(gm, example_inputs, chain)`` of a CHAIN_CASES entry, compiled once per session."""
    _, make, capture_kwargs, *_ = _BY_ID[case_id]
    model, inputs = make()
    return only_chain(model, inputs, **capture_kwargs)


@pytest.mark.parametrize("case", CHAIN_CASES, ids=[c[0] for c in CHAIN_CASES])
def test_zoo_model_yields_one_chain_with_the_expected_shape(case):
    case_id, _, _, kind, length, (first, last), batch_ndim, kinds = case
    gm, example_inputs, chain = chain_of(case_id)
    assert chain.kind == kind
    assert chain.length == length
    assert len(chain.nodes) == len(chain.modules) == length
    assert (chain.modules[0], chain.modules[-1]) == (first, last)
    assert chain.batch_ndim == batch_ndim
    assert [inp.kind for inp in chain.per_step] == kinds
    assert chain.used_outside == []
    for inp in chain.per_step:
        if inp.kind == "constant":
            assert len(inp.values) == length
        elif inp.kind == "slice":
            rows = inp.nodes[0].meta["example_value"].shape[inp.dim]
            assert len(inp.nodes) == 1 and 0 <= inp.start + inp.stride * (length - 1) < rows
        else:
            assert len(inp.nodes) == length
    example = chain.start.meta["example_value"]
    assert chain.state_shape == tuple(example.shape) and chain.state_dtype == torch.float64
    assert_step_reproduces(chain, node_values(gm, example_inputs))


@pytest.mark.parametrize("case", CHAIN_CASES, ids=[c[0] for c in CHAIN_CASES])
def test_step_graph_has_state_per_step_shared_placeholders_and_only_function_calls(case):
    _, _, chain = chain_of(case[0])
    placeholders = [n for n in chain.step.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 1 + len(chain.per_step) + len(chain.shared)
    ops = {n.op for n in chain.step.graph.nodes} - {"placeholder", "output"}
    assert ops == {"call_function"}
    assert not any(isinstance(n.target, torch._ops.HigherOrderOperator) for n in chain.step.graph.nodes)
    assert all("example_value" in n.meta for n in chain.step.graph.nodes if n.op == "call_function")


# TransformerEncoderLayer steps run under vmap but not jvp: forward AD is not
# implemented for CPU flash attention nor for _transformer_encoder_layer_fwd.
VMAP_CASES = ["mlp-tanh", "mlp-layernorm", "scaled-mlp", "residual-mlp", "conv-resnet", "preln-transformer",
              "nested-compile-region", "checkpointed-blocks", "checkpointed-passthrough", "graph-deduplication", "stacked-parameters",
              "unrolled-rnn", "gru-cell", "weight-tied-loop", "denoising-loop"]


@pytest.mark.parametrize("case", [c for c in CHAIN_CASES if c[0] in VMAP_CASES], ids=VMAP_CASES)
def test_step_runs_under_vmap_over_steps_and_jvp(case):
    gm, example_inputs, chain = chain_of(case[0])
    values = node_values(gm, example_inputs)
    steps = [0, 1, 2]
    per = [step_inputs(chain, values, l) for l in steps]
    states = torch.stack([p[0] for p in per])
    xs = [torch.stack([p[1][i] for p in per]) for i in range(len(chain.per_step))]
    shared = per[0][2]
    n_x = len(xs)

    def step(s, *rest):
        return chain.step(s, *rest[:n_x], *shared)

    with torch.no_grad():
        batched = vmap(step)(states, *xs)
    for i, l in enumerate(steps):
        torch.testing.assert_close(batched[i], values[chain.outputs[l]])
    tangent = torch.randn_like(per[0][0])
    out, derivative = jvp(lambda s: chain.step(s, *per[0][1], *shared), (per[0][0],), (tangent,))
    eps = 1e-6
    finite = (chain.step(per[0][0] + eps * tangent, *per[0][1], *shared)
              - chain.step(per[0][0] - eps * tangent, *per[0][1], *shared)) / (2 * eps)
    torch.testing.assert_close(derivative, finite, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- #
# tuple states: an LSTM carries (h, c)
# --------------------------------------------------------------------------- #

# id, constructor, length, state shapes. nn.LSTMCell: Dynamo drops the last step's
# unused c; the last step joins the chain by extension, its c is None.
TUPLE_CASES = [
    ("lstm-cell-16", lambda: zoo.lstm_cell_loop(16), 16, ((4, 8), (4, 8))),
    ("lstm-cell-64", lambda: zoo.lstm_cell_loop(64, hidden=5, batch=2), 64, ((2, 5), (2, 5))),
    ("hand-lstm-16", lambda: zoo.hand_lstm(16), 16, ((4, 8), (4, 8))),
    ("hand-lstm-64", lambda: zoo.hand_lstm(64, hidden=5, batch=2), 64, ((2, 5), (2, 5))),
]


@functools.lru_cache(maxsize=None)
def tuple_chain_of(case_id):
    (make,) = [case[1] for case in TUPLE_CASES if case[0] == case_id]
    return only_chain(*make())


@pytest.mark.parametrize("case", TUPLE_CASES, ids=[c[0] for c in TUPLE_CASES])
def test_lstm_over_time_is_a_recurrent_chain_carrying_the_tuple_h_c(case):
    case_id, _, length, shapes = case
    gm, example_inputs, chain = tuple_chain_of(case_id)
    assert (chain.kind, chain.length, chain.state_shape, chain.batch_ndim) == ("recurrent", length, shapes, 1)
    assert chain.leaf_shapes == list(shapes)
    assert isinstance(chain.start, tuple) and len(chain.start) == 2
    assert [tuple(node.meta["example_value"].shape) for node in chain.start] == list(shapes)
    assert all(isinstance(out, tuple) and len(out) == 2 for out in chain.outputs)
    # LSTMCell reads x[:, t] (one slice input of x); the hand-written LSTM the hoisted W x[:, t] + b
    assert [inp.kind for inp in chain.per_step] == ["slice" if case_id.startswith("lstm-cell") else "computed"]
    assert chain.used_outside == []
    assert all(nodes[-1] in state_leaves(out) for nodes, out in zip(chain.nodes, chain.outputs))
    assert_step_reproduces(chain, node_values(gm, example_inputs))


@pytest.mark.parametrize("case_id", ["lstm-cell-16", "hand-lstm-16"])
def test_tuple_state_step_takes_and_returns_the_tuple(case_id):
    _, _, chain = tuple_chain_of(case_id)
    (state, *_) = [n for n in chain.step.graph.nodes if n.op == "placeholder"]
    assert [user.target for user in state.users] == [operator.getitem, operator.getitem]
    (output,) = [n for n in chain.step.graph.nodes if n.op == "output"]
    assert isinstance(output.args[0], tuple) and len(output.args[0]) == 2


def test_lstm_cell_chain_shares_the_cell_parameters_and_starts_at_the_zero_states():
    _, _, chain = tuple_chain_of("lstm-cell-16")
    assert [n.name.rsplit("_parameters_", 1)[-1] for n in chain.shared] == [
        "weight_ih_", "weight_hh_", "bias_ih_", "bias_hh_"]
    assert [n.target for n in chain.start] == [torch.zeros, torch.zeros_like]


def test_lstm_states_read_after_the_chain_are_listed_for_either_tensor():
    model, inputs = zoo.hand_lstm(16, outputs="all")
    gm, example_inputs, chain = only_chain(model, inputs)
    assert chain.length == 16 and chain.used_outside == list(range(15))
    members = {n for nodes in chain.nodes for n in nodes}
    h_read = [l for l in range(15) if any(u not in members for u in chain.outputs[l][0].users)]
    c_read = [l for l in range(15) if any(u not in members for u in chain.outputs[l][1].users)]
    assert h_read == list(range(15)) and c_read == [8]
    assert_step_reproduces(chain, node_values(gm, example_inputs))


def test_a_tuple_state_whose_tensors_have_different_batch_dims_is_a_candidate_with_the_reason():
    model, inputs = zoo.mismatched_batch_pair(8)
    (gm, _), = capture(model, inputs)
    chains, candidates = find_chains(gm)
    assert chains == []
    (candidate,) = candidates
    assert (candidate.length, candidate.state_shape) == (8, ((4, 8), (8, 4)))
    assert "tuple state with different batch dims" in candidate.reason


def test_the_last_lstm_cell_step_joins_the_chain_without_the_c_dynamo_dropped():
    gm, _, chain = tuple_chain_of("lstm-cell-16")
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    h, c = chain.outputs[-1]
    assert c is None and output.args[0] == (h,)
    assert [n.target for n in chain.nodes[-1]] == [torch.lstm_cell, operator.getitem]


# --------------------------------------------------------------------------- #
# rows of stacked parameters: slice inputs
# --------------------------------------------------------------------------- #


def test_rows_of_a_stacked_parameter_are_one_slice_input_of_the_whole_parameter():
    gm, _, chain = chain_of("stacked-parameters")
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    assert [(inp.nodes, inp.start) for inp in chain.per_step] == [
        ([placeholders["l_self_parameters_w_"]], 0), ([placeholders["l_self_parameters_b_"]], 0)]
    selects = [n for n in gm.graph.nodes if n.target is operator.getitem]
    assert not any(n in nodes for n in selects for nodes in chain.nodes)


def test_views_of_a_slice_are_taken_by_the_step():
    _, _, chain = chain_of("stacked-parameters")
    w, _b = [n for n in chain.step.graph.nodes if n.op == "placeholder"][1:]
    assert tuple(w.meta["example_value"].shape) == (4, 4)
    assert [(user.target, user.args[1:]) for user in w.users] == [(getattr, ("T",))]


def test_rows_from_an_offset_are_a_slice_that_starts_there():
    model, inputs = zoo.stacked_mlp(8, 4, rows=12, offset=3)
    gm, example_inputs, chain = only_chain(model, inputs)
    assert (chain.kind, chain.length) == ("layers", 8)
    assert [(inp.kind, inp.start) for inp in chain.per_step] == [("slice", 3), ("slice", 3)]
    assert_step_reproduces(chain, node_values(gm, example_inputs))


@pytest.mark.parametrize(
    "name, dim, start, stride",
    [("stacked-parameters-reversed", 0, 7, -1), ("stacked-parameters-strided", 0, 0, 2), ("gru-cell", 1, 0, 1)],
)
def test_evenly_spaced_slices_on_any_dim_are_one_slice_input(name, dim, start, stride):
    # W[L-1-l] (reversed), W[2l] (strided), x[:, t] (a sequence read along dim 1)
    gm, example_inputs, chain = chain_of(name)
    assert [(inp.dim, inp.start, inp.stride) for inp in chain.per_step if inp.kind == "slice"][0] == (dim, start, stride)
    assert_step_reproduces(chain, node_values(gm, example_inputs))


def test_slice_steps_equals_the_stack_of_the_selects():
    source = torch.arange(5 * 12 * 2.0).reshape(5, 12, 2)
    for dim, start, stride, length in [(0, 1, 1, 3), (1, 0, 1, 12), (1, 11, -1, 12), (1, 9, -3, 4), (1, 2, 3, 4)]:
        expected = torch.stack([source.select(dim, start + stride * l) for l in range(length)])
        assert torch.equal(slice_steps(source, dim, start, stride, length), expected)


class _ScaledByTable(torch.nn.Module):
    """``x = tanh(A x) * table[l]`` with one shared ``A`` and a buffer of per-step scalars: a denoiser's shape."""

    def __init__(self, steps=8, width=4):
        super().__init__()
        self.A = torch.nn.Linear(width, width)
        self.register_buffer("table", torch.linspace(0.5, 1.0, steps))

    def forward(self, x):
        for l in range(self.table.shape[0]):
            x = torch.tanh(self.A(x)) * self.table[l]
        return x


def test_a_slice_of_a_buffer_of_scalars_is_a_per_step_coefficient_not_a_layer_parameter():
    torch.manual_seed(0)
    gm, example_inputs, chain = only_chain(_ScaledByTable(), (torch.randn(2, 4),))
    assert chain.kind == "denoise"
    assert [(inp.kind, inp.nodes[0].name) for inp in chain.per_step] == [("slice", "l_self_buffers_table_")]
    assert_step_reproduces(chain, node_values(gm, example_inputs))


# --------------------------------------------------------------------------- #
# extension: segments that compute the step with other nodes
# --------------------------------------------------------------------------- #


def test_the_inlined_first_call_of_a_nested_compile_region_joins_the_chain():
    gm, _, chain = chain_of("nested-compile-region")
    assert chain.start.op == "placeholder" and chain.start.name == "l_x_"
    assert [n.target for n in chain.nodes[0]] == [torch._C._nn.linear, torch.tanh, operator.add]
    assert all(n.target is torch.ops.higher_order.invoke_subgraph for n in (nodes[0] for nodes in chain.nodes[1:]))
    assert chain.used_outside == []


def test_a_segment_whose_inner_value_is_read_elsewhere_does_not_join_the_chain():
    model, inputs = zoo.nested_region_stack(8)
    (gm, _), = capture(model, inputs)
    (tanh,) = [n for n in gm.graph.nodes if n.target is torch.tanh]
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    with gm.graph.inserting_before(output):
        doubled = gm.graph.call_function(operator.mul, (tanh, 2.0))
    doubled.meta = dict(tanh.meta)
    output.args = ((*output.args[0], doubled),)
    gm.recompile()
    (chain,), _ = find_chains(gm)
    assert (chain.length, chain.modules[0]) == (7, "layers.1")


# --------------------------------------------------------------------------- #
# states used after the chain, several chains, graph breaks
# --------------------------------------------------------------------------- #


def test_states_read_after_the_chain_are_listed_in_used_outside():
    model, inputs = zoo.tapped_mlp(8, taps=(2, 5))
    gm, example_inputs, chain = only_chain(model, inputs)
    assert chain.length == 8
    assert chain.used_outside == [2, 5]
    assert_step_reproduces(chain, node_values(gm, example_inputs))


def test_uniform_unet_gives_an_encoder_chain_with_used_states_and_a_decoder_chain_with_skip_inputs():
    model, inputs = zoo.unet_uniform(6)
    (gm, example_inputs), = capture(model, inputs)
    chains, _ = find_chains(gm)
    assert [(c.modules[0], c.modules[-1], c.length) for c in chains] == [("enc.0", "enc.5", 6), ("dec.0", "dec.5", 6)]
    encoder, decoder = chains
    assert encoder.used_outside == [0, 1, 2, 3, 4]
    assert decoder.start is encoder.outputs[-1]
    assert [inp.kind for inp in decoder.per_step] == ["parameter", "parameter", "computed"]
    values = node_values(gm, example_inputs)
    assert_step_reproduces(encoder, values)
    assert_step_reproduces(decoder, values)


def test_a_graph_break_gives_one_chain_per_graph():
    model, inputs = zoo.graph_break_mlp(12)
    graphs = capture(model, inputs)
    assert len(graphs) == 2
    found = [find_chains(gm)[0] for gm, _ in graphs]
    assert [[(c.kind, c.length, c.modules[0]) for c in chains] for chains in found] == [
        [("layers", 6, "first.0")], [("layers", 6, "second.0")]]


def test_min_chain_sets_the_shortest_chain_reported():
    model, inputs = zoo.short_mlp()
    (gm, _), = capture(model, inputs)
    assert find_chains(gm)[0] == []
    chains, _ = find_chains(gm, min_chain=3)
    assert [c.length for c in chains] == [3]


def test_recurrent_chain_hoists_the_input_projection_and_shares_the_recurrent_weight():
    gm, example_inputs, chain = chain_of("unrolled-rnn")
    (x_proj,) = chain.per_step
    assert all(n.target is torch._C._nn.linear for n in x_proj.nodes)
    assert not any(n in nodes for n in x_proj.nodes for nodes in chain.nodes)
    assert [n.name for n in chain.shared] == ["l_self_modules_u_parameters_weight_"]
    assert chain.start.target is torch.zeros


def test_per_step_literals_become_constant_inputs_with_their_values():
    _, _, chain = chain_of("scaled-mlp")
    (constant,) = [inp for inp in chain.per_step if inp.kind == "constant"]
    assert constant.values == [1.0 + 0.05 * l for l in range(8)]


def test_random_draws_that_do_not_depend_on_the_state_are_hoisted_out_of_the_step():
    model, inputs = zoo.toy_denoiser_loop(12, noise=True)
    gm, example_inputs, chain = only_chain(model, inputs)
    assert chain.kind == "denoise" and chain.length == 12
    draws = [n for n in gm.graph.nodes if n.target is torch.randn]
    assert len(draws) == 12
    assert not any(n in nodes for n in draws for nodes in chain.nodes)
    assert not any(n.target is torch.randn for n in chain.step.graph.nodes)
    assert_step_reproduces(chain, node_values(gm, example_inputs))


def test_chain_nodes_are_the_segments_in_graph_order_ending_with_the_outputs():
    gm, _, chain = chain_of("residual-mlp")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    flat = [n for nodes in chain.nodes for n in nodes]
    assert flat == sorted(flat, key=order.__getitem__)
    assert all(nodes[-1] is out for nodes, out in zip(chain.nodes, chain.outputs))


# --------------------------------------------------------------------------- #
# no chain, or a candidate with a reason
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("make", [zoo.single_linear, zoo.short_mlp, zoo.unet_like],
                         ids=["single-linear", "three-layers", "unet"])
def test_models_without_a_chain_give_no_chain(make):
    model, inputs = make()
    for gm, _ in capture(model, inputs):
        chains, candidates = find_chains(gm)
        assert chains == [] and candidates == []


def test_batchnorm_in_training_mode_is_a_candidate_not_a_chain():
    model, inputs = zoo.conv_resnet(6, train=True)
    (gm, _), = capture(model, inputs)
    chains, candidates = find_chains(gm)
    assert chains == []
    assert [(c.kind, c.length, c.reason) for c in candidates] == [("residual", 6, BATCHNORM_TRAINING)]
    assert candidates[0].modules[0] == "layers.0"


def test_dropout_in_training_mode_is_a_candidate_not_a_chain():
    model, inputs = zoo.dropout_train_mlp(8)
    (gm, _), = capture(model, inputs)
    chains, candidates = find_chains(gm)
    assert chains == []
    assert len(candidates) == 1 and "random" in candidates[0].reason


def test_blocks_reading_two_states_back_are_a_candidate_not_a_chain():
    model, inputs = zoo.dense_skip(8)
    (gm, _), = capture(model, inputs)
    chains, candidates = find_chains(gm)
    assert chains == []
    assert len(candidates) == 1 and "earlier segment" in candidates[0].reason


class _MLPWithPerLayerOutputs(torch.nn.Module):
    """Each block also returns a side value besides the state (``sigmoid(x_l)``, as a KV cache would)."""

    def __init__(self, depth=8, width=8):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(width, width) for _ in range(depth)])

    def forward(self, x):
        outputs = []
        for layer in self.layers:
            outputs.append(torch.sigmoid(x))
            x = torch.tanh(layer(x))
        return x, outputs


def test_per_layer_values_read_after_the_blocks_are_per_step_outputs_of_the_chain():
    (gm, _), = capture(_MLPWithPerLayerOutputs(), (torch.randn(2, 8),))
    (chain,), candidates = find_chains(gm)
    assert candidates == [] and chain.length == 8
    (row,) = chain.per_step_outputs
    assert all(node is not None and "sigmoid" in node.name for node in row)
    # g(s_{l-1}, x_l) = sigmoid(s_{l-1}): the step's graph without the layer
    state = torch.randn(2, 8)
    weight, bias = torch.randn(8, 8), torch.randn(8)
    (y,) = chain.output_step(state, weight, bias)
    torch.testing.assert_close(y, torch.sigmoid(state), rtol=0, atol=0)


class _RolledMLP(torch.nn.Module):
    def __init__(self, depth=8, width=8):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(width, width) for _ in range(depth)])

    def forward(self, x):
        for shift, layer in enumerate(self.layers):
            x = torch.tanh(layer(torch.roll(x, shift + 1, -1)))
        return x


def test_a_structural_literal_that_differs_per_step_is_a_candidate_not_a_chain():
    torch.manual_seed(0)
    (gm, _), = capture(_RolledMLP().eval(), (torch.randn(4, 8),))
    chains, candidates = find_chains(gm)
    assert chains == []
    assert len(candidates) == 1 and "only arithmetic operands may differ per step" in candidates[0].reason


class _BatchMixingMLP(torch.nn.Module):
    def __init__(self, depth=6, width=8):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(width, width) for _ in range(depth)])

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x)) + x.mean(0)
        return x


def test_a_step_that_mixes_batch_elements_gets_batch_ndim_zero():
    torch.manual_seed(0)
    (gm, example_inputs), = capture(_BatchMixingMLP().eval(), (torch.randn(4, 8),))
    chains, _ = find_chains(gm)
    assert [(c.length, c.batch_ndim) for c in chains] == [(6, 0)]
    assert_step_reproduces(chains[0], node_values(gm, example_inputs))


def test_detection_leaves_the_graph_unchanged():
    model, inputs = zoo.residual_mlp(10)
    (gm, _), = capture(model, inputs)
    before = str(gm.graph)
    find_chains(gm)
    assert str(gm.graph) == before


# --------------------------------------------------------------------------- #
# scale
# --------------------------------------------------------------------------- #


def test_synthetic_mlp_graph_has_the_nodes_dynamo_makes():
    model, inputs = zoo.deep_mlp(4, 4, batch=2)
    (gm, _), = capture(model, inputs, dtype=torch.float32)
    synthetic, _ = zoo.mlp_graph(4, 4)
    calls = lambda g: [(n.op, n.target) for n in g.graph.nodes if n.op == "call_function"]  # noqa: E731
    assert calls(synthetic) == calls(gm)


def test_detection_finds_the_whole_chain_of_a_1000_layer_graph():
    # Its time (issue 3: a 4000-node graph in under a second) is measured by benchmarks/detect_time.py.
    gm, example_inputs = zoo.mlp_graph(1000, 4)
    assert len(gm.graph.nodes) > 4000
    chains, candidates = find_chains(gm)
    assert [(c.kind, c.length, c.batch_ndim) for c in chains] == [("layers", 1000, 1)]
    assert chains[0].modules[0] == "layers.0" and chains[0].modules[-1] == "layers.999"
    values = node_values(gm, example_inputs)
    assert_step_reproduces(chains[0], values, steps=[0, 500, 999])
