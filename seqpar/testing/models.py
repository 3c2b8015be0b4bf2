"""Small models with a known chain structure (fixed seeds, CPU, float32).

Each public constructor returns ``(model, example_inputs)`` with ``example_inputs``
a tuple; ``model(*example_inputs)`` runs eagerly and under ``torch.compile``.
Models meant to be chains say so in their docstring (kind, length, modules);
the others say why they are not.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch._higher_order_ops.scan import scan
from torch.utils.checkpoint import checkpoint

import seqpar

__all__ = [
    "ACTIVATIONS",
    "deep_mlp",
    "expansive_mlp",
    "mlp_layernorm",
    "modulelist_mlp",
    "stacked_mlp",
    "residual_mlp",
    "conv_resnet",
    "transformer_stack",
    "preln_transformer",
    "nested_region_stack",
    "checkpointed_stack",
    "unrolled_rnn",
    "gru_cell_loop",
    "lstm_cell_loop",
    "hand_lstm",
    "mismatched_batch_pair",
    "single_linear",
    "short_mlp",
    "unet_like",
    "unet_uniform",
    "graph_break_mlp",
    "dense_skip",
    "dropout_train_mlp",
    "scaled_mlp",
    "tapped_mlp",
    "weight_tied_loop",
    "toy_denoiser_loop",
    "mlp_graph",
    "scanned_mlp",
    "scanned_resnet",
    "scan_lstm",
]

ACTIVATIONS = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
}


class Stack(nn.Module):
    """``x -> layers(x)``; the layers are reached as ``layers.<l>``."""

    def __init__(self, layers: nn.Module):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        return self.layers(x)


def _mlp_block(width: int, act: str, layernorm: bool, dropout: float, gain: float | None) -> nn.Sequential:
    linear = nn.Linear(width, width)
    if gain is not None:
        nn.init.orthogonal_(linear.weight, gain=gain)
        nn.init.uniform_(linear.bias, -0.1, 0.1)
    parts: list[nn.Module] = [linear, ACTIVATIONS[act]()]
    if layernorm:
        parts.append(nn.LayerNorm(width))
    if dropout:
        parts.append(nn.Dropout(dropout))
    return nn.Sequential(*parts)


def deep_mlp(depth: int = 16, width: int = 8, act: str = "tanh", batch: int = 4, *, layernorm: bool = False,
             dropout: float = 0.0, gain: float | None = None, seq: int | None = None, seed: int = 0):
    """``depth`` blocks ``x -> act(W_l x + b_l)`` (+ LayerNorm, + Dropout), eval mode.

    Chain: kind "layers", length ``depth``, modules ``layers.0 .. layers.<depth-1>``;
    the input is ``(batch, width)``, or ``(batch, seq, width)`` when ``seq`` is given.
    """
    torch.manual_seed(seed)
    layers = nn.Sequential(*[_mlp_block(width, act, layernorm, dropout, gain) for _ in range(depth)])
    shape = (batch, width) if seq is None else (batch, seq, width)
    return Stack(layers).eval(), (torch.randn(shape),)


def expansive_mlp(depth: int = 64, width: int = 4, batch: int = 2, seed: int = 0):
    """A tanh MLP with orthogonal weights of gain 2 (expansive Jacobians): still a "layers" chain."""
    return deep_mlp(depth, width, "tanh", batch, gain=2.0, seed=seed)


def mlp_layernorm(depth: int = 8, width: int = 8, act: str = "gelu", batch: int = 4, seed: int = 0):
    """``x -> LayerNorm(act(W_l x + b_l))``: kind "layers", modules ``layers.<l>``."""
    return deep_mlp(depth, width, act, batch, layernorm=True, seed=seed)


def dropout_train_mlp(depth: int = 8, width: int = 8, batch: int = 4, seed: int = 0):
    """An MLP with Dropout in training mode: random ops on the state path, no chain (a Candidate)."""
    model, inputs = deep_mlp(depth, width, "tanh", batch, dropout=0.1, seed=seed)
    return model.train(), inputs


class _Block(nn.Module):
    def __init__(self, width: int, act: str):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.act = ACTIVATIONS[act]()

    def forward(self, x):
        return self.act(self.linear(x))


class ModuleListMLP(nn.Module):
    def __init__(self, depth: int, width: int, act: str):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(width, act) for _ in range(depth)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def modulelist_mlp(depth: int = 12, width: int = 6, act: str = "silu", batch: int = 3, seed: int = 0):
    """A Python loop over an ``nn.ModuleList``: kind "layers", modules ``blocks.<l>``."""
    torch.manual_seed(seed)
    return ModuleListMLP(depth, width, act).eval(), (torch.randn(batch, width),)


class StackedMLP(nn.Module):
    """``x = tanh(x W[i]^T + b[i])`` for rows ``i`` of one stacked weight ``W: (rows, w, w)`` and bias ``b: (rows, w)``.

    ``order``: "forward" reads rows ``offset, offset + 1, ..``; "reverse" the
    same rows last to first; "strided" rows ``offset, offset + 2, ..``.
    """

    def __init__(self, depth: int, width: int, rows: int, order: str, offset: int):
        super().__init__()
        self.W = nn.Parameter(torch.randn(rows, width, width) / math.sqrt(width))
        self.b = nn.Parameter(0.1 * torch.randn(rows, width))
        steps = {"forward": range(depth), "reverse": range(depth - 1, -1, -1), "strided": range(0, 2 * depth, 2)}
        self.rows = [offset + i for i in steps[order]]

    def forward(self, x):
        for i in self.rows:
            x = torch.tanh(x @ self.W[i].T + self.b[i])
        return x


def stacked_mlp(depth: int = 8, width: int = 4, batch: int = 3, *, order: str = "forward", rows: int | None = None,
                offset: int = 0, seed: int = 0):
    """An MLP whose layers are rows of stacked parameters ``W[i]``, ``b[i]`` (``rows`` of them, default
    ``depth``; 2 ``depth`` for "strided"): kind "layers", length ``depth``; the per-step inputs are
    "slice" inputs for order "forward", "computed" for the others (rows not consecutive)."""
    torch.manual_seed(seed)
    rows = rows or offset + (2 * depth if order == "strided" else depth)
    return StackedMLP(depth, width, rows, order, offset).eval(), (torch.randn(batch, width),)


class ResidualBlock(nn.Module):
    """``x + W2 tanh(W1 x + b1) + b2``."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(x)))


def residual_mlp(depth: int = 10, width: int = 8, batch: int = 4, seed: int = 0):
    """Residual MLP blocks ``x + g(x)``: kind "residual", modules ``layers.<l>``."""
    torch.manual_seed(seed)
    layers = nn.Sequential(*[ResidualBlock(width, 2 * width) for _ in range(depth)])
    return Stack(layers).eval(), (torch.randn(batch, width),)


class BasicBlock(nn.Module):
    """ResNet basic block without downsampling: ``relu(x + bn2(conv2(relu(bn1(conv1(x))))))``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(bn.weight, 0.5, 1.0)
            nn.init.uniform_(bn.bias, -0.1, 0.1)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(x + out)


def conv_resnet(blocks: int = 6, channels: int = 4, size: int = 8, batch: int = 2, *, train: bool = False,
                seed: int = 0):
    """``blocks`` ResNet basic blocks on ``(batch, channels, size, size)``.

    Eval: kind "residual", modules ``layers.<l>``, batch_ndim 1. Train: BatchNorm
    updates its running statistics, so no chain (a Candidate with that reason).
    """
    torch.manual_seed(seed)
    with torch.no_grad():
        layers = nn.Sequential(*[BasicBlock(channels) for _ in range(blocks)])
    model = Stack(layers)
    model.train(train)
    return model, (torch.randn(batch, channels, size, size),)


def transformer_stack(layers: int = 6, d_model: int = 16, nhead: int = 2, seq: int = 5, batch: int = 2,
                      seed: int = 0):
    """``nn.TransformerEncoder`` of ``TransformerEncoderLayer`` (post-LN, eval):
    kind "transformer", modules ``layers.<l>``, batch_ndim 1.

    Under ``torch.no_grad`` PyTorch takes its fused fast path (one
    ``_transformer_encoder_layer_fwd`` per layer); otherwise the layer is traced
    op by op.
    """
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=2 * d_model, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
    return model.eval(), (torch.randn(batch, seq, d_model),)


class PreLNBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, d_model: int, nhead: int):
        super().__init__()
        self.nhead = nhead
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, 4 * d_model)
        self.fc2 = nn.Linear(4 * d_model, d_model)

    def forward(self, x):
        batch, seq, d_model = x.shape
        head = d_model // self.nhead
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        q, k, v = (t.view(batch, seq, self.nhead, head).transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(head), dim=-1)
        attn = (weights @ v).transpose(1, 2).reshape(batch, seq, d_model)
        x = x + self.proj(attn)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def preln_transformer(layers: int = 6, d_model: int = 16, nhead: int = 2, seq: int = 5, batch: int = 2,
                      seed: int = 0):
    """Hand-written pre-LN blocks: kind "transformer", modules ``layers.<l>``, batch_ndim 1."""
    torch.manual_seed(seed)
    model = Stack(nn.Sequential(*[PreLNBlock(d_model, nhead) for _ in range(layers)]))
    return model.eval(), (torch.randn(batch, seq, d_model),)


class RegionBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)

    @torch.compiler.nested_compile_region
    def forward(self, x):
        return x + torch.tanh(self.linear(x))


def nested_region_stack(depth: int = 8, width: int = 8, batch: int = 4, seed: int = 0):
    """Residual blocks whose forward is a ``nested_compile_region``: Dynamo emits
    ``invoke_subgraph`` calls for all but the first call, which it inlines; kind "residual",
    length ``depth`` (the inlined block joins the chain by extension), modules ``layers.<l>``."""
    torch.manual_seed(seed)
    model = Stack(nn.Sequential(*[RegionBlock(width) for _ in range(depth)]))
    return model.eval(), (torch.randn(batch, width),)


class CheckpointedStack(nn.Module):
    """Residual blocks each run under activation checkpointing, as ``gradient_checkpointing_enable()`` runs a
    transformers model's layers. ``passthrough``: every block also takes a bias (computed before the blocks)
    and returns it unchanged, as T5's blocks return their position bias."""

    def __init__(self, depth: int, width: int, passthrough: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(ResidualTanh(width, passthrough) for _ in range(depth))
        self.passthrough = passthrough
        self.bias_source = nn.Parameter(torch.randn(width)) if passthrough else None

    def forward(self, x):
        if not self.passthrough:
            for layer in self.layers:
                x = checkpoint(layer, x, use_reentrant=False)
            return x
        bias = torch.sin(self.bias_source)
        for layer in self.layers:
            x, bias = checkpoint(layer, x, bias, use_reentrant=False)
        return x


class ResidualTanh(nn.Module):
    """``x + tanh(W x + b) / 2``; ``passthrough``: ``(x + tanh(W x + b + bias) / 2, bias)``."""

    def __init__(self, width: int, passthrough: bool = False):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.passthrough = passthrough

    def forward(self, x, bias=None):
        if not self.passthrough:
            return x + 0.5 * torch.tanh(self.linear(x))
        return x + 0.5 * torch.tanh(self.linear(x) + bias), bias


def checkpointed_stack(depth: int = 8, width: int = 8, batch: int = 4, *, passthrough: bool = False, seed: int = 0):
    """Residual blocks ``x + tanh(W x + b) / 2`` under ``torch.utils.checkpoint`` (non-reentrant): Dynamo
    emits a ``tag_activation_checkpoint`` call per block, each with a body of its own; kind "residual", length
    ``depth``, in train mode (checkpointing matters for gradients). ``passthrough``: each block also returns a
    bias it reads (:class:`CheckpointedStack`): the same chain, the bias a shared input."""
    torch.manual_seed(seed)
    return CheckpointedStack(depth, width, passthrough).train(), (torch.randn(batch, width),)


class UnrolledRNN(nn.Module):
    """``h_t = tanh(W x_t + U h_{t-1} + b)``, ``h_0 = 0``, unrolled over ``t`` by Dynamo."""

    def __init__(self, inputs: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.W = nn.Linear(inputs, hidden)
        self.U = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):
        h = torch.zeros(x.shape[0], self.hidden, dtype=x.dtype)
        for t in range(x.shape[1]):
            h = torch.tanh(self.W(x[:, t]) + self.U(h))
        return h


def unrolled_rnn(steps: int = 16, inputs: int = 3, hidden: int = 8, batch: int = 4, seed: int = 0):
    """Kind "recurrent", length ``steps``; the per-step input ``W x_t + b`` is hoisted ("computed")."""
    torch.manual_seed(seed)
    return UnrolledRNN(inputs, hidden).eval(), (torch.randn(batch, steps, inputs),)


class CellLoop(nn.Module):
    """``nn.GRUCell`` (state ``h``) or ``nn.LSTMCell`` (state ``(h, c)``) applied to ``x[:, t]`` for every ``t``.

    Dynamo lowers each call to one ``torch.gru_cell`` / ``torch.lstm_cell`` op.
    ``sequence``: return every ``h_t`` stacked on dim 1 instead of the last.
    """

    def __init__(self, cell: nn.Module, sequence: bool):
        super().__init__()
        self.cell = cell
        self.sequence = sequence

    def forward(self, x):
        h = torch.zeros(x.shape[0], self.cell.hidden_size, dtype=x.dtype)
        state = (h, torch.zeros_like(h)) if isinstance(self.cell, nn.LSTMCell) else h
        hs = []
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
            hs.append(state[0] if isinstance(state, tuple) else state)
        return torch.stack(hs, 1) if self.sequence else hs[-1]


def gru_cell_loop(steps: int = 16, inputs: int = 3, hidden: int = 8, batch: int = 4, seed: int = 0):
    """An ``nn.GRUCell`` unrolled over ``steps``: kind "recurrent", length ``steps``, batch_ndim 1."""
    torch.manual_seed(seed)
    return CellLoop(nn.GRUCell(inputs, hidden), False).eval(), (torch.randn(batch, steps, inputs),)


def lstm_cell_loop(steps: int = 16, inputs: int = 3, hidden: int = 8, batch: int = 4, *, sequence: bool = False,
                   seed: int = 0):
    """An ``nn.LSTMCell`` unrolled over ``steps``: kind "recurrent" with the tuple state ``(h, c)``
    (both ``(batch, hidden)``), batch_ndim 1, length ``steps``. Dynamo drops the last step's unused
    ``c``: the last segment is not a full one and joins the chain by extension (its ``c`` is ``None``
    in the chain's last output). With ``sequence`` every ``h_t`` is read after the chain
    (``used_outside``)."""
    torch.manual_seed(seed)
    return CellLoop(nn.LSTMCell(inputs, hidden), sequence).eval(), (torch.randn(batch, steps, inputs),)


class HandLSTM(nn.Module):
    """``i, f, g, o = W x_t + U h + b``; ``c = s(f) c + s(i) tanh(g)``; ``h = s(o) tanh(c)``, ``s``: sigmoid."""

    def __init__(self, inputs: int, hidden: int, outputs: str):
        super().__init__()
        self.hidden = hidden
        self.outputs = outputs
        self.W = nn.Linear(inputs, 4 * hidden)
        self.U = nn.Linear(hidden, 4 * hidden, bias=False)

    def forward(self, x):
        h = torch.zeros(x.shape[0], self.hidden, dtype=x.dtype)
        c = torch.zeros(x.shape[0], self.hidden, dtype=x.dtype)
        hs, cs = [], []
        for t in range(x.shape[1]):
            i, f, g, o = (self.W(x[:, t]) + self.U(h)).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            hs.append(h)
            cs.append(c)
        if self.outputs == "all":
            return torch.stack(hs, 1), cs[len(cs) // 2]
        return h


def hand_lstm(steps: int = 16, inputs: int = 3, hidden: int = 8, batch: int = 4, *, outputs: str = "last",
              seed: int = 0):
    """A hand-written LSTM: kind "recurrent", length ``steps``, tuple state ``(h, c)``, batch_ndim 1;
    ``W x_t + b`` is hoisted ("computed"), ``U`` shared. ``outputs="all"`` returns every ``h_t``
    and ``c`` after step ``steps // 2`` (``used_outside``: every position)."""
    torch.manual_seed(seed)
    return HandLSTM(inputs, hidden, outputs).eval(), (torch.randn(batch, steps, inputs),)


class MismatchedPair(nn.Module):
    """State ``(a, b)``, ``a``: ``(batch, width)``, ``b``: ``(width, batch)``:
    ``a <- tanh(W a + x_t) + mean_n b[:, n]``, ``b <- tanh(a)^T``."""

    def __init__(self, width: int):
        super().__init__()
        self.W = nn.Linear(width, width)

    def forward(self, x):
        a = torch.zeros(x.shape[0], x.shape[2], dtype=x.dtype)
        b = torch.zeros(x.shape[2], x.shape[0], dtype=x.dtype)
        for t in range(x.shape[1]):
            a, b = torch.tanh(self.W(a) + x[:, t]) + b.mean(1), torch.tanh(a).transpose(0, 1)
        return a


def mismatched_batch_pair(steps: int = 8, width: int = 8, batch: int = 4, seed: int = 0):
    """A tuple state whose tensors do not share their batch dims: the step keeps ``a``'s dim 0
    independent, ``b`` has no such dim. Not a chain: a Candidate with that reason."""
    torch.manual_seed(seed)
    return MismatchedPair(width).eval(), (torch.randn(batch, steps, width),)


def single_linear(width: int = 8, batch: int = 4, seed: int = 0):
    """One Linear layer: no chain."""
    torch.manual_seed(seed)
    return nn.Linear(width, width).eval(), (torch.randn(batch, width),)


def short_mlp(width: int = 8, batch: int = 4, seed: int = 0):
    """Three blocks, fewer than ``min_chain=4``: no chain."""
    return deep_mlp(3, width, "tanh", batch, seed=seed)


class UNetLike(nn.Module):
    """Encoder levels ``w -> 2w -> ...``, decoder back down, each decoder level adding
    the encoder state of the same width (skip connections)."""

    def __init__(self, widths: list[int]):
        super().__init__()
        self.enc = nn.ModuleList([nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.dec = nn.ModuleList([nn.Linear(b, a) for a, b in reversed(list(zip(widths[:-1], widths[1:])))])

    def forward(self, x):
        skips = []
        for enc in self.enc:
            skips.append(x)
            x = torch.tanh(enc(x))
        for dec, skip in zip(self.dec, reversed(skips)):
            x = torch.tanh(dec(x) + skip)
        return x


def unet_like(levels: int = 4, width: int = 4, batch: int = 2, seed: int = 0):
    """A U-Net-like MLP whose widths double per level: nothing isomorphic repeats, no chain."""
    torch.manual_seed(seed)
    widths = [width * 2**i for i in range(levels + 1)]
    return UNetLike(widths).eval(), (torch.randn(batch, width),)


def unet_uniform(levels: int = 6, width: int = 8, batch: int = 2, seed: int = 0):
    """The same U-Net shape at constant width: the encoder is a "layers" chain whose
    states the decoder reads (``used_outside``), the decoder a chain whose skip
    inputs are per-step "computed" inputs."""
    torch.manual_seed(seed)
    return UNetLike([width] * (levels + 1)).eval(), (torch.randn(batch, width),)


class GraphBreakMLP(nn.Module):
    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first = first
        self.second = second

    def forward(self, x):
        x = self.first(x)
        torch._dynamo.graph_break()
        return self.second(x)


def graph_break_mlp(depth: int = 12, width: int = 8, batch: int = 4, seed: int = 0):
    """``depth`` tanh blocks with a graph break after ``depth // 2``: two graphs,
    each with a "layers" chain (modules ``first.<l>`` and ``second.<l>``)."""
    torch.manual_seed(seed)
    half = depth // 2
    first = nn.Sequential(*[_mlp_block(width, "tanh", False, 0.0, None) for _ in range(half)])
    second = nn.Sequential(*[_mlp_block(width, "tanh", False, 0.0, None) for _ in range(depth - half)])
    return GraphBreakMLP(first, second).eval(), (torch.randn(batch, width),)


class DenseSkip(nn.Module):
    """``s_l = tanh(W_l s_{l-1} + b_l) + s_{l-2}``: every block reads two earlier states."""

    def __init__(self, depth: int, width: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(width, width) for _ in range(depth)])

    def forward(self, x):
        prev, cur = x, torch.sin(x)
        for layer in self.layers:
            prev, cur = cur, torch.tanh(layer(cur)) + prev
        return cur


def dense_skip(depth: int = 8, width: int = 8, batch: int = 4, seed: int = 0):
    """Repeated blocks that read the state of two steps back: no chain (a Candidate)."""
    torch.manual_seed(seed)
    return DenseSkip(depth, width).eval(), (torch.randn(batch, width),)


class ScaledMLP(nn.Module):
    def __init__(self, depth: int, width: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(width, width) for _ in range(depth)])

    def forward(self, x):
        for index, layer in enumerate(self.layers):
            x = torch.tanh(layer(x)) * (1.0 + 0.05 * index)
        return x


def scaled_mlp(depth: int = 8, width: int = 8, batch: int = 4, seed: int = 0):
    """``x -> tanh(W_l x + b_l) * c_l`` with a Python float ``c_l`` per layer: kind
    "layers" with a per-step "constant" input."""
    torch.manual_seed(seed)
    return ScaledMLP(depth, width).eval(), (torch.randn(batch, width),)


class TappedMLP(nn.Module):
    def __init__(self, depth: int, width: int, taps: tuple[int, ...]):
        super().__init__()
        self.taps = taps
        self.layers = nn.ModuleList([_Block(width, "tanh") for _ in range(depth)])

    def forward(self, x):
        states = []
        for layer in self.layers:
            x = layer(x)
            states.append(x)
        return x + sum(states[t] for t in self.taps)


def tapped_mlp(depth: int = 8, width: int = 8, batch: int = 4, taps: tuple[int, ...] = (2, 5), seed: int = 0):
    """An MLP whose output also reads the states after layers ``taps``: one "layers"
    chain with ``used_outside == list(taps)``."""
    torch.manual_seed(seed)
    return TappedMLP(depth, width, taps).eval(), (torch.randn(batch, width),)


class WeightTiedLoop(nn.Module):
    def __init__(self, steps: int, width: int):
        super().__init__()
        self.steps = steps
        self.weight = nn.Parameter(torch.randn(width, width) / math.sqrt(width))

    def forward(self, x):
        for _ in range(self.steps):
            x = torch.tanh(x @ self.weight)
        return x


def weight_tied_loop(steps: int = 10, width: int = 8, batch: int = 4, seed: int = 0):
    """``x -> tanh(x @ W)`` with one shared ``W``, written over tensors (no
    per-layer modules): kind "recurrent", the weight in ``shared``."""
    torch.manual_seed(seed)
    return WeightTiedLoop(steps, width).eval(), (torch.randn(batch, width),)


class ToyDenoiserLoop(nn.Module):
    """``x <- a_i x + b_i eps(x, t_i) (+ c_i z_i)`` with one shared MLP ``eps`` and
    coefficient tables indexed by the (unrolled) step ``i``, like a DDIM/DDPM loop."""

    def __init__(self, steps: int, width: int, noise: bool):
        super().__init__()
        self.steps = steps
        self.noise = noise
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        self.time = nn.Parameter(torch.randn(2 * width))
        self.register_buffer("t", torch.linspace(1.0, 0.0, steps))
        self.register_buffer("a", torch.linspace(0.99, 0.9, steps))
        self.register_buffer("b", torch.linspace(-0.05, -0.1, steps))
        self.register_buffer("c", torch.linspace(0.1, 0.0, steps))

    def forward(self, x):
        for i in range(self.steps):
            eps = self.fc2(F.silu(self.fc1(x) + self.t[i] * self.time))
            x = self.a[i] * x + self.b[i] * eps
            if self.noise:
                x = x + self.c[i] * torch.randn(x.shape, dtype=x.dtype)
        return x


def toy_denoiser_loop(steps: int = 12, width: int = 4, batch: int = 2, *, noise: bool = False, seed: int = 0):
    """A denoising loop with shared weights and per-step coefficients: kind "denoise";
    with ``noise`` the per-step ``torch.randn`` draws are hoisted as "computed" inputs."""
    torch.manual_seed(seed)
    return ToyDenoiserLoop(steps, width, noise).eval(), (torch.randn(batch, width),)


def mlp_graph(depth: int = 1000, width: int = 4, batch: int = 2, act=torch.tanh) -> tuple[fx.GraphModule, tuple]:
    """The graph Dynamo makes of ``deep_mlp(depth, width)``, built directly.

    Dynamo needs about 50 s to trace 1000 layers on a 2-core CPU; this builds the
    same nodes (parameter placeholders, ``linear``/activation calls, fake
    ``example_value`` and ``nn_module_stack`` meta) in milliseconds. Returns the
    graph module and real example inputs (``x`` first, then the parameters).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(0)
    mode = FakeTensorMode()
    graph = fx.Graph()
    with mode:
        fake_state = torch.empty(batch, width)
        fake_weight = torch.empty(width, width)
        fake_bias = torch.empty(width)
    x = graph.placeholder("l_x_")
    x.meta["example_value"] = fake_state
    inputs = [torch.randn(batch, width)]
    params = []
    for layer in range(depth):
        for name, fake in (("weight", fake_weight), ("bias", fake_bias)):
            node = graph.placeholder(f"l_self_modules_layers_modules_{layer}_modules_0_parameters_{name}_")
            node.meta["example_value"] = fake
            node.meta["nn_module_stack"] = {f"layer{layer}": (f"L['self'].layers.{layer}.0", nn.Linear)}
            params.append(node)
            inputs.append(torch.randn(fake.shape) / math.sqrt(width))
    state = x
    for layer in range(depth):
        linear = graph.call_function(torch._C._nn.linear, (state, params[2 * layer], params[2 * layer + 1]))
        linear.meta.update(example_value=fake_state,
                           nn_module_stack={f"layer{layer}": (f"L['self'].layers.{layer}.0", nn.Linear)})
        state = graph.call_function(act, (linear,))
        state.meta.update(example_value=fake_state,
                          nn_module_stack={f"layer{layer}": (f"L['self'].layers.{layer}.1", nn.Tanh)})
    graph.output((state,))
    return fx.GraphModule(torch.nn.Module(), graph), tuple(inputs)


def scanned_mlp(depth: int = 16, width: int = 4, act: str = "tanh", batch: int = 3, seed: int = 0):
    """:func:`deep_mlp`'s blocks as ``seqpar.scan_layers``: one ``scan`` call, kind "layers", modules ``layers``."""
    torch.manual_seed(seed)
    blocks = [_mlp_block(width, act, False, 0.0, None) for _ in range(depth)]
    return Stack(seqpar.scan_layers(blocks)).eval(), (torch.randn(batch, width),)


def scanned_resnet(blocks: int = 6, channels: int = 4, size: int = 6, batch: int = 2, seed: int = 0):
    """:func:`conv_resnet`'s basic blocks (BatchNorm in eval) as ``seqpar.scan_layers``: kind "residual", buffers stacked."""
    torch.manual_seed(seed)
    with torch.no_grad():
        layers = [BasicBlock(channels).eval() for _ in range(blocks)]
    return Stack(seqpar.scan_layers(layers)).eval(), (torch.randn(batch, channels, size, size),)


class ScanLSTM(nn.Module):
    """A hand-written LSTM over ``x[:, t]`` by ``scan(dim=1)``: carry ``(h, c)``, per-step output ``h`` (a clone).

    Chain: kind "recurrent", length ``steps``, tuple state; ``outputs="all"`` returns every ``h`` (the
    scan's stacked per-step outputs), ``"last"`` the final ``h``; ``reverse`` runs the sequence backwards.
    """

    def __init__(self, inputs: int, hidden: int, outputs: str, reverse: bool):
        super().__init__()
        self.input = nn.Linear(inputs, 4 * hidden)
        self.hidden = nn.Linear(hidden, 4 * hidden, bias=False)
        self.outputs, self.reverse = outputs, reverse

    def forward(self, x, h0, c0):
        def step(carry, x_t):
            h, c = carry
            i, f, g, o = (self.input(x_t) + self.hidden(h)).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            return (h, c), h.clone()

        (h, _), hs = scan(step, (h0, c0), x, dim=1, reverse=self.reverse)
        return hs if self.outputs == "all" else h


def scan_lstm(steps: int = 12, inputs: int = 3, hidden: int = 5, batch: int = 2, *, outputs: str = "last",
              reverse: bool = False, seed: int = 0):
    """:class:`ScanLSTM` on ``x: (batch, steps, inputs)`` from ``(h0, c0) = (0.1 noise, 0)``."""
    torch.manual_seed(seed)
    model = ScanLSTM(inputs, hidden, outputs, reverse)
    return model, (torch.randn(batch, steps, inputs), 0.1 * torch.randn(batch, hidden), torch.zeros(batch, hidden))


class SelectiveScan(nn.Module):
    """``s_l = exp(A dt_l) * s_{l-1} + dt_l B_l x_l``, ``y_l = s_l C_l``: Mamba's reference loop at width ``d``,
    state size ``n``; ``views`` writes the broadcasts as ``R[None, :, None, :]`` ("index") or ``unsqueeze``."""

    def __init__(self, d=64, n=24, views="index", noise=False, mutate=False):
        super().__init__()
        self.d, self.n, self.views, self.noise, self.mutate = d, n, views, noise, mutate
        self.A_log = nn.Parameter(torch.log(torch.linspace(1.0, 4.0, n)).repeat(d, 1))
        self.dt_bias = nn.Parameter(torch.randn(d) * 0.1 - 2.0)
        self.proj = nn.Linear(d, d + 2 * n)

    def forward(self, x):  # (batch, L, d) -> (batch, d, L)
        dt, B, C = self.proj(x).split([self.d, self.n, self.n], dim=-1)
        dt = F.softplus(dt.transpose(1, 2) + self.dt_bias[..., None])  # (batch, d, L)
        A = -torch.exp(self.A_log)
        u = x.transpose(1, 2)
        if self.views == "index":
            dA = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
            dBu = dt[..., None] * B[:, None, :, :] * u[:, :, :, None]
        else:
            dA = torch.exp(A.unsqueeze(0).unsqueeze(2) * dt.unsqueeze(-1))
            if self.mutate:  # after dA is computed: a step recomputing dA from dt would read the new dt
                dt.mul_(1.5)
            dBu = dt.unsqueeze(-1) * B.unsqueeze(1) * u.unsqueeze(3)
        if self.noise:  # a random draw per value: the per-step inputs expand nothing
            dA = dA * (1 + 1e-3 * torch.randn_like(dA))
            dBu = dBu + 1e-3 * torch.randn_like(dBu)
        s = x.new_zeros(x.shape[0], self.d, self.n)
        ys = []
        for i in range(x.shape[1]):
            s = dA[:, :, i] * s + dBu[:, :, i]
            ys.append(torch.matmul(s, C[:, i, :].unsqueeze(-1))[:, :, 0])
        return torch.stack(ys, dim=-1)
