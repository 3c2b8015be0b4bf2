"""Steps of the form ``s_l = h(s_{l-1} W_l^T + b_l)``, found in a traced step and run as one compiled loop.

A chain of small dense layers kept sequential for cost spends most of each
step in the fixed cost of two operator calls (``linear``, then ``h``). Where
the traced step (the rolled loop's plan, :mod:`.rolled`) is exactly

    z = linear(s, W, b) | s @ W (+ b) | s @ W^T (+ b),    s' = h(z),

with ``W`` (``(w, w)``) and ``b`` (``(w,)``) per-step inputs or shared
tensors and ``h`` one of ``relu``, ``tanh``, ``sigmoid``, ``silu``,
``gelu`` (either form) or none, :func:`match` returns a
:class:`DenseStep` and :func:`run` runs all steps through
:mod:`.kernels.cpu_dense_loop`. Its states differ from eager's by rounding,
so only a chain whose errors do not grow may use it (the caller decides).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .kernels import cpu_dense_loop

_aten = torch.ops.aten
_ACTIVATIONS = {
    _aten.relu.default: "relu", _aten.relu_.default: "relu", _aten.tanh.default: "tanh",
    _aten.tanh_.default: "tanh", _aten.sigmoid.default: "sigmoid", _aten.sigmoid_.default: "sigmoid",
    _aten.silu.default: "silu", _aten.silu_.default: "silu", _aten.gelu.default: "gelu", _aten.gelu_.default: "gelu",
}
_PRODUCTS = (_aten.mm.default, _aten.matmul.default)
_TRANSPOSES = (_aten.t.default, _aten.numpy_T.default)


@dataclass(frozen=True)
class DenseStep:
    """Where a step's ``W`` and ``b`` come from: ``("x", i)`` (per-step input column ``i``) or
    ``("shared", i)``; ``bias`` ``None`` for none; ``weight_layout`` 1 for ``s W^T`` (``linear``'s ``W``),
    0 for ``s W``; ``activation`` a name of :data:`cpu_dense_loop.ACTIVATIONS`."""

    weight: tuple[str, int]
    bias: tuple[str, int] | None
    weight_layout: int
    activation: str


def match(plan) -> DenseStep | None:
    """The rolled loop's plan (:class:`seqpar.runtime.rolled.StepPlan`) as a :class:`DenseStep`, or ``None``."""
    if plan.stateful:
        return None
    body = [node for node in plan.call if node in plan.varying and node not in plan.absorbed]
    result = plan.result
    activation = "identity"
    head = result
    if result in plan.call and plan.call[result][0] in _ACTIVATIONS:
        activation = _activation(plan, result)
        if activation is None:
            return None
        head = plan.resolve(plan.call[result][1][0])
        if plan.users(head) != [result]:
            return None
    if set(body) != {head, result}:  # the step is the product and its activation, nothing else
        return None
    found = _product(plan, head)
    if found is None:
        return None
    weight, bias, layout = found
    sources = _sources(plan)
    state = plan.state.meta.get("val")
    if not isinstance(state, torch.Tensor) or state.dim() != 2 or weight not in sources:
        return None
    width = state.shape[1]
    if not _shaped(weight, (width, width), state.dtype) or (bias is not None and not (
            bias in sources and _shaped(bias, (width,), state.dtype))):
        return None
    return DenseStep(sources[weight], None if bias is None else sources[bias], layout, activation)


def run(dense: DenseStep, s0: torch.Tensor, columns, shared, start: int, stop: int,
        out: torch.Tensor) -> torch.Tensor | None:
    """States ``s_{start+1} .. s_stop`` into ``out`` through the compiled loop (``None`` where it cannot run
    on these tensors: the caller runs eager's loop)."""
    weight = _operand(dense.weight, columns, shared, start, stop)
    bias = None if dense.bias is None else _operand(dense.bias, columns, shared, start, stop)
    return cpu_dense_loop.run(s0, weight, bias, out, dense.weight_layout, dense.activation)


def usable(dense: DenseStep | None, state: torch.Tensor) -> bool:
    """Whether ``dense`` steps on states like ``state`` ``(N, w)`` are worth the compiled loop here."""
    return (dense is not None and state.device.type == "cpu" and cpu_dense_loop.worthwhile(*state.shape)
            and cpu_dense_loop.available(state.dtype))


def _operand(source: tuple[str, int], columns, shared, start: int, stop: int) -> torch.Tensor:
    kind, index = source
    if kind == "shared":
        return shared[index]
    return torch.stack(list(columns[index][start:stop]))


def _activation(plan, node) -> str | None:
    op, args, kwargs = plan.call[node]
    name = _ACTIVATIONS[op]
    if name != "gelu":
        return name if len(args) == 1 and not kwargs else None
    approximate = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
    return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)


def _product(plan, head) -> tuple[fx.Node, fx.Node | None, int] | None:
    """``(W, b, layout)`` where ``head`` is ``s W^T + b`` (layout 1) or ``s W + b`` (layout 0) on the state."""
    if head not in plan.call:
        return None
    op, args, kwargs = plan.call[head]
    if op is _aten.linear.default and not kwargs and len(args) in (2, 3):
        state, weight, bias = (*args, None)[:3]
        layout = 1
    elif op in _PRODUCTS and not kwargs and len(args) == 2:
        (state, weight), bias, layout = args, None, 0
    elif op is _aten.addmm.default and not kwargs and len(args) == 3:
        bias, state, weight = args
        layout = 0
    else:
        return None
    if not isinstance(state, fx.Node) or plan.resolve(state) is not plan.state:
        return None
    weight = plan.resolve(weight) if isinstance(weight, fx.Node) else None
    if weight is None:
        return None
    if layout == 0 and weight in plan.call and plan.call[weight][0] in _TRANSPOSES:
        weight, layout = plan.resolve(plan.call[weight][1][0]), 1
    if bias is not None:
        bias = plan.resolve(bias) if isinstance(bias, fx.Node) else None
        if bias is None:
            return None
    return weight, bias, layout


def _sources(plan) -> dict:
    sources = {node: ("x", index) for index, node in enumerate(plan.xs)}
    sources.update({node: ("shared", index) for index, node in enumerate(plan.shared)})
    return sources


def _shaped(node: fx.Node, shape: tuple, dtype: torch.dtype) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and tuple(value.shape) == shape and value.dtype == dtype
