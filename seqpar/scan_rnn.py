"""``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` as torch scans over time, which the backend solves in parallel.

PyTorch runs these modules as one fused op (``aten::lstm``, ...): a graph
holds no chain to find. ``seqpar.scan_rnn(module)`` computes the same
function from the same parameters (shared, not copied: the optimizer and the
``state_dict`` keys stay the module's) as one ``scan`` per layer and
direction, whose carry is the hidden state; the ``seqpar`` backend finds
each scan as a "recurrent" chain (ParaRNN's setting: Newton over the
sequence, one block-bidiagonal solve per iteration). Per layer ``k`` and
direction, with ``x_t`` the layer's input at time ``t``, the input
projection ``a_t = W_ih x_t + b_ih`` is computed for every ``t`` at once
outside the scan, and the step is PyTorch's cell:

    RNN:   h_t = act(a_t + W_hh h_{t-1} + b_hh)                     act = tanh or relu
    LSTM:  i, f, g, o = chunks of a_t + W_hh h_{t-1} + b_hh
           c_t = sigmoid(f) c_{t-1} + sigmoid(i) tanh(g),   h_t = sigmoid(o) tanh(c_t)
    GRU:   r, z, n_a = chunks of a_t;  r_h, z_h, n_h = chunks of W_hh h_{t-1} + b_hh
           r = sigmoid(r + r_h),  z = sigmoid(z + z_h),  n = tanh(n_a + r n_h)
           h_t = (1 - z) n + z h_{t-1}

The reverse direction scans ``t = T-1 .. 0``; the layer's output is both
directions' ``h_t`` side by side; between layers, dropout in training mode
as the module applies it. Inputs, outputs and ``hx`` are the module's:
``(T, B, F)`` or ``(B, T, F)`` with ``batch_first``, or ``(T, F)`` unbatched.
Unsupported (``ValueError``): ``proj_size > 0`` and ``PackedSequence`` inputs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._higher_order_ops.scan import scan


def _rnn_cell(activation):
    def cell(h, a, w_hh, b_hh):
        return activation(a + F.linear(h, w_hh, b_hh))

    return cell


def _lstm_cell(state, a, w_hh, b_hh):
    h, c = state
    i, f, g, o = (a + F.linear(h, w_hh, b_hh)).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _gru_cell(h, a, w_hh, b_hh):
    r_a, z_a, n_a = a.chunk(3, dim=-1)
    r_h, z_h, n_h = F.linear(h, w_hh, b_hh).chunk(3, dim=-1)
    r = torch.sigmoid(r_a + r_h)
    z = torch.sigmoid(z_a + z_h)
    n = torch.tanh(n_a + r * n_h)
    return (1 - z) * n + z * h


class ScannedRNN(nn.Module):
    """An ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` computed by scans over time (see the module doc).

    Holds the module's own parameters under the module's names (``weight_ih_l0``, ...).
    """

    def __init__(self, rnn: nn.RNNBase):
        super().__init__()
        if not isinstance(rnn, (nn.RNN, nn.LSTM, nn.GRU)):
            raise ValueError(f"scan_rnn takes an nn.RNN, nn.LSTM or nn.GRU, not a {type(rnn).__name__}")
        if getattr(rnn, "proj_size", 0):
            raise ValueError("scan_rnn: LSTM with proj_size > 0 is not supported")
        self.mode = type(rnn).__name__
        self.hidden_size, self.num_layers = rnn.hidden_size, rnn.num_layers
        self.bias, self.batch_first, self.dropout = rnn.bias, rnn.batch_first, float(rnn.dropout)
        self.directions = 2 if rnn.bidirectional else 1
        for name in rnn._flat_weights_names:
            self.register_parameter(name, getattr(rnn, name))
        if self.mode == "LSTM":
            self._cell = _lstm_cell
        elif self.mode == "GRU":
            self._cell = _gru_cell
        else:
            self._cell = _rnn_cell(torch.tanh if rnn.nonlinearity == "tanh" else torch.relu)
        self.train(rnn.training)

    def _weights(self, layer: int, direction: int):
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        get = lambda name: getattr(self, name + suffix) if self.bias or not name.startswith("b") else None  # noqa: E731
        return get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh")

    def forward(self, input, hx=None):
        """The module's ``(output, h_n)`` (LSTM: ``(output, (h_n, c_n))``) for ``input`` and ``hx``."""
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise ValueError("scan_rnn: PackedSequence inputs are not supported; pass the padded tensor")
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1)
        if batched and self.batch_first:
            x = x.transpose(0, 1)
        states = self._initial_states(x, hx, batched)
        finals = []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.directions):
                index = layer * self.directions + direction
                state = tuple(s[index] for s in states) if self.mode == "LSTM" else states[0][index]
                final, hs = self._scan(x, state, *self._weights(layer, direction), reverse=bool(direction))
                finals.append(final)
                outputs.append(hs)
            x = outputs[0] if self.directions == 1 else torch.cat(outputs, dim=-1)
            if self.training and self.dropout and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        output = x.transpose(0, 1) if batched and self.batch_first else x
        if self.mode == "LSTM":
            h_n, c_n = (torch.stack([final[k] for final in finals]) for k in range(2))
            return self._unbatch(output, batched), (self._unbatch(h_n, batched), self._unbatch(c_n, batched))
        return self._unbatch(output, batched), self._unbatch(torch.stack(finals), batched)

    def _scan(self, x, state, w_ih, w_hh, b_ih, b_hh, reverse: bool):
        """``(final state, every h_t as (T, B, H))`` of one layer and direction over ``x: (T, B, F)``."""
        projected = F.linear(x, w_ih, b_ih)  # a_t for every t at once
        cell = self._cell

        def step(s, a):
            s = cell(s, a, w_hh, b_hh)
            return s, (s[0] if isinstance(s, tuple) else s).clone()

        return scan(step, state, projected, reverse=reverse)

    def _initial_states(self, x, hx, batched: bool) -> tuple[torch.Tensor, ...]:
        """``(h_0,)`` or ``(h_0, c_0)``, each ``(layers x directions, B, H)``."""
        count = len(("h", "c")) if self.mode == "LSTM" else 1
        if hx is None:
            zeros = x.new_zeros(self.num_layers * self.directions, x.shape[1], self.hidden_size)
            return (zeros,) * count
        given = tuple(hx) if self.mode == "LSTM" else (hx,)
        return tuple(h if batched else h.unsqueeze(1) for h in given)

    @staticmethod
    def _unbatch(value, batched: bool):
        return value if batched else value.squeeze(1)

    def extra_repr(self) -> str:
        return (f"{self.mode}, hidden_size={self.hidden_size}, num_layers={self.num_layers}, "
                f"bidirectional={self.directions == 2}, batch_first={self.batch_first}")


def scan_rnn(rnn: nn.RNNBase) -> ScannedRNN:
    """``rnn`` (``nn.RNN``, ``nn.LSTM`` or ``nn.GRU``) as :class:`ScannedRNN`: the same function and
    parameters, computed by scans over time that the ``seqpar`` backend solves in parallel."""
    return ScannedRNN(rnn)
