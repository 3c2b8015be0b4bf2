"""In-place ops in a chain's step: writes to values the step made itself are computed out of place
(``nn.ReLU(inplace=True)``, ``out += identity``: every torchvision ResNet block); writes to the carried
state, to graph inputs, parameters or buffers, or to values read afterwards keep the repeat a candidate
with the reason. Every case is checked against eager PyTorch in float64.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from seqpar.passes.effects import BATCHNORM_TRAINING, mutates, out_of_place
from tests.e2e.test_backend import F64_ATOL, chain_reports, compile_with
from tests.passes.test_detect import assert_step_reproduces, node_values, only_chain


class InplaceBasicBlock(nn.Module):
    """torchvision's ``BasicBlock`` without downsampling: ``relu_(bn2(conv2(relu_(bn1(conv1(x))))) += x)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.1, 0.1)
                bn.running_var.uniform_(0.5, 1.5)
                bn.weight.uniform_(0.5, 1.0)
                bn.bias.uniform_(-0.1, 0.1)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def inplace_resnet(blocks: int = 8, channels: int = 4, size: int = 6, batch: int = 2):
    """``blocks`` in-place basic blocks (BatchNorm in eval) on ``(batch, channels, size, size)``, float64."""
    torch.manual_seed(0)
    model = nn.Sequential(*[InplaceBasicBlock(channels) for _ in range(blocks)]).double().eval()
    return model, torch.randn(batch, channels, size, size, dtype=torch.float64)


def outputs_and_gradients(model, x):
    """``model(x)`` and the gradients of ``sum(model(x)^2)`` for every parameter and for ``x``."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    y.square().sum().backward()
    return [y.detach()] + [p.grad for p in model.parameters() if p.grad is not None] + [x.grad]


def assert_equal_to_eager(model, x, compiled):
    expected = outputs_and_gradients(model, x)
    got = outputs_and_gradients(compiled, x)
    assert len(got) == len(expected)
    torch.testing.assert_close(got, expected, atol=F64_ATOL, rtol=0)


class Chained(nn.Module):
    """``blocks`` applied in turn after a 1x1 stem conv (so no block writes to the caller's tensor)."""

    def __init__(self, make_block, blocks: int = 8, channels: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(channels, channels, 1)
        self.blocks = nn.Sequential(*[make_block(channels) for _ in range(blocks)])

    def forward(self, x):
        return self.blocks(self.stem(x))


def chained(block_forward, blocks: int = 8, channels: int = 4):
    """A :class:`Chained` of conv blocks whose forward is ``block_forward(block, x)``, and its input."""

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, padding=1)
            self.buffer = nn.Buffer(torch.zeros(c, 6, 6))

        def forward(self, x):
            return block_forward(self, x)

    torch.manual_seed(0)
    return Chained(Block, blocks, channels).double(), torch.randn(2, channels, 6, 6, dtype=torch.float64)


# --------------------------------------------------------------------------- #
# in-place ops on the step's own values: one chain, eager's numbers
# --------------------------------------------------------------------------- #


def test_resnet_blocks_with_inplace_relu_and_residual_add_are_one_residual_chain():
    model, x = inplace_resnet()
    compiled, backend = compile_with(model, policy="parallel", min_chain=8)  # the default min_chain
    compiled(x)
    (chain,) = chain_reports(backend)
    assert (chain.kind, chain.length, chain.decision) == ("residual", 8, "parallel")
    assert (chain.modules[0], chain.modules[-1]) == ("0", "7")


def test_the_step_of_an_inplace_block_writes_no_tensor_and_reproduces_every_segment():
    model, x = inplace_resnet()
    gm, example_inputs, chain = only_chain(model, (x,))
    assert sum(mutates(node) for segment in chain.nodes for node in segment) == 8 * 3  # relu_, +=, relu_
    assert not any(mutates(node) for node in chain.step.graph.nodes)
    assert_step_reproduces(chain, node_values(gm, example_inputs), steps=range(chain.length))


def test_an_inplace_resnet_in_training_mode_stays_a_residual_candidate_with_the_batchnorm_reason():
    model, x = inplace_resnet()
    model.train()
    compiled, backend = compile_with(model, policy="parallel")
    compiled(x)
    (chain,) = chain_reports(backend)
    assert (chain.kind, chain.length, chain.decision) == ("residual", 8, "rejected")
    assert chain.reason == BATCHNORM_TRAINING


@pytest.mark.parametrize("options", [{"policy": "parallel"}, {"inner": "eager"}], ids=["parallel", "default-policy"])
def test_inplace_resnet_through_torch_compile_gives_eager_outputs_and_gradients(options):
    model, x = inplace_resnet()
    torch._dynamo.reset()
    assert_equal_to_eager(model, x, torch.compile(model, backend="seqpar", options=options))
    torch._dynamo.reset()


@pytest.mark.slow
def test_inplace_resnet_with_every_default_option_gives_eager_outputs_and_gradients():
    model, x = inplace_resnet()
    torch._dynamo.reset()
    assert_equal_to_eager(model, x, torch.compile(model, backend="seqpar"))
    torch._dynamo.reset()


def test_leaky_relu_with_inplace_given_by_position_is_an_inplace_op_computed_out_of_place():
    # nn.LeakyReLU calls F.leaky_relu(x, slope, True): the flag is positional
    model, x = chained(lambda block, s: s + torch.tanh(F.leaky_relu(block.conv(s), 0.1, True)))
    compiled, backend = compile_with(model, policy="parallel")
    assert_equal_to_eager(model, x, compiled)
    (chain,) = chain_reports(backend)
    assert (chain.kind, chain.length, chain.decision) == ("residual", 8, "parallel")


@pytest.mark.parametrize("call, twin", [
    (("call_function", torch.relu_, ("a",), {}), ("call_function", torch.relu, ("a",), {})),
    (("call_method", "add_", ("a", "b"), {"alpha": 2}), ("call_method", "add", ("a", "b"), {"alpha": 2})),
    (("call_method", "__iadd__", ("a", "b"), {}), ("call_method", "__add__", ("a", "b"), {})),
    (("call_function", F.relu, ("a",), {"inplace": True}), ("call_function", F.relu, ("a",), {"inplace": False})),
    (("call_function", F.hardtanh, ("a", -1.0, 1.0, True), {}),
     ("call_function", F.hardtanh, ("a", -1.0, 1.0, False), {})),
    (("call_function", torch.ops.aten.mul_.Tensor, ("a", "b"), {}),
     ("call_function", torch.ops.aten.mul.Tensor, ("a", "b"), {})),
], ids=["torch.relu_", "Tensor.add_", "__iadd__", "inplace-kwarg", "inplace-positional", "aten.mul_"])
def test_out_of_place_gives_the_twin_that_computes_the_same_value(call, twin):
    assert out_of_place(*call) == twin


@pytest.mark.parametrize("call", [
    ("call_method", "copy_", ("a", "b"), {}),
    ("call_method", "bernoulli_", ("a", 0.5), {}),
    ("call_method", "__setitem__", ("a", 0, "b"), {}),
    ("call_function", torch.add, ("a", "b"), {"out": "c"}),
], ids=["copy_", "bernoulli_", "setitem", "out="])
def test_in_place_ops_without_an_out_of_place_twin_have_none(call):
    assert out_of_place(*call) is None


@pytest.mark.parametrize("target, in_place", [
    (operator.not_, False), (operator.and_, False), (operator.or_, False), (operator.is_, False),
    (operator.is_not, False), (torch.relu_, True), (operator.iand, True),
], ids=["not_", "and_", "or_", "is_", "is_not", "torch.relu_", "iand"])
def test_pythons_keyword_operators_are_no_in_place_ops(target, in_place):
    # operator.not_ (Dynamo's graph negates a symbolic bool with it: xLSTM under dynamic=True) ends with an
    # underscore like torch's in-place ops; taken for one, it kept xLSTM's chains out.
    graph = torch.fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    assert mutates(graph.call_function(target, (a, b))) is in_place


# --------------------------------------------------------------------------- #
# in-place writes that stay: a candidate with the reason, eager's numbers
# --------------------------------------------------------------------------- #


def _relu_state(block, x):
    x.relu_()  # the block's input, the carried state; Dynamo's graph reads x's node below
    return x + torch.tanh(block.conv(x))


def test_an_inplace_write_to_the_carried_state_is_rejected_and_the_graph_gives_eager_numbers():
    model, x = chained(_relu_state)
    compiled, backend = compile_with(model, policy="parallel")
    assert_equal_to_eager(model, x, compiled)
    (chain,) = chain_reports(backend)
    assert (chain.length, chain.decision) == (8, "rejected")
    assert "mutates the carried state" in chain.reason and "in place" in chain.reason


def _relu_state_rebound(block, x):
    x = x.relu_()
    return x + torch.tanh(block.conv(x))


def _scale_state(block, x):
    x *= 0.5
    return x + torch.tanh(block.conv(x))


@pytest.mark.parametrize("block_forward", [_relu_state_rebound, _scale_state], ids=["s = s.relu_()", "s *= c"])
def test_a_write_to_the_block_input_is_to_the_step_own_sum_when_segments_start_after_it(block_forward):
    # segment l: s_l + tanh(conv(s_l)), then the write to that sum (block l + 1's first op): the state is
    # the written value, every write is to a value of its own segment, and the chain has one block less
    model, x = chained(block_forward)
    compiled, backend = compile_with(model, policy="parallel")
    assert_equal_to_eager(model, x, compiled)
    (chain,) = chain_reports(backend)
    assert (chain.length, chain.decision) == (7, "parallel")


def _relu_and_read_the_old_name(block, x):
    h = block.conv(x)
    h.relu_()  # Dynamo's graph reads the node of h, not of relu_, below
    return x + torch.tanh(h)


def test_an_inplace_write_to_a_value_read_afterwards_is_rejected_with_the_reader():
    model, x = chained(_relu_and_read_the_old_name)
    compiled, backend = compile_with(model, policy="parallel")
    assert_equal_to_eager(model, x, compiled)
    (chain,) = chain_reports(backend)
    assert chain.decision == "rejected"
    assert "in place, and" in chain.reason and "reads" in chain.reason and "afterwards" in chain.reason


def _add_to_buffer(block, x):
    h = torch.tanh(block.conv(x))
    block.buffer.add_(h[0])
    return x + h


def test_an_inplace_write_to_a_buffer_is_rejected_as_a_write_to_a_graph_input():
    model, x = chained(_add_to_buffer)
    compiled, backend = compile_with(model, policy="parallel")
    with torch.no_grad():
        expected = model(x)
        buffers = [block.buffer.clone() for block in model.blocks]
        got = compiled(x)
    torch.testing.assert_close(got, expected, atol=F64_ATOL, rtol=0)
    torch.testing.assert_close([block.buffer for block in model.blocks], [2 * b for b in buffers],
                               atol=F64_ATOL, rtol=0)
    (chain,) = chain_reports(backend)
    assert chain.decision == "rejected"
    assert "graph input, parameter, buffer or attribute" in chain.reason


def _compare_in_place(block, x):
    h = torch.tanh(block.conv(x))
    mask = h.gt_(0.0)  # keeps h's dtype in place; h.gt(0.0) would be bool
    return x + mask * block.conv(x)


def test_an_inplace_op_whose_out_of_place_form_changes_the_dtype_is_rejected_with_both_dtypes():
    model, x = chained(_compare_in_place)
    compiled, backend = compile_with(model, policy="parallel")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=F64_ATOL, rtol=0)
    (chain,) = chain_reports(backend)
    assert chain.decision == "rejected"
    assert "out-of-place form computes" in chain.reason and "torch.bool" in chain.reason
    assert "torch.float64" in chain.reason
