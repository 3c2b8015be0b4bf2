"""seqpar.scan_rnn: nn.RNN / nn.LSTM / nn.GRU as scans over time, and their chains under the backend.

Tolerances: float64. The scans compute PyTorch's cell equations with the same
parameters; the fused CPU kernels order a few sums differently, so the eager
outputs agree to rounding (1e-12 absolute on states of size ~1). Through the
backend as in test_backend.py: 1e-9 for outputs and gradients.
"""

import pytest
import torch
import torch.nn as nn

import seqpar
from tests.e2e.test_backend import F64_ATOL, chain_reports, compile_with

CONFIGS = {
    "lstm": (nn.LSTM, {}),
    "gru": (nn.GRU, {}),
    "rnn-tanh": (nn.RNN, {}),
    "rnn-relu": (nn.RNN, {"nonlinearity": "relu"}),
    "lstm-2-layers-bidirectional-batch-first": (nn.LSTM, {"num_layers": 2, "bidirectional": True,
                                                          "batch_first": True}),
    "gru-2-layers-no-bias": (nn.GRU, {"num_layers": 2, "bias": False}),
    "gru-bidirectional": (nn.GRU, {"bidirectional": True}),
}
STEPS, BATCH, INPUTS, HIDDEN = 12, 2, 3, 5


def make(name):
    cls, options = CONFIGS[name]
    torch.manual_seed(0)
    rnn = cls(INPUTS, HIDDEN, **options).double()
    shape = (BATCH, STEPS, INPUTS) if options.get("batch_first") else (STEPS, BATCH, INPUTS)
    return rnn, torch.randn(shape, dtype=torch.float64)


def leaves(result):
    """``[output, h_n]`` or ``[output, h_n, c_n]``."""
    output, hidden = result
    return [output, *(hidden if isinstance(hidden, tuple) else (hidden,))]


def assert_same(got, want, atol):
    for g, w in zip(leaves(got), leaves(want), strict=True):
        torch.testing.assert_close(g, w, atol=atol, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_scan_rnn_equals_the_module(name):
    rnn, x = make(name)
    assert_same(seqpar.scan_rnn(rnn)(x), rnn(x), atol=1e-12)


def test_scan_rnn_shares_the_module_s_parameters_and_state_dict_keys():
    rnn, _ = make("lstm-2-layers-bidirectional-batch-first")
    scanned = seqpar.scan_rnn(rnn)
    assert list(scanned.state_dict()) == list(rnn.state_dict())
    assert all(a is b for a, b in zip(scanned.parameters(), rnn.parameters()))


def test_scan_rnn_takes_an_initial_state_and_unbatched_inputs():
    rnn, x = make("lstm")
    scanned = seqpar.scan_rnn(rnn)
    hx = (torch.randn(1, BATCH, HIDDEN, dtype=torch.float64), torch.randn(1, BATCH, HIDDEN, dtype=torch.float64))
    assert_same(scanned(x, hx), rnn(x, hx), atol=1e-12)
    assert_same(scanned(x[:, 0]), rnn(x[:, 0]), atol=1e-12)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_layer_and_direction_is_a_recurrent_chain_equal_to_the_module_with_gradients(name):
    rnn, x = make(name)
    scanned = seqpar.scan_rnn(rnn)
    compiled, backend = compile_with(scanned, policy="parallel")
    assert_same(compiled(x), rnn(x), atol=F64_ATOL)
    chains = chain_reports(backend)
    assert len(chains) == rnn.num_layers * (2 if rnn.bidirectional else 1)
    assert all((c.kind, c.length, c.decision, c.form) == ("recurrent", STEPS, "parallel", "solver") for c in chains)

    def grads(model):
        rnn.zero_grad(set_to_none=True)
        sum(leaf.square().sum() for leaf in leaves(model(x))).backward()
        return [p.grad.clone() for p in rnn.parameters()]

    for got, want in zip(grads(compiled), grads(rnn), strict=True):
        torch.testing.assert_close(got, want, atol=F64_ATOL, rtol=0)


def test_dropout_between_layers_follows_the_training_mode():
    torch.manual_seed(0)
    rnn = nn.GRU(INPUTS, HIDDEN, num_layers=2, dropout=0.5).double().eval()
    scanned = seqpar.scan_rnn(rnn)
    x = torch.randn(STEPS, BATCH, INPUTS, dtype=torch.float64)
    assert_same(scanned(x), rnn(x), atol=1e-12)  # eval: no dropout
    scanned.train()
    torch.manual_seed(1)
    first = scanned(x)[0]
    torch.manual_seed(2)
    assert not torch.equal(first, scanned(x)[0])  # train: dropout on the first layer's outputs


@pytest.mark.parametrize("module, message", [
    (nn.LSTM(3, 5, proj_size=2), "proj_size > 0 is not supported"),
    (nn.Linear(3, 5), "takes an nn.RNN, nn.LSTM or nn.GRU, not a Linear"),
])
def test_scan_rnn_rejects_what_it_cannot_compute(module, message):
    with pytest.raises(ValueError, match=message):
        seqpar.scan_rnn(module)


def test_scan_rnn_rejects_packed_sequences():
    rnn, x = make("gru")
    packed = nn.utils.rnn.pack_padded_sequence(x, [STEPS, STEPS - 2])
    with pytest.raises(ValueError, match="PackedSequence inputs are not supported"):
        seqpar.scan_rnn(rnn)(packed)
