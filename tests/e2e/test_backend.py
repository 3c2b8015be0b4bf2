"""torch.compile(backend="seqpar"): equivalence with eager PyTorch on the zoo, and the backend's contract.

Tolerances: the zoo runs in float64 with the solver's float64 tolerance
(|ds| <= 1e-10 (1 + |s|)); Newton converges quadratically, so the states are
exact to rounding (~1e-15) and gradients, computed by the exact adjoint at
that solution, are too. 1e-9 absolute leaves room for conditioning of the
deeper chains; float32 comparisons use 1e-4 relative (the float32 tolerance
is 1e-5, amplified at most ~10x by these contractive chains).
"""

import copy
import logging
import os
import subprocess
import sys

import pytest
import torch

import seqpar
from seqpar.backend import SeqparBackend
from seqpar.testing import models as zoo

F64_ATOL = 1e-9


def to_double(model, inputs):
    return model.double(), tuple(x.double() if x.is_floating_point() else x for x in inputs)


def compile_with(model, **options):
    torch._dynamo.reset()
    options.setdefault("inner", "eager")
    options.setdefault("min_chain", 4)
    backend = SeqparBackend(options)
    return torch.compile(model, backend=backend), backend


def gradients(model, inputs):
    model.zero_grad(set_to_none=True)
    model(*inputs).square().sum().backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def chain_reports(backend):
    return [chain for graph in backend.graphs for chain in graph.chains]


ZOO = {
    "tanh_mlp": lambda: zoo.deep_mlp(depth=16, width=4, act="tanh"),
    "gelu_mlp": lambda: zoo.deep_mlp(depth=12, width=8, act="gelu"),
    "relu_mlp": lambda: zoo.deep_mlp(depth=12, width=8, act="relu"),
    "mlp_layernorm": lambda: zoo.mlp_layernorm(),
    "modulelist": lambda: zoo.modulelist_mlp(),
    "stacked_mlp": lambda: zoo.stacked_mlp(),
    "stacked_mlp_reversed": lambda: zoo.stacked_mlp(order="reverse"),
    "residual_mlp": lambda: zoo.residual_mlp(),
    "conv_resnet": lambda: zoo.conv_resnet(),
    "preln_transformer": lambda: zoo.preln_transformer(),
    "transformer_encoder": lambda: zoo.transformer_stack(),
    "nested_region": lambda: zoo.nested_region_stack(),
    "rnn": lambda: zoo.unrolled_rnn(),
    "gru_cell": lambda: zoo.gru_cell_loop(),
    "lstm_cell": lambda: zoo.lstm_cell_loop(),
    "hand_lstm": lambda: zoo.hand_lstm(),
    "unet_uniform": lambda: zoo.unet_uniform(),
    "graph_break": lambda: zoo.graph_break_mlp(),
    "tapped_mlp": lambda: zoo.tapped_mlp(),
    "scaled_mlp": lambda: zoo.scaled_mlp(),
    "weight_tied": lambda: zoo.weight_tied_loop(),
    "toy_denoiser": lambda: zoo.toy_denoiser_loop(),
    "scanned_mlp": lambda: zoo.scanned_mlp(),
    "scanned_resnet": lambda: zoo.scanned_resnet(),
    "scan_lstm": lambda: zoo.scan_lstm(),
    "scan_lstm_all_reversed": lambda: zoo.scan_lstm(outputs="all", reverse=True),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_outputs_and_gradients_equal_eager_in_float64(name):
    model, inputs = to_double(*ZOO[name]())
    compiled, backend = compile_with(model, policy="parallel")
    torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=F64_ATOL, rtol=0)
    for got, want in zip(gradients(compiled, inputs), gradients(model, inputs)):
        torch.testing.assert_close(got, want, atol=F64_ATOL, rtol=0)
    assert chain_reports(backend), f"{name}: no chain found"


@pytest.mark.parametrize("name", ["tanh_mlp", "residual_mlp", "rnn", "unet_uniform", "tapped_mlp", "toy_denoiser"])
def test_zoo_chains_are_solved_by_the_parallel_op(name):
    model, inputs = to_double(*ZOO[name]())
    compiled, backend = compile_with(model, policy="parallel")
    compiled(*inputs)
    solved = [chain for chain in chain_reports(backend) if chain.form == "solver"]
    assert solved and all(chain.stats["converged"] and chain.stats["fallback"] is None for chain in solved)
    assert "seqpar.chain_solve" in backend.graphs[0].rewritten_code


TUPLE_STATE_MODELS = {
    "lstm_cell_16": lambda: zoo.lstm_cell_loop(16),
    "lstm_cell_64_sequence": lambda: zoo.lstm_cell_loop(64, hidden=5, batch=2, sequence=True),
    "hand_lstm_16": lambda: zoo.hand_lstm(16),
    "hand_lstm_64_all_states": lambda: zoo.hand_lstm(64, hidden=5, batch=2, outputs="all"),
}
TUPLE_STATE_OPTIONS = {
    "parallel": {"policy": "parallel"},
    "sequential": {"policy": "sequential"},
    "sequential_rolled": {"policy": "sequential", "sequential_form": "rolled"},
}


def squares(outputs):
    """A loss that reads every output of a model returning a tensor or a tuple of tensors."""
    return sum(out.square().sum() for out in torch.utils._pytree.tree_leaves(outputs))


@pytest.mark.parametrize("options", sorted(TUPLE_STATE_OPTIONS))
@pytest.mark.parametrize("name", sorted(TUPLE_STATE_MODELS))
def test_lstm_tuple_state_outputs_and_gradients_equal_eager_in_float64(name, options):
    model, inputs = to_double(*TUPLE_STATE_MODELS[name]())
    compiled = torch.compile(model, backend="seqpar", options={**TUPLE_STATE_OPTIONS[options], "min_chain": 4, "inner": "eager"})
    torch._dynamo.reset()
    torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=F64_ATOL, rtol=0)
    got = torch.autograd.grad(squares(compiled(*inputs)), list(model.parameters()))
    want = torch.autograd.grad(squares(model(*inputs)), list(model.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=F64_ATOL, rtol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["lstm_cell_64_sequence", "hand_lstm_64_all_states"])
def test_lstm_tuple_state_is_packed_and_solved_by_the_parallel_op(name):
    model, inputs = to_double(*TUPLE_STATE_MODELS[name]())
    compiled, backend = compile_with(model, policy="parallel")
    compiled(*inputs)
    (chain,) = chain_reports(backend)
    assert (chain.kind, chain.state_shape, chain.form) == ("recurrent", ((2, 5), (2, 5)), "solver")
    assert chain.stats["converged"] and chain.stats["fallback"] is None
    code = backend.graphs[0].rewritten_code
    assert "seqpar.chain_solve" in code and "torch.cat" in code and ".split(" in code
    assert "(2x5, 2x5)" in backend.graphs[0].table()


def test_tuple_state_with_different_batch_dims_is_rejected_and_the_model_still_equals_eager():
    model, inputs = to_double(*zoo.mismatched_batch_pair(8))
    compiled, backend = compile_with(model, policy="parallel")
    torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=0, rtol=0)
    (chain,) = chain_reports(backend)
    assert chain.decision == "rejected" and "tuple state with different batch dims" in chain.reason
    assert chain.state_shape == ((4, 8), (8, 4))
    assert "seqpar.chain_solve" not in backend.graphs[0].rewritten_code


SOLVED_OPTIONS = {
    "parallel": {"policy": "parallel"},
    "sequential_rolled": {"policy": "sequential", "sequential_form": "rolled"},
}


def compiled_matches_eager_with_gradients(fn, inputs, parameters, **options):
    """Compile ``fn`` with seqpar (``options``; :func:`compile_with`) and check its output and the gradients of
    ``output.square().sum()`` w.r.t. ``parameters`` against eager's (float64, ``F64_ATOL``); returns the backend."""
    want = fn(*inputs)
    want_grads = torch.autograd.grad(want.square().sum(), parameters)
    compiled, backend = compile_with(fn, **options)
    got = compiled(*inputs)
    got_grads = torch.autograd.grad(got.square().sum(), parameters)
    torch.testing.assert_close(got, want, atol=F64_ATOL, rtol=0)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=F64_ATOL, rtol=0)
    return backend


def assert_equals_eager_in_float64(model, inputs, compiled):
    torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=F64_ATOL, rtol=0)
    for got, want in zip(gradients(compiled, inputs), gradients(model, inputs)):
        torch.testing.assert_close(got, want, atol=F64_ATOL, rtol=0)


@pytest.mark.parametrize("options", sorted(SOLVED_OPTIONS))
def test_rows_of_a_stacked_parameter_reach_the_op_as_the_parameter_itself(options):
    model, inputs = to_double(*zoo.stacked_mlp(16, 4))
    compiled, backend = compile_with(model, **SOLVED_OPTIONS[options])
    assert_equals_eager_in_float64(model, inputs, compiled)
    (chain,) = chain_reports(backend)
    assert (chain.kind, chain.length, chain.form) == ("layers", 16, "solver" if options == "parallel" else "rolled")
    code = backend.graphs[0].rewritten_code
    assert "slice_steps(l_self_parameters_w_, 0, 0, 1, 16)" in code  # rows 0..15 on dim 0: the parameter's view
    assert "slice_steps(l_self_parameters_b_, 0, 0, 1, 16)" in code
    assert "torch.stack" not in code and "parameters_w_[" not in code and "parameters_b_[" not in code


@pytest.mark.parametrize(
    "layout, call",
    [
        (dict(rows=12, offset=2), "slice_steps(l_self_parameters_w_, 0, 2, 1, 8)"),  # W[2 + l]
        (dict(order="reverse"), "slice_steps(l_self_parameters_w_, 0, 7, -1, 8)"),  # W[7 - l]
        (dict(order="strided"), "slice_steps(l_self_parameters_w_, 0, 0, 2, 8)"),  # W[2 l]
    ],
)
def test_evenly_spaced_rows_reach_the_op_as_one_slice_of_the_parameter(layout, call):
    model, inputs = to_double(*zoo.stacked_mlp(8, 4, **layout))
    compiled, backend = compile_with(model, policy="parallel")
    assert_equals_eager_in_float64(model, inputs, compiled)
    (chain,) = chain_reports(backend)
    assert (chain.kind, chain.length, chain.form) == ("layers", 8, "solver")
    code = backend.graphs[0].rewritten_code
    assert call in code and "torch.stack" not in code


def test_a_sequence_read_as_x_t_reaches_the_op_as_one_slice_along_time():
    model, inputs = to_double(*zoo.gru_cell_loop(steps=12))
    compiled, backend = compile_with(model, policy="parallel")
    assert_equals_eager_in_float64(model, inputs, compiled)
    code = backend.graphs[0].rewritten_code
    assert "slice_steps(l_x_, 1, 0, 1, 12)" in code and "torch.stack" not in code


def test_nested_compile_region_is_one_chain_over_every_layer():
    model, inputs = to_double(*zoo.nested_region_stack(depth=8))
    compiled, backend = compile_with(model, policy="parallel")
    assert_equals_eager_in_float64(model, inputs, compiled)
    (chain,) = chain_reports(backend)
    assert (chain.length, chain.modules[0], chain.modules[-1], chain.form) == (8, "layers.0", "layers.7", "solver")
    assert "torch._C._nn.linear" not in backend.graphs[0].rewritten_code


@pytest.mark.parametrize("options", [{"policy": "parallel"}, {"policy": "sequential", "sequential_form": "rolled"},
                                     {"policy": "sequential", "sequential_form": "unrolled"}], ids=str)
@pytest.mark.parametrize("passthrough", [False, True], ids=["plain", "bias-passed-through"])
def test_blocks_under_activation_checkpointing_are_one_chain(options, passthrough):
    # gradient_checkpointing_enable()'s form: each block a tag_activation_checkpoint call with its own body. Solved
    # or rolled, the chain op computes the blocks (its adjoint keeps only the states); left unrolled, the calls
    # stay as they were, checkpointing included. A bias every block returns unchanged (T5's position bias) is
    # read from the calls' operand: a shared input, its gradient summed over the blocks.
    model, inputs = to_double(*zoo.checkpointed_stack(depth=8, passthrough=passthrough))
    compiled, backend = compile_with(model, **options)
    assert_equals_eager_in_float64(model, inputs, compiled)
    (chain,) = chain_reports(backend)
    assert (chain.kind, chain.length, chain.modules[0], chain.modules[-1]) == ("residual", 8, "layers.0", "layers.7")
    unrolled = options.get("sequential_form") == "unrolled"
    assert ("tag_activation_checkpoint" in backend.graphs[0].rewritten_code) == unrolled


class _CheckpointedScaled(torch.nn.Module):
    def __init__(self, scales: list[float], width: int):
        super().__init__()
        self.scales = scales
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in scales)

    def forward(self, x):
        for layer, scale in zip(self.layers, self.scales):
            x = torch.utils.checkpoint.checkpoint(
                lambda h, layer=layer, scale=scale: h + scale * torch.tanh(layer(h)), x, use_reentrant=False)
        return x


def test_checkpointed_blocks_whose_bodies_differ_only_in_a_number_are_not_taken_for_one_step():
    # Each block's Python float is a literal inside its body, out of detection's per-segment comparison: the
    # bodies differ, and no chain may give every block the first block's number.
    model = _CheckpointedScaled([0.5, 0.9, 0.1, 0.7, 0.3, 0.8, 0.2, 0.6], 4).double().train()
    inputs = (torch.randn(3, 4, dtype=torch.float64),)
    compiled, backend = compile_with(model, policy="parallel")
    assert_equals_eager_in_float64(model, inputs, compiled)
    assert not [chain for chain in chain_reports(backend) if chain.decision != "rejected"]
    same = _CheckpointedScaled([0.5] * 8, 4).double().train()
    compiled, backend = compile_with(same, policy="parallel")
    assert_equals_eager_in_float64(same, inputs, compiled)
    assert [chain.length for chain in chain_reports(backend)] == [8]


class _CheckpointedDropout(torch.nn.Module):
    def __init__(self, depth: int, width: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.utils.checkpoint.checkpoint(
                lambda h, layer=layer: h + torch.nn.functional.dropout(torch.tanh(layer(h)), 0.1), x,
                use_reentrant=False)
        return x


def test_checkpointed_blocks_that_draw_random_numbers_stay_as_they_are_with_the_reason():
    model = _CheckpointedDropout(8, 4).double().train()
    compiled, backend = compile_with(model, policy="parallel")
    out = compiled(torch.randn(3, 4, dtype=torch.float64))
    assert out.shape == (3, 4) and torch.isfinite(out).all()
    (chain,) = chain_reports(backend)
    assert chain.decision == "rejected" and "calls a body in which" in chain.reason and "random" in chain.reason
    assert backend.graphs[0].rewritten_code == backend.graphs[0].original_code


@pytest.mark.parametrize("make", [zoo.single_linear, zoo.short_mlp, zoo.unet_like])
def test_model_without_chain_compiles_unchanged(make):
    model, inputs = make()
    compiled, backend = compile_with(model)
    assert torch.equal(compiled(*inputs), model(*inputs))
    for graph in backend.graphs:
        assert graph.rewritten_code == graph.original_code


def test_inductor_inner_backend_matches_eager_in_float32():
    model, inputs = zoo.deep_mlp(depth=24, width=4, act="tanh")
    compiled, backend = compile_with(model, policy="parallel", inner="inductor")
    torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)
    for got, want in zip(gradients(compiled, inputs), gradients(model, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: zoo.deep_mlp(depth=16, width=4), lambda: zoo.scanned_mlp(depth=16)],
                         ids=["per-layer parameters", "scan_layers"])
def test_optimizer_steps_refresh_the_stacked_parameters(make):
    model, inputs = to_double(*make())
    eager_model, _ = to_double(*make())
    compiled, _ = compile_with(model, policy="parallel")
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, eager_model)]
    for _ in range(3):
        for net, optimizer in zip((compiled, eager_model), optimizers):
            optimizer.zero_grad()
            net(*inputs).square().sum().backward()
            optimizer.step()
    for got, want in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(got, want, atol=F64_ATOL, rtol=0)
    torch.testing.assert_close(compiled(*inputs), eager_model(*inputs), atol=F64_ATOL, rtol=0)


def test_expansive_chain_falls_back_and_still_equals_eager():
    """An expansive float32 chain amplifies every rounding (gain 2 over 64 layers): eager's own result is one of
    many valid roundings, 2.7e-5 from the float64 trajectory here. The fallback must be as close to that
    trajectory as eager is (twice eager's error at most), not bitwise eager's."""
    model, inputs = zoo.expansive_mlp(depth=64)
    exact = copy.deepcopy(model).double()(*[x.double() for x in inputs])
    compiled, backend = compile_with(model, policy="parallel", max_iters=5)
    eager_error = (model(*inputs).double() - exact).abs().max()
    assert (compiled(*inputs).double() - exact).abs().max() <= 2 * eager_error
    (chain,) = chain_reports(backend)
    assert chain.stats["fallback"].startswith("did not converge in 5 iterations")


def test_verification_catches_a_wrong_solve_and_solves_that_chain_sequentially():
    # A tolerance of 1e3 lets Newton stop after one iteration with wrong states.
    model, inputs = to_double(*zoo.deep_mlp(depth=16, width=4))
    compiled, backend = compile_with(model, policy="parallel", tol=1e3, verify=True)
    torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=F64_ATOL, rtol=0)
    graph = backend.graphs[0]
    assert graph.verification[0].startswith("call 1: chain 0 MISMATCH")
    assert graph.verification[1].startswith("call 1: graph ok")
    assert not graph.fell_back  # only the chain changed: the rest of the graph stays compiled
    (chain,) = chain_reports(backend)
    assert chain.decision == "sequential" and "verification mismatch at call 1" in chain.reason
    torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=F64_ATOL, rtol=0)
    assert chain_reports(backend)[0].stats["fallback"].startswith("verification mismatch")


def test_verification_passes_on_a_correct_solve():
    model, inputs = to_double(*zoo.deep_mlp(depth=16, width=4))
    compiled, backend = compile_with(model, policy="parallel", verify=True)
    compiled(*inputs)
    assert [entry.split(":")[1] for entry in backend.graphs[0].verification] == [" chain 0 ok", " graph ok"]


def test_graph_verification_mismatch_runs_the_original_graph(monkeypatch):
    # A wrong rewrite, simulated by an inner compiler whose graph adds 1 to every output,
    # is caught by the whole-graph check: the original graph runs from then on.
    import torch.utils._pytree as pytree

    def wrong_inner(name):
        return lambda gm, example_inputs: lambda *args: pytree.tree_map(lambda out: out + 1, gm(*args))

    monkeypatch.setattr("seqpar.backend.lookup_backend", wrong_inner)
    monkeypatch.setattr("seqpar.backend.has_other_compute", lambda gm, ignore=frozenset(): True)
    model, inputs = to_double(*zoo.deep_mlp(depth=16, width=4))
    compiled, backend = compile_with(model, policy="parallel", verify=True)
    torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=F64_ATOL, rtol=0)
    graph = backend.graphs[0]
    assert graph.fell_back and graph.verification[-1].startswith("call 1: graph MISMATCH")
    assert "graph verification mismatch at call 1" in graph.chains[0].reason
    torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=F64_ATOL, rtol=0)


def test_graph_check_is_skipped_for_a_graph_that_draws_random_numbers():
    # Dropout in training mode before the chain: a second run of the original graph would
    # draw other numbers, so only the chain (deterministic) is checked.
    model, inputs = to_double(*zoo.deep_mlp(depth=16, width=4))
    model = torch.nn.Sequential(torch.nn.Dropout(0.5), model).train()
    compiled, backend = compile_with(model, policy="parallel", verify=True)
    torch.manual_seed(1)
    got = compiled(*inputs)
    torch.manual_seed(1)
    torch.testing.assert_close(got, model(*inputs), atol=F64_ATOL, rtol=0)
    graph = backend.graphs[0]
    assert [entry.split(":")[1] for entry in graph.verification] == [" chain 0 ok", " graph check skipped"]
    assert not graph.fell_back


def test_estimated_jacobian_option_still_equals_eager():
    # jacobian="estimate" (J ~ c_l I from one VJP) is a quasi-Newton choice: slower to converge
    # on an MLP, but the result must equal eager all the same.
    model, inputs = to_double(*zoo.deep_mlp(depth=16, width=4))
    compiled, backend = compile_with(model, policy="parallel", jacobian="estimate")
    torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=F64_ATOL, rtol=0)
    (chain,) = chain_reports(backend)
    assert chain.jacobian == "estimate" and chain.stats["jacobian"] == "estimate"


def test_debug_dump_holds_graphs_chains_and_stats(tmp_path):
    model, inputs = zoo.deep_mlp(depth=16, width=4)
    compiled, backend = compile_with(model, policy="parallel", debug_dir=str(tmp_path))
    compiled(*inputs)
    folder = tmp_path / f"graph_{backend.graphs[0].index}"
    assert "torch._C._nn.linear" in (folder / "original.py").read_text()
    assert "seqpar.chain_solve" in (folder / "rewritten.py").read_text()
    table = (folder / "chains.txt").read_text()
    assert "layers" in table and "parallel" in table
    assert '"iterations"' in (folder / "chains.json").read_text()


def test_explain_reports_every_chain_with_decision_and_reason():
    model, inputs = zoo.deep_mlp(depth=16, width=4)
    report = seqpar.explain(model, *inputs, options={"min_chain": 4})
    (chain,) = report.chains
    assert (chain.kind, chain.length, chain.state_shape) == ("layers", 16, (4, 4))
    assert chain.modules[0] == "layers.0" and chain.modules[-1] == "layers.15"
    assert chain.decision in ("parallel", "sequential") and chain.reason
    assert "kind" in str(report) and "layers" in str(report)


def test_explain_shows_rejected_chains_with_their_reason():
    model, inputs = zoo.conv_resnet(train=True)
    report = seqpar.explain(model, *inputs, options={"min_chain": 4})
    assert any(c.decision == "rejected" and "BatchNorm in training mode" in c.reason for c in report.chains)


def test_unknown_option_raises_value_error_through_torch_compile():
    compiled = torch.compile(lambda x: x + 1, backend="seqpar", options={"bogus": 1})
    with pytest.raises(ValueError, match=r"unknown seqpar option\(s\) \['bogus'\]; valid options: jacobian"):
        compiled(torch.randn(2))
    torch._dynamo.reset()


@pytest.mark.parametrize("how", ["mode", "option"])
def test_inductors_mode_reaches_the_inner_compile_and_values_equal_eager(inner_compiles, how):
    """``torch.compile(m, backend="seqpar", mode=...)`` (torch hands the mode to the backend) or the option
    ``mode`` beside seqpar's: the inner inductor compile gets the mode's config, as torch.compile applies it, and
    values equal eager's, the chain solved in parallel where the option asks. (On a CPU inductor's CUDA graphs do
    not apply: "reduce-overhead" compiles as "default".)"""
    torch._dynamo.reset()
    model, (x,) = to_double(*zoo.deep_mlp(depth=16, width=4))
    energy = lambda x: model(x).square().sum(-1)  # noqa: E731  (more than the chain: the inner backend compiles)
    if how == "mode":
        compiled = torch.compile(energy, backend="seqpar", mode="reduce-overhead")
    else:
        compiled = torch.compile(energy, backend="seqpar", options={"mode": "reduce-overhead", "policy": "parallel"})
    torch.testing.assert_close(compiled(x), energy(x), rtol=1e-9, atol=1e-9)
    assert [keywords for keywords, _ in inner_compiles] == [{"config_patches": {"triton.cudagraphs": True}}]
    torch._dynamo.reset()


def test_explain_takes_the_options_a_compile_with_a_mode_was_given():
    model, inputs = zoo.deep_mlp(depth=16, width=4)
    report = seqpar.explain(model, *inputs, options={"mode": "max-autotune", "policy": "parallel"})
    assert [chain.decision for chain in report.chains] == ["parallel"]


def test_an_unknown_mode_raises_value_error_naming_inductors_modes_through_torch_compile():
    compiled = torch.compile(lambda x: x + 1, backend="seqpar", mode="fastest")
    with pytest.raises(ValueError, match=r"mode='fastest' is not one of inductor's modes \('default', "):
        compiled(torch.randn(2))
    torch._dynamo.reset()


def test_the_chain_ops_are_kept_out_of_inductors_cuda_graphs():
    """A solve decides on the host, per call, how many iterations it runs and whether it falls back: a CUDA graph
    replaying one call's kernels would be wrong for the next inputs. The ops carry the ``cudagraph_unsafe`` tag,
    by which inductor leaves them out of its CUDA graphs (graph partition: the rest of the graph is captured)."""
    from torch._inductor.utils import is_cudagraph_unsafe_fx_node

    model, (x,) = to_double(*zoo.deep_mlp(depth=16, width=4))
    compiled, backend = compile_with(model, policy="parallel")
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-9, atol=1e-9)
    (record,) = backend.graphs
    assert "torch.ops.seqpar.chain_solve" in record.rewritten_code
    for name in ("chain_solve", "chain_outputs", "chain_stream", "chain_adjoint", "chain_outputs_vjp"):
        op = getattr(torch.ops.seqpar, name).default
        node = torch.fx.Graph().call_function(op, ())
        assert is_cudagraph_unsafe_fx_node(node), name


def test_torch_guard_filter_passes_through_options_next_to_seqpar_options(caplog):
    """README's advice for deep stacks: torch's own ``guard_filter_fn`` (Dynamo's per-parameter guards dropped)
    goes in the same ``options`` dict as seqpar's; the chain is still solved, equals eager in float64, and sees
    weights updated in place (the parameters are read at every call, only their guards are gone)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[m for _ in range(64) for m in (torch.nn.Linear(4, 4), torch.nn.Tanh())]).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    compiled = torch.compile(model, backend="seqpar", options={
        "guard_filter_fn": torch.compiler.skip_guard_on_inbuilt_nn_modules_unsafe,
        "policy": "parallel", "inner": "eager",
    })
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="seqpar"):
        assert (compiled(x) - model(x)).abs().max() < F64_ATOL
        assert any("layers chain of 64 (parallel)" in record.getMessage() for record in caplog.records)
        for p in model.parameters():
            p.mul_(0.9)
        assert (compiled(x) - model(x)).abs().max() < F64_ATOL
    torch._dynamo.reset()

def test_backend_is_registered_through_the_entry_point_without_import():
    code = (
        "import torch; assert 'seqpar' in torch._dynamo.list_backends(); "
        "f = torch.compile(lambda x: torch.tanh(x) + 1, backend='seqpar'); "
        "x = torch.randn(3); torch.testing.assert_close(f(x), torch.tanh(x) + 1); print('ok')"
    )  # no chain: inductor compiles the graph, and its vectorised tanh may differ from eager's in the last bit
    env = {key: value for key, value in os.environ.items() if key != "TORCH_LOGS"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.stdout.strip().endswith("ok"), result.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize(
    "make",
    [
        lambda: zoo.deep_mlp(depth=1024, width=2, act="tanh", batch=1),
        lambda: zoo.deep_mlp(depth=256, width=64, act="gelu"),
        lambda: zoo.conv_resnet(blocks=32),
    ],
    ids=["tanh-mlp-1024x2", "gelu-mlp-256x64", "conv-resnet-32-blocks"],
)
def test_deep_zoo_models_equal_eager_in_float64(make):
    model, inputs = to_double(*make())
    compiled, backend = compile_with(model, policy="parallel")
    torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=F64_ATOL, rtol=0)
    for got, want in zip(gradients(compiled, inputs), gradients(model, inputs)):
        torch.testing.assert_close(got, want, atol=F64_ATOL, rtol=0)
    assert any(chain.form == "solver" for chain in chain_reports(backend))


@pytest.mark.parametrize(
    "make, standalone",
    [
        (lambda: zoo.stacked_mlp(depth=8), True),  # rows W[l] read through ".T": views only
        (lambda: zoo.lstm_cell_loop(steps=8), True),  # zero initial (h, c), packing of the tuple state
        (lambda: zoo.hand_lstm(steps=8), False),  # hoisted input projections W x_t: real compute
    ],
)
def test_only_graphs_with_compute_besides_chains_and_glue_go_to_the_inner_compiler(monkeypatch, make, standalone):
    inner_calls = []

    def recording_inner(name):
        def compile_graph(gm, example_inputs):
            inner_calls.append(gm)
            return gm

        return compile_graph

    monkeypatch.setattr("seqpar.backend.lookup_backend", recording_inner)
    model, inputs = to_double(*make())
    compiled, backend = compile_with(model, policy="parallel")
    torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=F64_ATOL, rtol=0)
    assert [chain.decision for chain in chain_reports(backend)] == ["parallel"]
    assert (inner_calls == []) == standalone


def test_dynamos_request_to_trace_again_passes_through_the_inner_backend(monkeypatch):
    """Inductor raises ``TensorifyScalarRestartAnalysis`` when a float it was to take as a tensor got specialised
    (transformers' RecurrentGemma under seqpar): Dynamo's control flow, not a failure. It reaches Dynamo, which
    traces the frame again; the first graph leaves no record and the second is compiled, not run eagerly."""
    from torch._dynamo.exc import TensorifyScalarRestartAnalysis

    asked = []

    def inner_asking_once(name):
        def compile_graph(gm, example_inputs):
            asked.append(gm)
            if len(asked) == 1:
                raise TensorifyScalarRestartAnalysis
            return gm

        return compile_graph

    monkeypatch.setattr("seqpar.backend.lookup_backend", inner_asking_once)
    torch._dynamo.reset()
    model, x = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh()).double(), torch.randn(3, 4).double()
    backend = seqpar.backend.SeqparBackend({"inner": "inductor"})
    torch.testing.assert_close(torch.compile(model, backend=backend)(x), model(x), rtol=0, atol=0)
    assert len(asked) == 2  # traced again after the request
    (graph,) = backend.graphs
    assert graph.inner_error is None


def _scaled_loop(x, scale):
    for _ in range(8):
        x = torch.tanh(x * scale + 0.1) / scale
    return x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("specialize", [False, True])
def test_a_float_argument_that_changes_between_calls_stays_in_the_chain(specialize, dtype):
    """Dynamo makes a float argument symbolic once it changes between calls: the second graph reads it from a
    0-d float64 tensor (``x * item``). The step reads that tensor instead (``x * t`` rounds ``t`` to ``x``'s
    dtype as ``x * float(t)`` does), so one graph serves every value, its chain solved; with floats specialised,
    a graph per value. Values equal eager's (float64: to solver tolerance; float32: the same rounding of the
    scalar, so to float32's)."""
    torch._dynamo.reset()
    backend = SeqparBackend({"policy": "parallel"})
    compiled = torch.compile(_scaled_loop, backend=backend)
    x = torch.randn(3, 4, dtype=dtype)
    tolerance = {"atol": F64_ATOL, "rtol": 0} if dtype == torch.float64 else {"atol": 1e-6, "rtol": 1e-6}
    with torch._dynamo.config.patch(specialize_float=specialize):
        for scale in (0.5, 0.7, 0.9):
            torch.testing.assert_close(compiled(x, scale), _scaled_loop(x, scale), **tolerance)
    decisions = [[chain.decision for chain in graph.chains] for graph in backend.graphs]
    assert decisions == [["parallel"]] * (3 if specialize else 2)


def _scaled_product_loop(x, w, scale):
    for _ in range(8):
        x = torch.tanh(x @ w * scale + 0.1) / scale
    return x


def test_a_symbolic_float_first_read_inside_the_loop_leaves_every_step_in_the_chain():
    """Where the float is first read after a product (``x @ w * scale``), Dynamo takes ``item`` inside step 0, so
    step 0 differs from the others: the run of equal segments begins inside step 0 and ends where the loop does.
    Segmented to end there, the run is steps 1-7 and step 0 joins it (its ``item`` read as the tensor the chain
    shares): a chain of all 8 steps, where ``min_chain`` is 8, in both graphs. Values and the gradients of ``x``
    and ``w`` equal eager's to solver tolerance."""
    torch._dynamo.reset()
    backend = SeqparBackend({"policy": "parallel"})
    compiled = torch.compile(_scaled_product_loop, backend=backend)
    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(4, 4, dtype=torch.float64) / 2).requires_grad_()
    for scale in (0.5, 0.7, 0.9):
        got, want = compiled(x, w, scale), _scaled_product_loop(x, w, scale)
        torch.testing.assert_close(got, want, atol=F64_ATOL, rtol=0)
        for got_grad, want_grad in zip(torch.autograd.grad(got.sum(), (x, w)), torch.autograd.grad(want.sum(), (x, w))):
            torch.testing.assert_close(got_grad, want_grad, atol=F64_ATOL, rtol=0)
    chains = [[(chain.decision, chain.length) for chain in graph.chains] for graph in backend.graphs]
    assert chains == [[("parallel", 8)]] * 2


def test_a_symbolic_float_the_step_cannot_read_as_a_tensor_is_named_where_it_keeps_a_chain_out():
    """In bfloat16 ``x * float`` keeps the float in float32 and ``x * t`` rounds ``t`` to bfloat16: the chain
    stays out, and its reason says why and what to do. The graph runs as traced: eager's values, exactly."""
    torch._dynamo.reset()
    backend = SeqparBackend({"policy": "parallel", "inner": "eager"})
    compiled = torch.compile(_scaled_loop, backend=backend)
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    for scale in (0.5, 0.7):
        assert torch.equal(compiled(x, scale), _scaled_loop(x, scale))
    first, second = [graph.chains for graph in backend.graphs]
    assert [chain.decision for chain in first] == ["parallel"]
    (chain,) = second
    assert chain.decision == "rejected" and "a number Dynamo made symbolic" in chain.reason
    assert "specialize_float" in chain.reason
