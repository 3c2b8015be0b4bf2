"""``seqpar.explain(fn, *args, options=None, **kwargs)``: the call's keywords go to ``fn``, as with
``torch._dynamo.explain(fn)(*args, **kwargs)``; the backend's options go in ``options=``."""

from __future__ import annotations

import warnings

import pytest
import torch

import seqpar

WIDTH = 8
WEIGHT = torch.randn(WIDTH, WIDTH, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / WIDTH
X = torch.randn(2, WIDTH, dtype=torch.float64)


def tanh_layers(x, depth=4):
    """``depth`` layers ``x <- tanh(x W^T)``: one chain of ``depth`` steps."""
    for _ in range(depth):
        x = torch.tanh(x @ WEIGHT.T)
    return x


def tanh_layers_with_a_window_argument(x, window=4):
    """As :func:`tanh_layers`, with the depth in a parameter that shares a seqpar option's name."""
    return tanh_layers(x, depth=window)


def chain_lengths(report):
    return [chain.length for chain in report.chains]


def test_keyword_arguments_go_to_the_function():
    report = seqpar.explain(tanh_layers, X, depth=10, options={"min_chain": 4})
    assert chain_lengths(report) == [10]


def test_options_go_in_the_options_dict():
    (chain,) = seqpar.explain(tanh_layers, X, options={"min_chain": 4, "policy": "sequential"}).chains
    assert (chain.length, chain.decision) == (4, "sequential")


def test_unknown_options_raise_value_error_naming_them():
    with pytest.raises(ValueError, match=r"unknown seqpar option\(s\) \['depth'\]"):
        seqpar.explain(tanh_layers, X, options={"depth": 10})


def test_a_keyword_that_names_an_option_and_no_parameter_is_an_option_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match=r"options=\{'min_chain': 4\}"):
        report = seqpar.explain(tanh_layers, X, min_chain=4)
    assert chain_lengths(report) == [4]


def test_a_keyword_the_function_names_goes_to_the_function_even_if_it_names_an_option():
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="seqpar.explain")
        report = seqpar.explain(tanh_layers_with_a_window_argument, X, window=9, options={"min_chain": 4})
    assert chain_lengths(report) == [9]


def test_a_hugging_face_gpt2_called_with_use_cache_false_is_one_chain_of_its_blocks():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=8, n_embd=16, n_head=2, n_positions=32, vocab_size=50,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2Model(config).double().eval()
    report = seqpar.explain(model, torch.randint(0, 50, (2, 6)), use_cache=False)
    (chain,) = report.chains
    assert (chain.kind, chain.length) == ("transformer", 8)
    assert chain.decision != "rejected", chain.reason  # with a returned key/value cache it would be


class GRUReadingItsBuffer(torch.nn.Module):
    """A GRU cell over time writing its readout into a buffer that every step also reads: shared weights,
    rejected for the in-place write (the buffer is observed while it is written)."""

    def __init__(self):
        super().__init__()
        self.cell, self.readout = torch.nn.GRUCell(4, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        h, out = x.new_zeros(x.shape[0], 8), x.new_zeros(x.shape[0], x.shape[1], 3)
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h) * out.mean()
            out[:, t] = self.readout(h)
        return out


class LayersReadingTheirBuffer(torch.nn.Module):
    """Per-layer weights, each layer's output written into a buffer every layer reads."""

    def __init__(self, depth=10):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(depth))

    def forward(self, x):
        out = x.new_zeros(len(self.layers), *x.shape)
        for index, layer in enumerate(self.layers):
            x = torch.tanh(layer(x)) * out.mean()
            out[index] = x * 2
        return out


@pytest.mark.parametrize("model, inputs, kind", [
    (GRUReadingItsBuffer, (2, 12, 4), "recurrent"),
    (LayersReadingTheirBuffer, (2, 8), "layers"),
])
def test_a_rejected_repeat_is_named_by_whether_its_steps_share_weights(model, inputs, kind):
    torch.manual_seed(0)
    (chain,) = seqpar.explain(model(), torch.randn(*inputs)).chains
    assert chain.decision == "rejected" and chain.kind == kind


def test_a_deep_unrolled_stack_gets_the_two_ways_around_dynamos_per_parameter_costs():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[m for _ in range(256) for m in (torch.nn.Linear(2, 2), torch.nn.Tanh())])
    report = seqpar.explain(model, torch.randn(1, 2))
    (hint,) = [hint for hint in report.hints if "blocks one by one" in hint]
    assert "seqpar.scan_layers(blocks)" in hint and "skip_guard_on_inbuilt_nn_modules_unsafe" in hint
