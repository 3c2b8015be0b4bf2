"""Chains whose steps also produce values read after the chain: per-step outputs ``y_l = g(s_{l-1}, x_l)``.

A readout appended to a list and stacked, per-layer values returned in a
list, a returned key/value cache (test_hf_models, test_t5): the chain is
solved as before and every per-step output comes from one batched evaluation
of ``g`` at the solved states, differentiated the same way.

Tolerance: float64 throughout, 1e-9 absolute (``F64_ATOL``, as the zoo): the
solver stops at a relative update of 1e-10 on chains of at most 32 steps.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn

import seqpar
from seqpar.backend import SeqparBackend
from tests.e2e.test_backend import F64_ATOL, chain_reports, compile_with


class GRUReadout(nn.Module):
    """A GRU cell over time; each step's readout ``W h_t + b`` is appended and the list stacked on dim 1."""

    def __init__(self, inputs=4, hidden=8, outputs=3):
        super().__init__()
        self.hidden = hidden
        self.cell, self.readout = nn.GRUCell(inputs, hidden), nn.Linear(hidden, outputs)

    def forward(self, x):
        h, ys = x.new_zeros(x.shape[0], self.hidden), []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            ys.append(self.readout(h))
        return torch.stack(ys, 1)


class LayersAndTheirInputs(nn.Module):
    """Per-layer weights; every layer's input (a view of the state, and a function of it) is returned too."""

    def __init__(self, depth=10, width=6):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        views, squares = [], []
        for layer in self.layers:
            views.append(x[:, :3])
            squares.append(x.square())
            x = torch.tanh(layer(x))
        return x, views, squares


class GRUCastReadout(GRUReadout):
    """As xLSTM's cell: the state carried is ``h.to(dtype)`` and the readout reads another ``h.to(dtype)`` (both
    same-dtype casts of one value)."""

    def forward(self, x):
        h, ys = x.new_zeros(x.shape[0], self.hidden), []
        for t in range(x.shape[1]):
            new = self.cell(x[:, t], h)
            ys.append(self.readout(new.to(x.dtype)))
            h = new.to(x.dtype)
        return torch.stack(ys, 1)


def cast_readout_case(seed=0):
    torch.manual_seed(seed)
    return GRUCastReadout().double(), (torch.randn(2, 16, 4, dtype=torch.float64),)


def gru_case(seed=0):
    torch.manual_seed(seed)
    return GRUReadout().double(), (torch.randn(2, 16, 4, dtype=torch.float64),)


def layers_case(seed=0):
    torch.manual_seed(seed)
    return LayersAndTheirInputs().double(), (torch.randn(5, 6, dtype=torch.float64),)


def loss_of(outputs):
    """A loss that reads every output with distinct weights (so a swapped or missing gradient shows)."""
    leaves = [leaf for leaf in torch.utils._pytree.tree_leaves(outputs)
              if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]
    generator = torch.Generator().manual_seed(1)
    return sum((torch.randn(leaf.shape, dtype=leaf.dtype, generator=generator) * leaf).sum() for leaf in leaves)


def assert_outputs_and_gradients_equal_eager(model, inputs, **options):
    compiled, backend = compile_with(model, **options)
    inputs = [x.clone().requires_grad_() for x in inputs]
    got, want = compiled(*inputs), model(*inputs)
    torch.testing.assert_close(got, want, atol=F64_ATOL, rtol=0)
    wrt = [*inputs, *[p for p in model.parameters() if p.requires_grad]]
    got_grads = torch.autograd.grad(loss_of(got), wrt, allow_unused=True)
    want_grads = torch.autograd.grad(loss_of(want), wrt, allow_unused=True)
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got_grad, want_grad, atol=F64_ATOL, rtol=0)
    return backend


@pytest.mark.parametrize("case", [gru_case, cast_readout_case, layers_case],
                         ids=["gru_readout", "cast_readout", "layers_inputs"])
@pytest.mark.parametrize("options", [
    {"policy": "parallel"},
    {"policy": "parallel", "adjoint": "sequential"},
    {"policy": "sequential", "sequential_form": "rolled"},
], ids=["parallel", "parallel_sequential_adjoint", "rolled"])
def test_per_step_outputs_and_their_gradients_equal_eager(case, options):
    model, inputs = case()
    backend = assert_outputs_and_gradients_equal_eager(model, inputs, **options)
    (chain,) = chain_reports(backend)
    assert chain.decision != "rejected" and chain.outputs == (2 if case is layers_case else 1)


class GRUArgmax(GRUReadout):
    """Also returns each step's ``argmax`` (an integer output: served, not differentiated)."""

    def forward(self, x):
        h, ys, picks = x.new_zeros(x.shape[0], self.hidden), [], []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            ys.append(self.readout(h))
            picks.append(h.argmax(-1))
        return torch.stack(ys, 1), torch.stack(picks, 1)


def test_integer_per_step_outputs_are_served_and_the_float_ones_differentiated():
    torch.manual_seed(0)
    backend = assert_outputs_and_gradients_equal_eager(
        GRUArgmax().double(), (torch.randn(2, 16, 4, dtype=torch.float64),), policy="parallel"
    )
    (chain,) = chain_reports(backend)
    assert (chain.decision, chain.outputs) == ("parallel", 2)


def test_a_stack_of_a_per_step_output_becomes_a_view_of_the_served_outputs():
    model, inputs = gru_case()
    compiled, backend = compile_with(model, policy="parallel")
    with torch.no_grad():
        compiled(*inputs)
    (record,) = backend.graphs
    assert "seqpar.chain_outputs" in record.rewritten_code and "torch.movedim" in record.rewritten_code
    assert "torch.stack" not in record.rewritten_code and "select" not in record.rewritten_code


@pytest.mark.parametrize("case, reads_next", [(gru_case, True), (cast_readout_case, True), (layers_case, False)],
                         ids=["readout_of_the_new_state", "readout_of_a_cast_of_it", "views_of_the_layer_input"])
def test_outputs_that_read_the_new_state_are_evaluated_at_it_without_computing_the_step_again(case, reads_next):
    model, inputs = case()
    compiled, backend = compile_with(model, policy="parallel")
    with torch.no_grad():
        compiled(*inputs)
    ((report, program),) = backend.graphs[0].programs
    assert program.outputs_at_next is reads_next
    torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=F64_ATOL, rtol=0)
    if reads_next:  # g is the readout alone: the GRU cell is not in it
        assert "gru_cell" in report.step_code and "gru_cell" not in report.output_code


def test_frozen_readout_weights_get_no_gradient_and_the_rest_stay_exact():
    model, inputs = gru_case()
    model.readout.requires_grad_(False)
    assert_outputs_and_gradients_equal_eager(model, inputs, policy="parallel")


def test_double_backward_through_per_step_outputs_equals_eager():
    model, inputs = gru_case()
    compiled, _ = compile_with(model, policy="parallel")
    x = inputs[0].clone().requires_grad_()

    def grad_norm(fn):
        (grad,) = torch.autograd.grad(loss_of(fn(x)), [x], create_graph=True)
        return torch.autograd.grad(grad.square().sum(), [model.readout.weight, x])

    for got, want in zip(grad_norm(compiled), grad_norm(model), strict=True):
        torch.testing.assert_close(got, want, atol=F64_ATOL, rtol=0)


def test_verify_accepts_served_outputs():
    model, inputs = gru_case()
    compiled, backend = compile_with(model, policy="parallel", verify=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=F64_ATOL, rtol=0)
    (record,) = backend.graphs
    assert record.verification and all("MISMATCH" not in line for line in record.verification)


def test_explain_counts_the_outputs_and_the_dump_shows_their_graph(tmp_path):
    model, inputs = gru_case()
    report = seqpar.explain(model, *inputs, options={"policy": "parallel", "min_chain": 4})
    (chain,) = report.chains
    assert chain.outputs == 1 and "outputs" in str(report).splitlines()[1]
    compiled, _ = compile_with(model, policy="parallel", debug_dir=str(tmp_path))
    with torch.no_grad():
        compiled(*inputs)
    (folder,) = [path for path in tmp_path.iterdir() if path.is_dir()]
    step, outputs = (folder / "chain_0_step.py").read_text(), (folder / "chain_0_outputs.py").read_text()
    assert "gru_cell" in step and "linear" in outputs


transformers = pytest.importorskip("transformers")


def tiny_mamba():
    """transformers' Mamba on its reference loop (no mamba_ssm / causal_conv1d kernels on a CPU):
    ``ssm_state = dA[:, :, i] * ssm_state + dBu[:, :, i]``, each step's ``scan_output`` appended, then stacked."""
    torch.manual_seed(0)
    config = transformers.MambaConfig(vocab_size=50, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2,
                                      conv_kernel=4, use_mambapy=False)
    config.use_associative_scan = False
    return transformers.MambaModel(config).double().eval(), torch.randint(0, 50, (2, 12))


def test_mamba_reference_loop_is_served_with_its_per_step_outputs():
    model, ids = tiny_mamba()
    compiled, backend = compile_with(lambda ids: model(ids).last_hidden_state, policy="parallel")
    got, want = compiled(ids), model(ids).last_hidden_state
    torch.testing.assert_close(got, want, atol=F64_ATOL, rtol=0)
    chains = chain_reports(backend)
    assert [(chain.kind, chain.outputs) for chain in chains] == [("recurrent", 1)] * 2
    assert all(chain.decision == "parallel" for chain in chains)
    weights = [model.layers[0].mixer.A_log, model.layers[1].mixer.x_proj.weight]
    got_grads = torch.autograd.grad(loss_of(got), weights)
    want_grads = torch.autograd.grad(loss_of(want), weights)
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got_grad, want_grad, atol=F64_ATOL, rtol=0)


def test_mambas_compiled_path_an_inlined_associative_scan_is_one_candidate_that_says_what_it_is():
    torch.manual_seed(0)
    config = transformers.MambaConfig(vocab_size=50, hidden_size=16, state_size=4, num_hidden_layers=1, expand=2,
                                      conv_kernel=4, use_mambapy=False)
    assert config.use_associative_scan  # the default: taken when Dynamo compiles
    model, ids = transformers.MambaModel(config).double().eval(), torch.randint(0, 50, (1, 16))
    (candidate,) = seqpar.explain(model, ids).chains  # its 4 levels are far below min_chain: reported still
    assert candidate.decision == "rejected" and "associative_scan" in candidate.reason
    assert candidate.length == 16  # the scanned length, not the number of levels
    compiled, _ = compile_with(model, policy="parallel")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).last_hidden_state, model(ids).last_hidden_state, atol=F64_ATOL,
                                   rtol=0)


def tiny_rwkv():
    """RWKV's CPU loop (``rwkv_linear_attention_cpu``): state ``(num, den, max)``, ``output[:, t] = ...``."""
    torch.manual_seed(0)
    config = transformers.RwkvConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, attention_hidden_size=16,
                                     intermediate_size=32, context_length=64)
    return transformers.RwkvModel(config).double().eval(), torch.randint(0, 50, (2, 12))


def tiny_recurrent_gemma():
    """RecurrentGemma's RG-LRU loop (``contextualized_states[:, t] = ...``), one recurrent and one attention block."""
    torch.manual_seed(0)
    config = transformers.RecurrentGemmaConfig(
        num_hidden_layers=2, vocab_size=50, hidden_size=16, intermediate_size=32, num_attention_heads=2, head_dim=8,
        num_key_value_heads=1, lru_width=16, attention_window_size=8, conv1d_width=4,
        block_types=["recurrent", "attention"],
    )
    return transformers.RecurrentGemmaModel(config).double().eval(), torch.randint(0, 50, (2, 12))


# Both recurrences run in float32 whatever the model's dtype (RWKV: ``key[:, t].float()``; RG-LRU: its
# ``acc_dtype``), so the chain is a float32 chain: compared at float32's tolerance, 1e-5 of the values' scale.
F32_RTOL = 1e-5


def assert_close_at_scale(got, want, rtol=F32_RTOL):
    torch.testing.assert_close(got, want, atol=rtol * want.abs().max().item(), rtol=0)


def assert_weight_gradients_close(model, got, want):
    """The gradients of ``loss_of`` through ``got`` and through ``want`` for every trainable parameter of ``model``
    close at their scale (parameters ``want`` does not depend on are skipped).

    A gradient no larger than the rounding of the backward pass, the unit roundoff of its dtype times the largest
    gradient, has no scale of its own: it is zero in exact arithmetic and rounding in eager and in seqpar alike
    (Qwen3-Next's MoE router under top-1 routing, its weight renormalised to 1, from transformers 5.25: 2e-7, 1e-9
    of the largest gradient, in both). Such a gradient is compared at that rounding level instead."""
    weights = [parameter for parameter in model.parameters() if parameter.requires_grad]
    got_grads = torch.autograd.grad(loss_of(got), weights, allow_unused=True)
    want_grads = torch.autograd.grad(loss_of(want), weights, allow_unused=True)
    largest = max(grad.abs().max().item() for grad in want_grads if grad is not None)
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        if want_grad is None:
            continue
        rounding = torch.finfo(want_grad.dtype).eps * largest
        if want_grad.abs().max() <= rounding:
            torch.testing.assert_close(got_grad, want_grad, atol=rounding, rtol=0)
        else:
            assert_close_at_scale(got_grad, want_grad)


# RWKV's loop carries num, den and a running max per layer: one chain each (found in successive detection
# rounds); the max chain serves the exponential factors the other two read (6 per-step outputs).
@pytest.mark.parametrize("make, outputs", [(tiny_rwkv, [1, 1, 1, 1, 6, 6]), (tiny_recurrent_gemma, [1])],
                         ids=["rwkv", "recurrent_gemma"])
def test_recurrences_writing_a_buffer_per_step_are_served(make, outputs):
    model, ids = make()
    compiled, backend = compile_with(lambda ids: model(ids).last_hidden_state, policy="parallel")
    with torch.no_grad():
        assert_close_at_scale(compiled(ids), model(ids).last_hidden_state)
    solved = [chain for chain in chain_reports(backend) if chain.decision != "rejected"]
    assert [(chain.kind, chain.decision, chain.outputs) for chain in solved] == [
        ("recurrent", "parallel", count) for count in outputs]


def test_every_rwkv_step_that_computes_a_state_is_in_its_chain():
    """RWKV's ``den`` and ``max`` chains are found in later rounds, on the graph with ``num``'s chain rewritten,
    where step 0 differs from the others and joins by extension. It joins only when every per-step input of the
    step is found, those only its per-step output reads included (``e1 * num`` of the output): all 11 steps of 12
    that compute a state (the last computes its output alone, from the chain's last state) in each of the six
    chains. (In float64 the chains begin at step 1: RWKV's initial ``num`` and ``den`` are float32 and step 0
    promotes them, a step of other dtypes than the rest.)"""
    model, ids = tiny_rwkv()
    model = model.float()
    compiled, backend = compile_with(lambda ids: model(ids).last_hidden_state, policy="parallel")
    with torch.no_grad():
        assert_close_at_scale(compiled(ids), model(ids).last_hidden_state)
    solved = [chain for chain in chain_reports(backend) if chain.decision != "rejected"]
    assert [(chain.decision, chain.length) for chain in solved] == [("parallel", 11)] * 6


# In float32 the per-step output is the state itself (no cast to the model's dtype), written into the buffer:
# its VJP is its cotangent, which the op returns as a copy, never as its input.
@pytest.mark.parametrize("dtype, options", [
    (torch.float64, {"policy": "parallel"}),
    (torch.float32, {"policy": "parallel"}),
    (torch.float32, {"policy": "sequential", "sequential_form": "rolled"}),
])
def test_recurrent_gemma_gradients_through_the_served_recurrence_equal_eager(dtype, options):
    # (RWKV's CPU loop cannot be differentiated in eager either: its backward finds a tensor changed in place.)
    model, ids = tiny_recurrent_gemma()
    model = model.to(dtype)
    compiled, _ = compile_with(lambda ids: model(ids).last_hidden_state, **options)
    got, want = compiled(ids), model(ids).last_hidden_state
    assert_close_at_scale(got, want)
    assert_weight_gradients_close(model, got, want)


def tiny_xlstm():
    """xLSTM's native recurrent loop (``mlstm_recurrent_sequence_native``): matrix memory ``C``, normaliser ``n``,
    stabiliser ``m``, each step's ``h`` appended and stacked. transformers takes it for the part of a sequence
    shorter than ``chunk_size`` in inference mode: with ``chunk_size`` above the sequence, all of it.
    (``qk_dim_factor = v_dim_factor = 1`` and ``hidden_size`` a multiple of 64: the model's cache is sized from the
    dims rounded up to 64, its layers from the unrounded ones.)"""
    torch.manual_seed(0)
    config = transformers.xLSTMConfig(vocab_size=50, hidden_size=64, num_heads=4, num_blocks=2, mode="inference",
                                      chunk_size=4096, qk_dim_factor=1.0, v_dim_factor=1.0)
    return transformers.xLSTMModel(config).double().eval(), torch.randint(0, 50, (2, 12))


def test_xlstm_native_recurrent_loop_is_served_with_its_per_step_outputs_and_gradients():
    # The mLSTM state is float32 whatever the model's dtype (``inference_state_dtype``): float32 tolerance.
    model, ids = tiny_xlstm()
    run = lambda ids: model(ids, use_cache=False).last_hidden_state  # noqa: E731
    compiled, backend = compile_with(run, policy="parallel")
    got, want = compiled(ids), run(ids)
    assert_close_at_scale(got, want)
    # Per layer: the memory C, then (next detection rounds) the normaliser n and the stabiliser m, which serves
    # the gates' factors (5 per-step outputs).
    solved = [chain for chain in chain_reports(backend) if chain.decision != "rejected"]
    assert [(chain.kind, chain.decision, chain.outputs) for chain in solved] == [
        ("recurrent", "parallel", count) for count in (1, 1, 1, 1, 5, 5)]
    assert_weight_gradients_close(model, got, want)


@pytest.mark.parametrize("options", [{"policy": "parallel"}, {"policy": "sequential", "sequential_form": "rolled"}])
def test_xlstm_with_its_cache_trains_as_eager(options):
    # With a cache xLSTM writes each layer's final (C, n, m) into the buffers its initial state was read from
    # (``c_initial.copy_(C_L)``): the chain ops, which keep s0 for the backward, get a clone of it; autograd refused
    # the saved s0 changed in place before ("modified by an inplace operation"), where eager trains.
    model, ids = tiny_xlstm()
    run = lambda ids: model(ids, use_cache=True).last_hidden_state  # noqa: E731
    compiled, backend = compile_with(run, **options)
    got, want = compiled(ids), run(ids)
    assert_close_at_scale(got, want)
    assert [chain for chain in chain_reports(backend) if chain.decision != "rejected"]
    assert_weight_gradients_close(model, got, want)


def tiny_falcon_mamba():
    """FalconMamba: Mamba's reference loop with RMS-normalised B, C and dt."""
    torch.manual_seed(0)
    config = transformers.FalconMambaConfig(vocab_size=50, hidden_size=16, state_size=4, num_hidden_layers=1,
                                            expand=2, conv_kernel=4, use_mambapy=False)
    config.use_associative_scan = False
    return transformers.FalconMambaModel(config).double(), torch.randint(0, 50, (2, 12))


def tiny_minimax():
    """MiniMax's lightning attention on its PyTorch path: the key-value state ``kv = decay kv + k^T v`` carried
    over the sequence's blocks of ``block_size`` positions (12 here), one linear-attention layer and one
    full-attention layer. Float32: its experts' grouped products take no float64."""
    torch.manual_seed(0)
    config = transformers.MiniMaxConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, layer_types=["linear_attention", "full_attention"], num_local_experts=2,
        num_experts_per_tok=1, block_size=4)
    return transformers.MiniMaxModel(config), torch.randint(0, 50, (2, 48))


def tiny_qwen3_next():
    """Qwen3-Next's gated delta rule on its PyTorch path (``torch_chunk_gated_delta_rule``): the state
    ``S = S g + k^T (v - k S g)`` (affine in ``S``, not diagonal) carried over chunks of 64 positions (6 here; the
    chain begins after the first, whose state is zero). Float32, as MiniMax."""
    torch.manual_seed(0)
    config = transformers.Qwen3NextConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8, layer_types=["linear_attention", "full_attention"], num_experts=2,
        num_experts_per_tok=1, moe_intermediate_size=16, shared_expert_intermediate_size=16)
    return transformers.Qwen3NextModel(config), torch.randint(0, 50, (2, 384))


@pytest.mark.parametrize("make", [tiny_mamba, pytest.param(tiny_rwkv, marks=pytest.mark.slow),
                                  pytest.param(tiny_xlstm, marks=pytest.mark.slow)], ids=["mamba", "rwkv", "xlstm"])
def test_dynamic_true_is_specialised_per_length_and_solved(make):
    # dynamic=True makes every float attribute (the embedding's norm_type, the norms' eps) a 0-d tensor read
    # with item(): seqpar's per-shape copy once failed on it (DataDependentOutputException; RWKV's layer_norm
    # needs its eps's value), so the models did not run at all; xLSTM's steps negate a bool with operator.not_,
    # once taken for an in-place op (its trailing underscore). xLSTM's memory is float32: its tolerance.
    model, ids = make()
    torch._dynamo.reset()
    backend = SeqparBackend({"policy": "parallel", "inner": "eager", "min_chain": 4})
    compiled = torch.compile(model, backend=backend, dynamic=True)
    with torch.no_grad():
        for length in (12, 20):
            x = torch.randint(0, 50, (2, length))
            got, want = compiled(x).last_hidden_state, model(x).last_hidden_state
            if make is tiny_xlstm:
                assert_close_at_scale(got, want)
            else:
                torch.testing.assert_close(got, want, atol=F64_ATOL, rtol=0)
    decided = [[chain.decision for chain in graph.chains if chain.decision != "rejected"] for graph in backend.graphs]
    assert len(decided) == 2 and all(decisions and set(decisions) == {"parallel"} for decisions in decided)


@pytest.mark.parametrize("make, lengths", [(tiny_recurrent_gemma, (12, 20)),
                                           pytest.param(tiny_minimax, (48, 64), marks=pytest.mark.slow)],
                         ids=["recurrent_gemma", "minimax"])
def test_a_second_sequence_length_keeps_the_chains(make, lengths):
    # RecurrentGemma's second length: a static graph with specialised SymInt sizes, whose buffer writes were
    # taken for symbolic; MiniMax's: a symbolic graph whose chain only its per-shape copy shows. Both lost
    # their chains at the second length (the values stayed eager's).
    model, ids = make()
    model.eval()
    compiled, backend = compile_with(model, policy="parallel")
    with torch.no_grad():
        for length in lengths:
            x = torch.randint(0, 50, (ids.shape[0], length))
            assert_close_at_scale(compiled(x).last_hidden_state, model(x).last_hidden_state)
    decided = [[chain.decision for chain in graph.chains if chain.decision != "rejected"] for graph in backend.graphs]
    assert len(decided) == 2 and all(decisions and set(decisions) == {"parallel"} for decisions in decided)


@pytest.mark.parametrize("make, length, atol", [(tiny_falcon_mamba, 12, F64_ATOL), (tiny_minimax, 12, None),
                                                (tiny_qwen3_next, 5, None)],
                         ids=["falcon_mamba", "minimax", "qwen3_next"])
def test_more_recurrent_families_reference_loops_train_as_eager(make, length, atol):
    # Beyond issue 13's families: their reference PyTorch loops (no custom kernels on a CPU) found and solved,
    # outputs and every weight's gradient as eager's (float64 to 1e-9; float32 at 1e-5 of the values' scale).
    model, ids = make()
    run = lambda ids: model(ids).last_hidden_state  # noqa: E731
    compiled, backend = compile_with(run, policy="parallel")
    got, want = compiled(ids), run(ids)
    (chain,) = [chain for chain in chain_reports(backend) if chain.decision != "rejected"]
    assert (chain.kind, chain.length, chain.decision) == ("recurrent", length, "parallel")
    if atol is None:
        assert_close_at_scale(got, want)
        assert_weight_gradients_close(model, got, want)
        return
    torch.testing.assert_close(got, want, atol=atol, rtol=0)
    weights = [parameter for parameter in model.parameters() if parameter.requires_grad]
    for got_grad, want_grad in zip(torch.autograd.grad(loss_of(got), weights),
                                   torch.autograd.grad(loss_of(want), weights), strict=True):
        torch.testing.assert_close(got_grad, want_grad, atol=atol, rtol=0)
