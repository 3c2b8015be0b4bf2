"""A kept-sequential chain takes the expanding ops of its computed per-step inputs into its step.

xLSTM's memory ``C_t = f_t C_{t-1} + i_t (k_t v_t^T)`` (here in miniature, with a per-step readout ``h_t = q_t C_t``)
computes an outer product of ``K V`` values at every step from ``K + V``: the chain received all ``T`` products
stacked (``seqpar.passes.absorb.absorb_computed`` now hands it ``i_t``, ``k_t``, ``v_t`` and runs the product in
its step). The step's ops are the graph's own on the same numbers: float64 values and gradients equal eager's to
1e-12 relative (the per-step readout is evaluated batched, in another summation order).
"""

from __future__ import annotations

import pytest
import torch

from seqpar.backend import SeqparBackend

ROLLED = {"policy": "sequential", "sequential_form": "rolled", "inner": "eager", "min_chain": 4}
TOL = 1e-12


class OuterMemory(torch.nn.Module):
    def __init__(self, dim=8, key=6, value=10, write_after=False):
        super().__init__()
        self.k, self.v, self.q = torch.nn.Linear(dim, key), torch.nn.Linear(dim, value), torch.nn.Linear(dim, key)
        self.gates = torch.nn.Linear(dim, 2)
        self.key, self.value, self.write_after = key, value, write_after

    def forward(self, x):
        k, v, q = self.k(x), self.v(x), self.q(x)
        forget, write = self.gates(x).unbind(-1)
        memory = x.new_zeros(x.shape[0], self.key, self.value)
        readout = []
        for t in range(x.shape[1]):
            outer = k[:, t, :, None] @ v[:, t, None, :]
            memory = torch.sigmoid(forget[:, t, None, None]) * memory + torch.exp(write[:, t, None, None] - 1) * outer
            readout.append((q[:, t, None, :] @ memory).squeeze(1))
        if self.write_after:
            k.add_(1.0)  # an in-place write to a tensor the step would read: the products stay outside
        return torch.stack(readout, 1) + k.sum()


def compiled(model):
    torch._dynamo.reset()
    backend = SeqparBackend(ROLLED)
    return torch.compile(model, backend=backend), backend


def memory_chain(backend):
    (chain,) = [chain for graph in backend.graphs for chain in graph.chains if chain.decision != "rejected"]
    ((_, program),) = [item for graph in backend.graphs for item in graph.programs]
    return chain, program


def per_step_values(program) -> list[int]:
    """The number of values each per-step input of the chain's step holds at one step."""
    placeholders = [node for node in program.lowered.graph.nodes if node.op == "placeholder"]
    return [node.meta["val"].numel() for node in placeholders[1 : 1 + program.xs_spec.num_leaves]]


def test_the_outer_products_run_in_the_step_with_eagers_values_and_gradients():
    torch.manual_seed(0)
    model = OuterMemory().double()
    x = torch.randn(3, 24, 8, dtype=torch.float64)
    function, backend = compiled(model)
    got = function(x)
    want = model(x)
    chain, program = memory_chain(backend)
    assert chain.decision == "sequential" and "(mul, matmul) run in its step" in chain.reason
    # The memory holds 3 x 6 x 10 values a step; the step reads the gates, keys and values (3 x 10 at most).
    assert program.layout.batch_size * program.layout.width == 180
    assert max(per_step_values(program)) == 30
    torch.testing.assert_close(got, want, rtol=0, atol=TOL * float(want.detach().abs().max()))
    weights = list(model.parameters())
    got_grads = torch.autograd.grad(got.square().sum(), weights)
    want_grads = torch.autograd.grad(want.square().sum(), weights)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL * float(b.abs().max()))


def test_a_float32_model_trains_as_eager():
    torch.manual_seed(1)
    model = OuterMemory(dim=16, key=8, value=16)
    x = torch.randn(2, 40, 16)
    function, backend = compiled(model)
    got, want = function(x), model(x)
    assert "run in its step" in memory_chain(backend)[0].reason
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(want.detach().abs().max()))
    weights = list(model.parameters())
    got_grads = torch.autograd.grad(got.square().sum(), weights)
    for a, b in zip(got_grads, torch.autograd.grad(want.square().sum(), weights), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("case", ["written after the loop", "no expansion"])
def test_products_stay_outside_where_taking_them_in_is_unsafe_or_saves_nothing(case):
    torch.manual_seed(2)
    if case == "written after the loop":
        model, x = OuterMemory(write_after=True).double(), torch.randn(2, 16, 8, dtype=torch.float64)
    else:  # a product of K V values from K V values (a key and value as wide as the memory): nothing saved
        model, x = OuterMemory(dim=8, key=1, value=1).double(), torch.randn(2, 16, 8, dtype=torch.float64)
    function, backend = compiled(model)
    with torch.no_grad():
        got, want = function(x), model(x)
    chain, program = memory_chain(backend)
    assert "run in its step" not in chain.reason
    assert max(per_step_values(program)) == program.layout.batch_size * program.layout.width  # the products
    torch.testing.assert_close(got, want, rtol=0, atol=TOL * float(want.detach().abs().max()))
