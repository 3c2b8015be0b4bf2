"""What a chain's step does to its state's dims: batch dims, and whether it attends, adds or convolves.

``step_facts(step, leaf_shapes)`` reads a step GraphModule (as built by
:mod:`seqpar.passes.step`) and returns :class:`StepFacts`. Guarantee:
``batch_ndim`` leading dims of every state tensor are kept independent by
every op on the state path as far as this analysis knows the op, and are the
same dims (same sizes, the same batch elements) in every tensor of a tuple
state; an op it does not know keeps no dim, so ``batch_ndim`` errs towards 0
(dense Jacobian blocks over the whole state: slower, never wrong).
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import Node

from .tokens import call_arg, example, flatten_args, target_name

POINTWISE = {
    "add", "sub", "mul", "truediv", "div", "true_divide", "rsub", "neg", "pos", "pow", "floordiv", "mod",
    "abs", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "sin", "cos", "tan",
    "tanh", "sinh", "cosh", "asin", "acos", "atan", "sigmoid", "relu", "gelu", "silu", "mish", "elu", "selu",
    "celu", "leaky_relu", "softplus", "hardtanh", "relu6", "hardswish", "hardsigmoid", "logsigmoid",
    "log_sigmoid", "logaddexp", "tanhshrink", "softsign", "softshrink", "hardshrink", "erf", "erfc", "square",
    "clamp", "clamp_min", "clamp_max", "clip", "where", "maximum", "minimum", "lerp", "addcmul", "addcdiv",
    "reciprocal", "sign",
    "float", "double", "half", "bfloat16", "to", "type", "type_as", "contiguous", "clone", "detach",
    "dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d", "nan_to_num",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
    "__neg__", "__pow__", "__rpow__", "glu_", "logit", "xlogy", "copysign", "atan2", "hypot", "fmod",
    "remainder", "sgn", "trunc", "floor", "ceil", "round", "frac", "expand", "expand_as", "masked_fill",
    "threshold",
}
# Adding the state (or a state tensor) to another value of the step makes a residual block.
_ADDITIONS = {"add", "__add__", "__radd__", "sub", "__sub__"}
MATMUL_OPS = {"matmul", "mm", "bmm", "__matmul__", "__rmatmul__"}
_REDUCTIONS = {"sum", "mean", "amax", "amin", "var", "std", "logsumexp", "norm", "prod", "nansum", "nanmean"}
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze", "view_as", "reshape_as"}
ATTENTION_OPS = {"scaled_dot_product_attention", "multi_head_attention_forward", "_transformer_encoder_layer_fwd",
              "_native_multi_head_attention"}
CONV_OPS = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "convolution"}
# Fused RNN cells: (input, hidden state(s), weights) -> new hidden state(s), all (batch, features).
_CELLS = {"lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell"}
_POOLS = {"max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
          "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool2d",
          "interpolate", "upsample", "upsample_nearest2d", "upsample_bilinear2d"}


@dataclass
class StepFacts:
    """What :func:`step_facts` found.

    ``batch_ndim``: leading dims of every state tensor that the step treats
    independently and that all of them share. ``leaf_batch_ndims``: per state
    tensor, the leading dims the step keeps independent in it, whether or not
    the other tensors share them; ``shared_ndim``: how many leading dims the
    state tensors' shapes have in common. A tensor with more batch dims than
    ``shared_ndim`` has batch dims the others lack. The rest: what kind of
    block the step is.
    """

    batch_ndim: int
    leaf_batch_ndims: tuple[int, ...]
    shared_ndim: int
    attention: bool
    residual: bool
    convolution: bool


def ndim_of(value) -> int | None:
    return value.ndim if isinstance(value, torch.Tensor) else None


def _dim(d, ndim):
    return d + ndim if isinstance(d, int) and d < 0 else d


# A label names one dim of the state: ``d`` for a dim every state tensor shares
# (dim ``d < shared_ndim``), ``(i, d)`` for dim ``d`` of state tensor ``i`` alone.
# A tensor on the state path has a tuple of labels, one per dim (``None``: no
# state dim); a tuple-valued node (``chunk``, an LSTM cell) has a list of them.
Label = Any
Labels = Any  # tuple[Label | None, ...] | list[tuple[Label | None, ...]]


@dataclass
class _Call:
    """One call on the state path, as a rule sees it."""

    node: Node
    name: str  # the op's name (``target_name``)
    value: Any  # its example value
    ndim: int | None  # ``value.ndim`` for a tensor result, else ``None``
    first: tuple | None  # the labels of its first argument (``None``: not on the state path)
    operands: list[tuple]  # the labels of its state-dependent arguments, in order

    def one_operand(self) -> tuple | None:
        """The labels of the first argument where it is the only state-dependent argument."""
        return self.first if self.first is not None and len(self.operands) == 1 else None


class _DimTracker:
    """Follows the state's dims through a step graph: which dims of each value carry which state dims.

    ``mixed`` collects the labels of state dims some op mixed with other
    values (a contraction over it, a normalisation over it, a reshape that
    merges it, an op this module does not know); a mixed dim is no batch dim.
    The block-kind flags are set as the ops are seen.
    """

    def __init__(self, leaf_shapes: list[tuple[int, ...]]):
        self.shared_ndim = _common_prefix(leaf_shapes)
        self.leaf_labels = [tuple(d if d < self.shared_ndim else (i, d) for d in range(len(shape)))
                            for i, shape in enumerate(leaf_shapes)]
        self.labels: dict[Node, Labels] = {}
        self.mixed: set[Label] = set()
        self.state: Node | None = None
        self.state_nodes: set[Node] = set()  # the state placeholder and the state tensors taken from it
        self.attention = self.residual = self.convolution = False

    # ---- label algebra ------------------------------------------------- #

    def of(self, arg) -> Labels | None:
        """The labels of a call argument, ``None`` where it is not on the state path."""
        return self.labels.get(arg) if arg.__class__ is Node else None

    def broadcast(self, ndim: int, operands: list[tuple]) -> tuple:
        """The labels of a broadcast of ``operands`` to ``ndim`` dims (aligned at the right).

        A dim keeps its label where the operands that have it agree; two
        different labels meeting at one dim, or a label broadcast away, are mixed.
        """
        out: list = [None] * ndim
        owned = [False] * ndim
        for labs in operands:
            offset = ndim - len(labs)
            for i, label in enumerate(labs):
                at = offset + i
                if at < 0:
                    if label is not None:
                        self.mixed.add(label)
                    continue
                if not owned[at]:
                    out[at], owned[at] = label, True
                elif out[at] != label:
                    self.mixed.update(x for x in (out[at], label) if x is not None)
                    out[at] = None
        return tuple(out)

    def reduce_over(self, labs: tuple, dims) -> tuple:
        """``labs`` with ``dims`` (negative allowed) no longer carrying state dims; their labels are mixed."""
        dims = {_dim(d, len(labs)) for d in dims}
        for d in dims:
            if isinstance(d, int) and 0 <= d < len(labs) and labs[d] is not None:
                self.mixed.add(labs[d])
        return tuple(None if i in dims else label for i, label in enumerate(labs))

    def reshape(self, labs: tuple, shape_in, shape_out) -> tuple:
        """The labels after a flat-order reshape: a label moves to the one output dim of the same size
        and the same number of elements before it; a label with no such dim (merged, split) is mixed."""
        out: list = [None] * len(shape_out)
        before_in, before_out = _prefix_products(shape_in), _prefix_products(shape_out)
        for i, label in enumerate(labs):
            if label is None:
                continue
            hit = [j for j in range(len(shape_out))
                   if before_out[j] == before_in[i] and shape_out[j] == shape_in[i]]
            if len(hit) == 1:
                out[hit[0]] = label
            else:
                self.mixed.add(label)
        return tuple(out)

    # ---- the walk ------------------------------------------------------ #

    def run(self, step: fx.GraphModule) -> list[Labels | None]:
        """Labels every state-dependent node of ``step``; returns the labels of the step's outputs."""
        for node in step.graph.nodes:
            if node.op == "placeholder":
                if self.state is None:  # the first placeholder is the state
                    self.state = node
                    self.state_nodes.add(node)
                    self.labels[node] = self.leaf_labels[0] if len(self.leaf_labels) == 1 else list(self.leaf_labels)
            elif node.op == "output":
                out = node.args[0]
                return [self.of(x) for x in out] if isinstance(out, (tuple, list)) else [self.of(out)]
            else:
                self.visit(node)
        return []

    def visit(self, node: Node) -> None:
        """Labels ``node`` if it reads the state path; notes what it mixes and what kind of block it shows."""
        flat = flatten_args((node.args, node.kwargs), [])
        dependent = [a for a in flat if a.__class__ is Node and self.labels.get(a) is not None]
        if not dependent:
            return
        value = example(node)
        ndim = ndim_of(value)
        first = self.of(node.args[0]) if node.args else None
        if node.target is operator.getitem and isinstance(first, list):
            self._select_item(node, first, ndim)
            return
        name = target_name(node)
        self._note_block_kind(node, name, dependent)
        operands = [self.labels[a] for a in dependent]
        out = None
        if all(isinstance(labs, tuple) for labs in operands):
            rule = RULES.get(name)
            if rule is not None:
                out = rule(_Call(node, name, value, ndim, first, operands), self)
        self._record(node, value, ndim, operands, out)

    def _select_item(self, node: Node, items: list, ndim: int | None) -> None:
        """``items[k]`` of a tuple-valued node: selecting mixes nothing (the others are checked where read)."""
        index = node.args[1]
        picked = items[index] if isinstance(index, int) and index < len(items) else None
        if picked is None:
            picked = (None,) * ndim if ndim is not None else [None]
        self.labels[node] = picked
        if node.args[0] is self.state:
            self.state_nodes.add(node)

    def _note_block_kind(self, node: Node, name: str, dependent: list[Node]) -> None:
        """Attention and convolution ops; a residual: the state (or a state tensor) added to a value of the step."""
        if name in ATTENTION_OPS:
            self.attention = True
        if name in CONV_OPS:
            self.convolution = True
        if name in _ADDITIONS and len(dependent) == 2 and any(a in self.state_nodes for a in dependent):
            self.residual = True

    def _record(self, node: Node, value, ndim: int | None, operands: list, out: Labels | None) -> None:
        """Stores ``node``'s labels (``out``; ``None``: an op that keeps no state dim); state dims
        present in the operands that vanish from ``out``, or appear twice in it, are mixed."""
        if out is None:
            out = [None] * len(value) if isinstance(value, (tuple, list)) else None
        present_before = set()
        for labs in operands:
            _present(labs, present_before)
        self.mixed.update(present_before - _present(out, set()))
        if isinstance(out, tuple):
            seen = Counter(label for label in out if label is not None)
            self.mixed.update(label for label, count in seen.items() if count > 1)
        if out is not None:
            self.labels[node] = out
        else:
            self.labels[node] = (None,) * (ndim or 0) if ndim is not None else [None]

    def batch_ndims(self, outputs: list[Labels | None]) -> list[int]:
        """Per state tensor, the largest ``k < ndim`` with its labels of dims ``0..k-1`` unmixed and
        at dims ``0..k-1`` of its next value (``outputs``)."""
        kept = []
        for index, labs in enumerate(self.leaf_labels):
            after = outputs[index] if index < len(outputs) and isinstance(outputs[index], tuple) else ()
            k = 0
            while k < min(len(labs) - 1, len(after)) and after[k] == labs[k] and labs[k] not in self.mixed:
                k += 1
            kept.append(k)
        return kept


def _present(labels: Labels | None, acc: set) -> set:
    """Adds the labels in ``labels`` (a tuple, or a list of tuples) to ``acc``."""
    if isinstance(labels, list):
        for labs in labels:
            _present(labs, acc)
    elif isinstance(labels, tuple):
        acc.update(label for label in labels if label is not None)
    return acc


def _prefix_products(shape) -> list[int]:
    """``[1, s_0, s_0 s_1, ...]``: the number of elements before each dim, in flat order."""
    out = [1]
    for size in shape:
        out.append(out[-1] * size)
    return out


# ---- the rules: how each op family treats the state dims ---------------- #
# A rule takes the call and the tracker and returns the call's labels, or
# ``None`` where it cannot say (the call keeps no state dim); it marks the
# labels the op contracts or normalises over as mixed.


def _pointwise(call: _Call, dims: _DimTracker):
    """Elementwise (with broadcasting): every dim kept where the operands agree."""
    return dims.broadcast(call.ndim, call.operands) if call.ndim is not None else None


def _batch_norm(call: _Call, dims: _DimTracker):
    """Eval-mode batch norm is per channel affine: every dim kept; in training it mixes the batch."""
    labs = call.one_operand()
    if labs is None or call.ndim is None:
        return None
    return labs if call_arg(call.node, 5, "training", False) is not True else None


def _linear(call: _Call, dims: _DimTracker):
    """``x W^T + b`` with ``x`` on the state path: contracts the last dim."""
    labs = call.one_operand()
    if labs is None:
        return None
    dims.reduce_over(labs, [-1])
    return labs[:-1] + (None,)


def _matmul(call: _Call, dims: _DimTracker):
    """``a @ b``: the batch dims broadcast, ``a``'s last and ``b``'s second-to-last contracted.

    Both operands on the state path (``q @ k^T``) is attention."""
    node, ndim = call.node, call.ndim
    if ndim is None or len(node.args) < 2:
        return None
    a_labs, b_labs = dims.of(node.args[0]), dims.of(node.args[1])
    a_value, b_value = (example(x) if x.__class__ is Node else None for x in node.args[:2])
    if call.name == "__rmatmul__":
        a_labs, b_labs = b_labs, a_labs
        a_value, b_value = b_value, a_value
    if a_labs is not None and b_labs is None and len(a_labs) >= 2:
        dims.reduce_over(a_labs, [-1])
        if ndim_of(b_value) and ndim_of(b_value) >= 2:
            return dims.broadcast(ndim - 1, [a_labs[:-1]]) + (None,)
        return None
    if b_labs is not None and a_labs is None and len(b_labs) >= 2:
        dims.reduce_over(b_labs, [-2])
        return dims.broadcast(ndim - 2, [b_labs[:-2]]) + (None, b_labs[-1])
    if a_labs is not None and b_labs is not None and len(a_labs) >= 2 and len(b_labs) >= 2:
        dims.attention = True
        dims.reduce_over(a_labs, [-1])
        dims.reduce_over(b_labs, [-2])
        return dims.broadcast(ndim - 2, [a_labs[:-2], b_labs[:-2]]) + (a_labs[-2], b_labs[-1])
    return None


def _layer_norm(call: _Call, dims: _DimTracker):
    """Normalises over the trailing ``normalized_shape`` dims."""
    labs = call.one_operand()
    if labs is None:
        return None
    shape = call_arg(call.node, 1, "normalized_shape")
    k = len(shape) if isinstance(shape, (tuple, list)) else 1
    return dims.reduce_over(labs, list(range(-k, 0)))


def _group_norm(call: _Call, dims: _DimTracker):
    """Normalises over every dim after the batch (group norm) or after batch and channel (instance norm)."""
    labs = call.one_operand()
    if labs is None:
        return None
    keep = 1 if call.name == "group_norm" else 2
    return dims.reduce_over(labs, list(range(keep, len(labs))))


def _along_dim(call: _Call, dims: _DimTracker):
    """``softmax``, ``cumsum``, ``normalize``: mix one dim (``dim``), keep the others."""
    labs = call.one_operand()
    if labs is None:
        return None
    if call.name == "normalize":
        d = call_arg(call.node, 2, "dim", 1)
    else:
        d = call_arg(call.node, 1, "dim", None)
    return dims.reduce_over(labs, [d]) if isinstance(d, int) else None


def _reduction(call: _Call, dims: _DimTracker):
    """``sum``, ``mean``, ...: the reduced dims (kept with size 1 or dropped) mixed; the whole-tensor form keeps none."""
    labs = call.one_operand()
    if labs is None or call.ndim is None:
        return None
    d = call_arg(call.node, 1, "dim")
    if isinstance(d, int):
        d = [d]
    if not (isinstance(d, (tuple, list)) and all(isinstance(x, int) for x in d)):
        return None
    reduced = {_dim(x, len(labs)) for x in d}
    kept = dims.reduce_over(labs, list(reduced))
    return kept if call.ndim == len(labs) else tuple(label for i, label in enumerate(kept) if i not in reduced)


def _transpose(call: _Call, dims: _DimTracker):
    """Swaps two dims' labels."""
    labs, node = call.first, call.node
    if labs is None or len(node.args) < 3:
        return None
    d0, d1 = _dim(node.args[1], len(labs)), _dim(node.args[2], len(labs))
    out = list(labs)
    out[d0], out[d1] = out[d1], out[d0]
    return tuple(out)


def _permute(call: _Call, dims: _DimTracker):
    """Reorders the labels."""
    labs, node = call.first, call.node
    if labs is None:
        return None
    order = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
    return tuple(labs[_dim(d, len(labs))] for d in order) if len(order) == len(labs) else None


def _matrix_transpose(call: _Call, dims: _DimTracker):
    """``x.t()`` of a matrix."""
    labs = call.first
    return (labs[1], labs[0]) if labs is not None and len(labs) == 2 else None


def _reshape(call: _Call, dims: _DimTracker):
    """``view``, ``flatten``, ``unsqueeze``, ...: labels follow the dims the reshape keeps whole."""
    if call.first is None or call.ndim is None:
        return None
    shape_in = example(call.node.args[0]).shape
    return dims.reshape(call.first, list(shape_in), list(call.value.shape))


def _split(call: _Call, dims: _DimTracker):
    """``chunk``, ``split``, ``unbind``: the split dim is mixed (``unbind`` drops it), the others kept in every part."""
    labs = call.first
    if labs is None or not isinstance(call.value, (tuple, list)):
        return None
    d = call_arg(call.node, 2 if call.name != "unbind" else 1, "dim", 0)
    kept = dims.reduce_over(labs, [d])
    if call.name == "unbind":
        kept = tuple(label for i, label in enumerate(kept) if i != _dim(d, len(labs)))
    return [kept for _ in call.value]


def _concatenate(call: _Call, dims: _DimTracker):
    """``cat``, ``stack``: the parts' other dims broadcast together, the joined dim mixed."""
    node, ndim = call.node, call.ndim
    if ndim is None:
        return None
    parts = [dims.of(x) for x in node.args[0]] if isinstance(node.args[0], (tuple, list)) else []
    d = _dim(call_arg(node, 1, "dim", 0), ndim)
    dependent = [x for x in parts if x is not None]
    if not (dependent and all(len(x) == len(dependent[0]) for x in dependent) and len(dependent) == len(parts)):
        return None
    if call.name == "stack":
        dependent = [x[:d] + (None,) + x[d:] for x in dependent]
    return dims.reduce_over(dims.broadcast(ndim, dependent), [d])


def _convolution(call: _Call, dims: _DimTracker):
    """``(N, C, *spatial)``: the batch dim kept, channels and space mixed."""
    labs = call.one_operand()
    if labs is None or call.ndim is None or call.ndim < 3:
        return None
    return (labs[0],) + (None,) * (call.ndim - 1)


def _pool(call: _Call, dims: _DimTracker):
    """``(N, C, *spatial)`` pooling or resampling: batch and channel kept, space mixed."""
    labs = call.one_operand()
    if labs is None or call.ndim is None or call.ndim < 3:
        return None
    return (labs[0], labs[1]) + (None,) * (call.ndim - 2)


def _multi_head_attention(call: _Call, dims: _DimTracker):
    """``(seq, batch, embed)`` query, key and value: the batch dim kept in the output, weights ``(batch, .., ..)``."""
    if not isinstance(call.value, (tuple, list)):
        return None
    qkv = [dims.of(x) for x in call.node.args[:3]]
    dependent = [x for x in qkv if x is not None]
    if not (len(dependent) == 3 and all(len(x) == 3 for x in dependent)):
        return None
    batch = dims.broadcast(1, [x[1:2] for x in dependent])[0]
    return [(None, batch, None), (batch, None, None)]


def _scaled_dot_product_attention(call: _Call, dims: _DimTracker):
    """``(..., seq, head_dim)`` operands: the leading dims kept, sequence and features mixed."""
    if call.ndim is None:
        return None
    qkv = [dims.of(x) for x in call.node.args[:3] if dims.of(x) is not None]
    if not (qkv and all(len(x) == call.ndim for x in qkv)):
        return None
    return dims.broadcast(call.ndim - 2, [x[:-2] for x in qkv]) + (None, None)


def _transformer_encoder_layer(call: _Call, dims: _DimTracker):
    """PyTorch's fused encoder layer on ``(batch, seq, embed)``: the batch dim kept."""
    labs = call.first
    return (labs[0], None, None) if labs is not None and len(labs) == 3 else None


def _rnn_cell(call: _Call, dims: _DimTracker):
    """A fused RNN cell: ``(batch, features)`` operands -> ``(batch, hidden)`` results; the batch dim kept."""
    if not all(len(labs) == 2 for labs in call.operands):
        return None
    batch = dims.broadcast(1, [labs[:1] for labs in call.operands]) + (None,)
    return [batch for _ in call.value] if isinstance(call.value, (tuple, list)) else batch


def _rule_table(*families: tuple[set[str], Any]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for names, rule in families:
        for name in names:
            assert name not in table, f"{name} has two rules"
            table[name] = rule
    return table


# op name -> its rule; an op not here keeps no state dim.
RULES = _rule_table(
    (POINTWISE, _pointwise),
    ({"batch_norm"}, _batch_norm),
    ({"linear"}, _linear),
    (MATMUL_OPS, _matmul),
    ({"layer_norm", "rms_norm"}, _layer_norm),
    ({"group_norm", "instance_norm"}, _group_norm),
    ({"softmax", "log_softmax", "normalize", "cumsum"}, _along_dim),
    (_REDUCTIONS, _reduction),
    ({"transpose", "swapaxes", "swapdims"}, _transpose),
    ({"permute"}, _permute),
    ({"t"}, _matrix_transpose),
    (_RESHAPES, _reshape),
    ({"chunk", "split", "unbind", "tensor_split"}, _split),
    ({"cat", "concat", "stack"}, _concatenate),
    (CONV_OPS, _convolution),
    (_POOLS, _pool),
    ({"multi_head_attention_forward"}, _multi_head_attention),
    ({"scaled_dot_product_attention"}, _scaled_dot_product_attention),
    ({"_transformer_encoder_layer_fwd"}, _transformer_encoder_layer),
    (_CELLS, _rnn_cell),
)


def step_facts(step: fx.GraphModule, leaf_shapes: list[tuple[int, ...]]) -> StepFacts:
    """Batch dims the step keeps independent, and what kind of block it is.

    ``leaf_shapes``: the shape of the state, or of each tensor of a tuple state.
    Tracks, for each state-dependent value, which of its dims carry which state
    dim ("labels", :class:`_DimTracker`). A label survives an op only if the op
    treats that dim elementwise (pointwise ops, contractions over other dims,
    normalisations over other dims, dim-preserving reshapes: the op's rule in
    :data:`RULES`); unknown ops drop all labels.
    The leading dims the state tensors' shapes share (``shared_ndim``) carry
    one label per dim across all of them (dim ``d`` of every tensor indexes
    the same batch element); other dims carry labels of their own. A tensor's
    batch dims are the largest ``k < ndim`` with its labels of dims
    ``0..k-1`` intact at dims ``0..k-1`` of its next value.
    """
    dims = _DimTracker(leaf_shapes)
    kept = dims.batch_ndims(dims.run(step))
    return StepFacts(
        batch_ndim=min(kept), leaf_batch_ndims=tuple(kept), shared_ndim=dims.shared_ndim,
        attention=dims.attention, residual=dims.residual, convolution=dims.convolution,
    )


def _common_prefix(shapes: list[tuple[int, ...]]) -> int:
    """How many leading dims all ``shapes`` have in common (all of them for one shape)."""
    k = 0
    while all(len(shape) > k and shape[k] == shapes[0][k] for shape in shapes):
        k += 1
    return k
