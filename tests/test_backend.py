"""torch.compile(backend="seqpar"): equivalence with eager PyTorch on the zoo, and the backend's contract.

Tolerances: the zoo runs in float64 with the solver's float64 tolerance
(|ds| <= 1e-10 (1 + |s|)); Newton converges quadratically, so the states are
exact to rounding (~1e-15) and gradients, computed by the exact adjoint at
that solution, are too. 1e-9 absolute leaves room for conditioning of the
deeper chains; float32 comparisons use 1e-4 relative (the float32 tolerance
is 1e-5, amplified at most ~10x by these contractive chains).
"""

import os
import subprocess
import sys

import pytest
import torch

import seqpar
from seqpar.backend import SeqparBackend
from tests.zoo import models as zoo

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
    "residual_mlp": lambda: zoo.residual_mlp(),
    "conv_resnet": lambda: zoo.conv_resnet(),
    "preln_transformer": lambda: zoo.preln_transformer(),
    "transformer_encoder": lambda: zoo.transformer_stack(),
    "nested_region": lambda: zoo.nested_region_stack(),
    "rnn": lambda: zoo.unrolled_rnn(),
    "unet_uniform": lambda: zoo.unet_uniform(),
    "graph_break": lambda: zoo.graph_break_mlp(),
    "tapped_mlp": lambda: zoo.tapped_mlp(),
    "scaled_mlp": lambda: zoo.scaled_mlp(),
    "weight_tied": lambda: zoo.weight_tied_loop(),
    "toy_denoiser": lambda: zoo.toy_denoiser_loop(),
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


def test_optimizer_steps_refresh_the_stacked_parameters():
    model, inputs = to_double(*zoo.deep_mlp(depth=16, width=4))
    eager_model, _ = to_double(*zoo.deep_mlp(depth=16, width=4))
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
    model, inputs = zoo.expansive_mlp(depth=64)
    compiled, backend = compile_with(model, policy="parallel", max_iters=5)
    torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=1e-5, atol=1e-6)
    (chain,) = chain_reports(backend)
    assert chain.stats["fallback"].startswith("did not converge in 5 iterations")


def test_verification_catches_a_wrong_solve_and_uses_the_original_graph():
    # A tolerance of 1e3 lets Newton stop after one iteration with wrong states.
    model, inputs = to_double(*zoo.deep_mlp(depth=16, width=4))
    compiled, backend = compile_with(model, policy="parallel", tol=1e3, verify=True)
    torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=F64_ATOL, rtol=0)
    graph = backend.graphs[0]
    assert graph.fell_back and "MISMATCH" in graph.verification[0]
    assert "verification mismatch" in graph.chains[0].reason


def test_verification_passes_on_a_correct_solve():
    model, inputs = to_double(*zoo.deep_mlp(depth=16, width=4))
    compiled, backend = compile_with(model, policy="parallel", verify=True)
    compiled(*inputs)
    assert backend.graphs[0].verification[0].startswith("call 1: ok")


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
    report = seqpar.explain(model, *inputs, min_chain=4)
    (chain,) = report.chains
    assert (chain.kind, chain.length, chain.state_shape) == ("layers", 16, (4, 4))
    assert chain.modules[0] == "layers.0" and chain.modules[-1] == "layers.15"
    assert chain.decision in ("parallel", "sequential") and chain.reason
    assert "kind" in str(report) and "layers" in str(report)


def test_explain_shows_rejected_chains_with_their_reason():
    model, inputs = zoo.conv_resnet(train=True)
    report = seqpar.explain(model, *inputs, min_chain=4)
    assert any(c.decision == "rejected" and "BatchNorm in training mode" in c.reason for c in report.chains)


def test_unknown_option_raises_value_error_through_torch_compile():
    compiled = torch.compile(lambda x: x + 1, backend="seqpar", options={"bogus": 1})
    with pytest.raises(ValueError, match=r"unknown seqpar option\(s\) \['bogus'\]; valid options: jacobian"):
        compiled(torch.randn(2))
    torch._dynamo.reset()


def test_backend_is_registered_through_the_entry_point_without_import():
    code = (
        "import torch; assert 'seqpar' in torch._dynamo.list_backends(); "
        "f = torch.compile(lambda x: torch.tanh(x) + 1, backend='seqpar'); "
        "x = torch.randn(3); assert torch.equal(f(x), torch.tanh(x) + 1); print('ok')"
    )
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
