"""Property: whatever the model, layout, dtype and requires_grad pattern, the backend gives eager's values
and gradients (or runs the exact sequential path).

Hypothesis draws a model (block kind, depth, width, batch), which parameters
are frozen (none, all, some: per layer or interleaved), the input's memory
layout (contiguous, transposed, expanded, an offset view, channels-last for
convolutions), the dtype, whether the input requires grad, and the policy and
adjoint; the compiled model's outputs and gradients must equal eager's.
Tolerances: float64 1e-9 (solver tolerance 1e-10 relative, contracting
chains); float32 1e-4 relative to each tensor's largest magnitude (stopping
tolerance 1e-5 relative, times the chain's O(1) conditioning, plus the
reordered float32 arithmetic of the batched steps and of the adjoint's sums:
a gradient row that cancels to 1e-5 of its neighbours carries their
rounding, so rows are not judged alone).

The fast profile (CI) draws :data:`FAST_EXAMPLES` models; the slow one
(``-m slow``) :data:`SLOW_EXAMPLES`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqpar.backend import SeqparBackend

FAST_EXAMPLES = 12
SLOW_EXAMPLES = 150


class Residual(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        return x + 0.5 * torch.tanh(self.linear(x))


def build_model(kind: str, depth: int, width: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    if kind == "linear":
        layers = [module for _ in range(depth) for module in (nn.Linear(width, width), nn.Tanh())]
    elif kind == "residual":
        layers = [Residual(width) for _ in range(depth)]
    else:
        layers = [module for _ in range(depth) for module in (nn.Conv2d(width, width, 3, padding=1), nn.Tanh())]
    return nn.Sequential(*layers)


def freeze(model: nn.Module, pattern: str, depth: int) -> None:
    parameters = list(model.parameters())
    per_layer = len(parameters) // depth
    for index, parameter in enumerate(parameters):
        layer = index // per_layer
        frozen = {
            "none": False,
            "all": True,
            "first_half": layer < depth // 2,
            "every_third_tensor": index % 3 == 0,
            "weights_only": parameter.ndim > 1,
        }[pattern]
        parameter.requires_grad_(not frozen)


def make_input(kind: str, batch: int, width: int, layout: str, dtype) -> torch.Tensor:
    shape = (batch, width, 5, 5) if kind == "conv" else (batch, width)
    if layout == "transposed" and kind != "conv":
        return torch.randn(width, batch, dtype=dtype).T
    if layout == "expanded":
        return torch.randn(1, *shape[1:], dtype=dtype).expand(shape)
    if layout == "offset":
        return torch.randn(batch + 2, *shape[1:], dtype=dtype)[2:]
    if layout == "channels_last" and kind == "conv":
        return torch.randn(shape, dtype=dtype).to(memory_format=torch.channels_last)
    return torch.randn(shape, dtype=dtype)


def assert_equal_to_eager(got, want, dtype):
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        return
    want64, got64 = want.detach().double(), got.detach().double()
    scale = float(want64.abs().max()) + torch.finfo(dtype).tiny
    assert float((got64 - want64).abs().max()) <= 1e-4 * scale


cases = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["linear", "residual", "conv"]),
        "depth": st.one_of(st.integers(8, 20), st.sampled_from([64, 72])),  # 64 and up: the rolled form
        "width": st.integers(2, 10),
        "batch": st.integers(1, 4),
        "frozen": st.sampled_from(["none", "all", "first_half", "every_third_tensor", "weights_only"]),
        "layout": st.sampled_from(["contiguous", "transposed", "expanded", "offset", "channels_last"]),
        "dtype": st.sampled_from([torch.float64, torch.float32]),
        "input_grad": st.booleans(),
        "policy": st.sampled_from(["auto", "parallel", "sequential"]),
        "adjoint": st.sampled_from(["auto", "parallel", "sequential"]),
        "seed": st.integers(0, 2**16),
    }
)


def check_case(case) -> None:
    kind, depth, width, dtype = case["kind"], case["depth"], case["width"], case["dtype"]
    if kind == "conv":
        width = min(width, 4)
    model = build_model(kind, depth, width, case["seed"]).to(dtype)
    if case["layout"] == "channels_last" and kind == "conv":
        model = model.to(memory_format=torch.channels_last)
    freeze(model, case["frozen"], depth)
    x = make_input(kind, case["batch"], width, case["layout"], dtype)
    if case["input_grad"]:
        x = x.detach().requires_grad_()
    wanted = [p for p in model.parameters() if p.requires_grad] + ([x] if x.requires_grad else [])

    def values_and_gradients(fn):
        out = fn(x)
        if not wanted:
            return out, []
        weights = torch.linspace(-1, 1, out.numel(), dtype=dtype).reshape(out.shape)
        return out, list(torch.autograd.grad((weights * out).sum(), wanted))

    want_out, want_grads = values_and_gradients(model)
    torch._dynamo.reset()
    backend = SeqparBackend({"policy": case["policy"], "adjoint": case["adjoint"], "min_chain": 4})
    got_out, got_grads = values_and_gradients(torch.compile(model, backend=backend))
    assert any(chain.decision != "rejected" for graph in backend.graphs for chain in graph.chains)
    assert_equal_to_eager(got_out, want_out, dtype)
    for got, want in zip(got_grads, want_grads, strict=True):
        assert_equal_to_eager(got, want, dtype)


_SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=FAST_EXAMPLES, **_SETTINGS)
@given(cases)
def test_backend_equals_eager_for_any_model_layout_dtype_and_frozen_pattern(case):
    check_case(case)


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES, **_SETTINGS)
@given(cases)
def test_backend_equals_eager_for_any_model_layout_dtype_and_frozen_pattern_long(case):
    check_case(case)
