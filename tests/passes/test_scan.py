"""Scans as chains: ``seqpar.scan_layers`` and ``torch.ops.higher_order.scan`` calls under the backend.

Tolerances as in test_backend.py: float64 models, the solver's float64
tolerance, 1e-9 absolute for outputs and gradients; ``scan_layers`` itself
runs the blocks' own ops, so it equals the ``nn.Sequential`` to rounding
(1e-12 in float64: the ops are the same, only their batching differs).
"""

import pytest
import torch
import torch.nn as nn
from torch._higher_order_ops.scan import scan

import seqpar
from seqpar.passes.detect import find_chains
from tests.e2e.test_backend import F64_ATOL, chain_reports, compile_with, gradients, to_double
from tests.passes.test_detect import capture
from seqpar.testing import models as zoo


def mlp_blocks(depth=8, width=4):
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)]).double()


def scan_graph(fn, inputs):
    """The one graph Dynamo makes of ``fn(*inputs)`` (a model is run in float64, as ``capture`` does)."""
    if isinstance(fn, nn.Module):
        (graph,) = capture(fn, inputs)
        return graph[0]
    graphs = []
    torch._dynamo.reset()
    torch.compile(fn, backend=lambda gm, _: graphs.append(gm) or gm.forward)(*inputs)
    (gm,) = graphs
    return gm


# --------------------------------------------------------------------------- #
# seqpar.scan_layers
# --------------------------------------------------------------------------- #


def test_scan_layers_equals_the_blocks_run_one_after_another():
    blocks = mlp_blocks()
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(seqpar.scan_layers(blocks)(x), blocks(x), rtol=0, atol=1e-12)


def test_scan_layers_stacks_parameters_and_buffers_under_the_blocks_names():
    model, _ = zoo.scanned_resnet(blocks=5)
    stacked = model.layers
    assert stacked.parameter_names[:2] == ["conv1.weight", "bn1.weight"]
    assert "bn1.running_mean" in stacked.buffer_names
    assert stacked.conv1_weight.shape == (5, 4, 4, 3, 3)
    assert isinstance(stacked.conv1_weight, nn.Parameter)
    assert stacked.bn1_running_mean.shape == (5, 4)
    assert all(not name.startswith("_template") for name, _ in stacked.named_parameters())


def test_to_sequential_gives_the_blocks_back():
    blocks = mlp_blocks(depth=5)
    restored = seqpar.scan_layers(blocks).to_sequential()
    x = torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(restored(x), blocks(x), rtol=0, atol=0)
    assert len(restored) == 5


def test_scan_layers_follows_train_and_eval():
    stacked = seqpar.scan_layers([nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)) for _ in range(3)])
    stacked.eval()
    assert not stacked._template[0][1].training
    stacked.train()
    assert stacked._template[0][1].training


def test_scan_layers_says_why_batchnorm_cannot_train_in_a_scan():
    stacked = seqpar.scan_layers([nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)) for _ in range(3)])
    with pytest.raises(ValueError, match="BatchNorm in training mode updates its running statistics"):
        stacked(torch.randn(2, 4))
    assert stacked.eval()(torch.randn(2, 4)).shape == (2, 4)


@pytest.mark.parametrize("blocks, message", [
    ([], "at least one block"),
    (nn.Linear(4, 4), "not one Linear"),
    ([nn.Linear(4, 4), nn.Linear(4, 5)], "block 1 differs from block 0 in its parameters"),
    ([nn.Linear(4, 4), nn.Tanh()], "block 1 differs from block 0 in its type"),
    ([nn.Linear(4, 4), nn.Linear(4, 4).eval()], "block 1 differs from block 0 in its training mode"),
    ([nn.Linear(4, 4), "tanh"], "block 1 is a str"),
])
def test_scan_layers_rejects_blocks_of_different_structure_with_a_clear_error(blocks, message):
    with pytest.raises(ValueError, match=message):
        seqpar.scan_layers(blocks)


# --------------------------------------------------------------------------- #
# detection
# --------------------------------------------------------------------------- #


def test_a_scan_over_stacked_layers_is_one_chain_of_slice_inputs():
    model, inputs = zoo.scanned_mlp(depth=12)
    chains, candidates = find_chains(scan_graph(model, inputs))
    (chain,) = chains
    assert not candidates
    assert (chain.kind, chain.length, chain.origin, chain.modules[0]) == ("layers", 12, "scan", "layers")
    assert [(item.kind, item.dim, item.start, item.stride) for item in chain.per_step] == [("slice", 0, 0, 1)] * 2
    assert chain.state_shape == (3, 4) and chain.batch_ndim == 1
    assert chain.all_states is None


def test_a_scan_step_computes_the_body_s_next_carry():
    model, inputs = to_double(*zoo.scanned_mlp(depth=6))
    (chain,), _ = find_chains(scan_graph(model, inputs))
    x = inputs[0]
    blocks = model.layers.to_sequential()
    rows = [model.layers.get_parameter(name.replace(".", "_"))[2] for name in model.layers.parameter_names]
    torch.testing.assert_close(chain.step(x, *rows), blocks[2](x), rtol=0, atol=0)


def test_a_scan_whose_outputs_are_its_carries_serves_them_from_the_stacked_states():
    model, inputs = zoo.scan_lstm(outputs="all")
    (chain,), _ = find_chains(scan_graph(model, inputs))
    assert chain.kind == "recurrent" and chain.length == 12
    assert chain.state_shape == ((2, 5), (2, 5))
    assert chain.all_states[0] is not None and chain.all_states[1] is None  # every h is read, no c
    assert chain.outputs[-1] == (None, None)  # the final carry itself is not read


def stepwise_outputs(h0, xs, W):
    """A scan whose per-step output is ``2 h``: not a carry, so not a chain."""
    def step(h, x):
        h = torch.tanh(h @ W.T + x)
        return h, 2 * h

    return scan(step, h0, xs)[1]


def short_scan(h0, xs, W):
    return scan(lambda h, x: (torch.tanh(h @ W.T + x), ()), h0, xs)[0]


def random_scan(h0, xs, W):
    return scan(lambda h, x: (torch.tanh(h @ W.T + x) + 0.1 * torch.randn_like(h), ()), h0, xs)[0]


@pytest.mark.parametrize("fn, steps, reason", [
    (stepwise_outputs, 8, "per-step output 0 is not its carry"),
    (short_scan, 3, "scan of 3 steps, shorter than min_chain=4"),
    (random_scan, 8, "draws random numbers"),
])
def test_a_scan_that_is_not_a_chain_is_a_candidate_with_the_reason(fn, steps, reason):
    W = torch.randn(4, 4, dtype=torch.float64) / 2
    inputs = (torch.randn(2, 4, dtype=torch.float64), torch.randn(steps, 2, 4, dtype=torch.float64))
    gm = scan_graph(lambda h0, xs: fn(h0, xs, W), inputs)
    chains, (candidate,) = find_chains(gm)
    assert not chains
    assert reason in candidate.reason and candidate.length == steps


# --------------------------------------------------------------------------- #
# the backend
# --------------------------------------------------------------------------- #


def test_a_rewritten_scan_leaves_no_scan_in_the_graph():
    model, inputs = to_double(*zoo.scanned_mlp(depth=16))
    compiled, backend = compile_with(model, policy="parallel")
    torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=F64_ATOL, rtol=0)
    (graph,) = backend.graphs
    assert "higher_order.scan" in graph.original_code
    assert "higher_order.scan" not in graph.rewritten_code and "chain_solve" in graph.rewritten_code


def test_a_scan_kept_sequential_stays_a_scan_for_the_inner_backend():
    model, inputs = to_double(*zoo.scan_lstm(outputs="all", reverse=True))
    compiled, backend = compile_with(model, policy="sequential", sequential_form="unrolled")
    torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=0, rtol=0)
    (chain,) = chain_reports(backend)
    assert (chain.decision, chain.form) == ("sequential", "scan")
    assert "higher_order.scan" in backend.graphs[0].rewritten_code


def test_a_scan_kept_sequential_in_the_rolled_form_still_equals_eager():
    model, inputs = to_double(*zoo.scanned_mlp(depth=16))
    compiled, backend = compile_with(model, policy="sequential", sequential_form="rolled")
    torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=F64_ATOL, rtol=0)
    for got, want in zip(gradients(compiled, inputs), gradients(model, inputs)):
        torch.testing.assert_close(got, want, atol=F64_ATOL, rtol=0)
    (chain,) = chain_reports(backend)
    assert (chain.decision, chain.form) == ("sequential", "rolled")


def test_a_rejected_scan_runs_unchanged():
    W = torch.randn(4, 4, dtype=torch.float64) / 2
    inputs = (torch.randn(2, 4, dtype=torch.float64), torch.randn(8, 2, 4, dtype=torch.float64))
    fn = lambda h0, xs: stepwise_outputs(h0, xs, W)  # noqa: E731
    compiled, backend = compile_with(fn, policy="parallel")
    torch.testing.assert_close(compiled(*inputs), fn(*inputs), atol=0, rtol=0)
    (chain,) = chain_reports(backend)
    assert chain.decision == "rejected"


def test_a_deep_scanned_mlp_is_solved_in_parallel_by_the_auto_policy_on_cpu():
    # L = 1024, N*w = 4: inside the CPU cost model's parallel forward and adjoint (passes/policy.py).
    model, inputs = to_double(*zoo.scanned_mlp(depth=1024, batch=1))
    compiled, backend = compile_with(model, policy="auto", verify=True)
    torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=F64_ATOL, rtol=0)
    (chain,) = chain_reports(backend)
    assert (chain.kind, chain.length, chain.decision, chain.method, chain.adjoint) == (
        "layers", 1024, "parallel", "parallel", "parallel")
    assert chain.lyapunov is not None and chain.lyapunov < 0
    assert all(" ok" in line for line in backend.graphs[0].verification)


def test_explain_reports_a_scanned_stack():
    model, inputs = zoo.scanned_mlp(depth=32)
    report = seqpar.explain(model, *inputs, options={"policy": "parallel"})
    (chain,) = report.chains
    assert (chain.kind, chain.length, chain.modules[0], chain.decision) == ("layers", 32, "layers", "parallel")
    assert "layers" in str(report)


def test_explain_points_a_long_unrolled_stack_at_scan_layers():
    model, inputs = zoo.deep_mlp(depth=256, width=4, batch=1)
    report = seqpar.explain(model, *inputs, options={"policy": "sequential"})
    (chain,) = report.chains
    assert chain.origin == "unrolled" and chain.length == 256
    assert any(hint.startswith("chain 0: Dynamo traced 256 blocks") and "seqpar.scan_layers" in hint
               for hint in report.hints)
    scanned, inputs = zoo.scanned_mlp(depth=256, batch=1)
    report = seqpar.explain(scanned, *inputs, options={"policy": "sequential"})
    assert report.chains[0].origin == "scan" and not report.hints


def test_a_short_scan_kept_sequential_runs_in_the_rolled_loop_under_inductor():
    """Inductor (torch 2.13) rejects scan_layers' scan ("might be aliasing the input or the output"); a scan
    kept sequential therefore runs in the chain op's loop at any length, and the graph compiles."""
    model, inputs = to_double(*zoo.scanned_mlp(depth=8))
    compiled, backend = compile_with(model, policy="sequential", inner="inductor")
    torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=F64_ATOL, rtol=0)
    (chain,) = chain_reports(backend)
    assert (chain.decision, chain.form) == ("sequential", "rolled")


class EncoderStack(nn.Module):
    """``nn.TransformerEncoderLayer`` blocks as ``scan_layers``, with one attention mask for every block."""

    def __init__(self, layers=6, d_model=16, nhead=2):
        super().__init__()
        blocks = [nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=2 * d_model, batch_first=True)
                  for _ in range(layers)]
        self.reference = nn.ModuleList(blocks)
        self.layers = seqpar.scan_layers(blocks)

    def forward(self, x, mask):
        return self.layers(x, src_mask=mask)


def test_scan_layers_passes_shared_arguments_to_every_block_and_transformer_stacks_are_chains():
    model = EncoderStack().double().eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    mask = torch.zeros(5, 5, dtype=torch.float64)
    mask[0, 1] = -1e9
    expected = x
    for block in model.reference:
        expected = block(expected, src_mask=mask)
    torch.testing.assert_close(model(x, mask), expected, rtol=0, atol=1e-12)
    compiled, backend = compile_with(model, policy="parallel")
    torch.testing.assert_close(compiled(x, mask), expected, atol=F64_ATOL, rtol=0)
    (chain,) = chain_reports(backend)
    assert (chain.kind, chain.length, chain.modules[0], chain.decision) == ("transformer", 6, "layers", "parallel")
    compiled(x, mask).square().sum().backward()
    got = model.layers.self_attn_in_proj_weight.grad.clone()
    model.zero_grad()
    model(x, mask).square().sum().backward()
    torch.testing.assert_close(got, model.layers.self_attn_in_proj_weight.grad, atol=F64_ATOL, rtol=0)


# --------------------------------------------------------------------------- #
# random scans: whatever the pass decides, the numbers are the scan's
# --------------------------------------------------------------------------- #

ACTIVATIONS = (torch.tanh, torch.sigmoid, torch.nn.functional.silu, torch.sin)


def random_scan(seed):
    """``(fn, inputs, expect_chain)``: a scan with 1-2 carries, 1-2 per-step inputs on dim 0 or 1, forward or
    reversed, whose per-step outputs are nothing, a copy of a carry, or a function of the carry (read or not)."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda options: options[int(torch.randint(len(options), (), generator=g))]  # noqa: E731
    carries, inputs, dim, reverse = pick((1, 2)), pick((1, 2)), pick((0, 1)), pick((False, True))
    outputs = pick(("none", "copy", "other-unread", "other-read"))
    width, steps, batch = 3, int(torch.randint(5, 12, (), generator=g)), 2
    W = [torch.randn(width, width, generator=g, dtype=torch.float64) * 0.6 for _ in range(carries)]
    acts = [pick(ACTIVATIONS) for _ in range(carries)]

    def step(carry, x):
        carry = carry if isinstance(carry, tuple) else (carry,)
        drive = sum(x)
        new = tuple(act(c @ w.T + drive + (carry[0] if k else 0)) for k, (c, w, act) in enumerate(zip(carry, W, acts)))
        y = {"none": (), "copy": new[-1].clone()}.get(outputs, 2 * new[0] + 1)
        return (new if carries > 1 else new[0]), y

    def fn(*args):
        init = args[:carries] if carries > 1 else args[0]
        final, ys = scan(step, init, list(args[carries:]), dim=dim, reverse=reverse)
        final = final if isinstance(final, tuple) else (final,)
        return (*final, ys) if outputs in ("copy", "other-read") else final

    shape = (steps, batch, width) if dim == 0 else (batch, steps, width)
    args = [torch.randn(batch, width, generator=g, dtype=torch.float64) for _ in range(carries)]
    args += [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(inputs)]
    return fn, tuple(args), outputs != "other-read"


@pytest.mark.parametrize("seed", range(12))
def test_random_scans_compile_to_the_scan_s_numbers(seed):
    fn, inputs, expect_chain = random_scan(seed)
    compiled, backend = compile_with(fn, policy="parallel")
    torch.testing.assert_close(compiled(*inputs), fn(*inputs), atol=F64_ATOL, rtol=0)
    (chain,) = chain_reports(backend)
    assert chain.decision == ("parallel" if expect_chain else "rejected"), chain.reason


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_a_graph_the_inner_backend_cannot_compile_runs_eagerly_and_says_why(grad):
    """Dropout in training keeps the scan (random draws on the state path); inductor (torch 2.13) fails on
    that scan, so the graph runs eagerly, with the reason in the record, instead of failing the compile."""
    torch._dynamo.reset()
    model = seqpar.scan_layers([nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Tanh()) for _ in range(8)])
    backend = seqpar.backend.SeqparBackend({"inner": "inductor"})
    x = torch.randn(3, 4)
    with torch.set_grad_enabled(grad):
        torch.manual_seed(1)
        got = torch.compile(model, backend=backend)(x)
        torch.manual_seed(1)
        want = model(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    (graph,) = backend.graphs
    assert graph.inner_error.startswith("inner backend 'inductor' failed") and "runs eagerly" in graph.inner_error
