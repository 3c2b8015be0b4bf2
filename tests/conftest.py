"""Shared test setup: the Triton interpreter, reference loops and small chains.

Without a GPU the Triton kernels run under the interpreter. Triton reads
``TRITON_INTERPRET`` when it is first imported (inductor may import it before
any Triton test module runs), so it is set here, before anything else.

The reference for every solve is the plain Python loop ``s_l = step(s_{l-1}, x_l, *shared)``.
Step functions live at module level so that ``solve_chain`` reuses its traced
programs across tests (programs are cached per step function and shape).
"""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.utils._pytree as pytree
import pytest

from seqpar.passes.chain import Chain


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)


@pytest.fixture
def inner_compiles(monkeypatch) -> list:
    """What seqpar's inner backend is asked to compile from now on: per graph, the keywords it is called with
    (inductor's ``config_patches`` for a mode) and whether the graph's sizes are symbolic."""
    import seqpar.backend as backend_module

    compiles, lookup = [], backend_module.lookup_backend

    def recording(name):
        inner = lookup(name)

        def compile_inner(gm, example_inputs, **kwargs):
            compiles.append((kwargs, any(map(backend_module._symbolic, example_inputs))))
            return inner(gm, example_inputs, **kwargs)
        return compile_inner

    monkeypatch.setattr(backend_module, "lookup_backend", recording)
    return compiles


def sequential_loop(step, s0, xs=(), shared=(), length=None):
    """``s_1 .. s_L`` of the chain by the plain loop, stacked like ``solve_chain``'s result."""
    leaves, spec = pytree.tree_flatten(xs)
    length = leaves[0].shape[0] if leaves else length
    state, states = s0, []
    for index in range(length):
        state = step(state, pytree.tree_unflatten([leaf[index] for leaf in leaves], spec), *shared)
        states.append(state)
    return pytree.tree_map(lambda *parts: torch.stack(parts), *states)


def to_float64(tree):
    """Every floating-point tensor of ``tree`` in float64; integer tensors unchanged."""
    return pytree.tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, tree)


def rnn_step(s, x, W, U, b):
    """An Elman cell, ``s_l = tanh(W s_{l-1} + U x_l + b)``."""
    return torch.tanh(s @ W.T + x @ U.T + b)


def rnn_chain(length, width, batch=(2,), gain=0.5, dtype=torch.float64, seed=0):
    """``(s0, xs, shared)`` of an Elman chain whose recurrent weights have spectral scale ~``gain``.

    ``W`` has entries ``N(0, gain^2 / width)``, so ``gain < 1`` gives a contracting chain.
    """
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(dtype)

    W = randn(width, width, scale=gain / width**0.5)
    U = randn(width, width, scale=1 / width**0.5)
    b = randn(width, scale=0.1)
    s0 = randn(*batch, width)
    xs = randn(length, *batch, width)
    return s0, xs, (W, U, b)


def lstm_step(state, x, W, U, b):
    """An LSTM cell on the tuple state ``(h, c)``."""
    h, c = state
    gates = h @ W.T + x @ U.T + b
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def lstm_chain(length, hidden, batch=(2,), dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(dtype)

    W = randn(4 * hidden, hidden, scale=0.5 / hidden**0.5)
    U = randn(4 * hidden, hidden, scale=1 / hidden**0.5)
    b = randn(4 * hidden, scale=0.1)
    s0 = (randn(*batch, hidden), randn(*batch, hidden))
    xs = randn(length, *batch, hidden)
    return s0, xs, (W, U, b)


def euler_step(s, x, Wh):
    """An explicit Euler step ``s + tanh(Wh s + x)`` (``Wh`` = step size times W): ``J`` is near ``I``."""
    return s + torch.tanh(s @ Wh.T + x)


def euler_chain(length, width, batch=(2,), step_size=0.02, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    Wh = (step_size * torch.randn(width, width, generator=generator, dtype=torch.float64) / width**0.5).to(dtype)
    xs = (step_size * torch.randn(length, *batch, width, generator=generator, dtype=torch.float64)).to(dtype)
    s0 = torch.randn(*batch, width, generator=generator, dtype=torch.float64).to(dtype)
    return s0, xs, (Wh,)


def chain_record(length, state_shape, batch_ndim=1, kind="layers", recorded=True):
    """A Chain record with only the fields the policy reads filled in; ``recorded``: whether autograd records its
    segments (their one node's example value requires grad, as in a differentiated graph Dynamo traced)."""
    value = torch.zeros(1, requires_grad=recorded)
    return Chain(
        kind=kind, start=None, outputs=[None] * length, nodes=[[SimpleNamespace(meta={"example_value": value})]],
        step=None, per_step=[], shared=[], modules=[], state_shape=state_shape, state_dtype=torch.float32,
        batch_ndim=batch_ndim,
    )
