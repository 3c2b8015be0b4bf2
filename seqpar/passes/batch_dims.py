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

_POINTWISE = {
    "add", "sub", "mul", "truediv", "div", "true_divide", "rsub", "neg", "pos", "pow", "floordiv", "mod",
    "abs", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "sin", "cos", "tan",
    "tanh", "sinh", "cosh", "asin", "acos", "atan", "sigmoid", "relu", "gelu", "silu", "mish", "elu", "selu",
    "celu", "leaky_relu", "softplus", "hardtanh", "relu6", "hardswish", "hardsigmoid", "logsigmoid",
    "tanhshrink", "softsign", "softshrink", "hardshrink", "erf", "erfc", "square", "clamp", "clamp_min",
    "clamp_max", "clip", "where", "maximum", "minimum", "lerp", "addcmul", "addcdiv", "reciprocal", "sign",
    "float", "double", "half", "bfloat16", "to", "type", "type_as", "contiguous", "clone", "detach",
    "dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d", "nan_to_num",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
    "__neg__", "__pow__", "__rpow__", "glu_", "logit", "xlogy", "copysign", "atan2", "hypot", "fmod",
    "remainder", "sgn", "trunc", "floor", "ceil", "round", "frac", "expand", "expand_as", "masked_fill",
    "threshold",
}
MATMUL_OPS = {"matmul", "mm", "bmm", "__matmul__", "__rmatmul__"}
_REDUCTIONS = {"sum", "mean", "amax", "amin", "var", "std", "logsumexp", "norm", "prod", "nansum", "nanmean"}
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze", "view_as", "reshape_as"}
ATTENTION_OPS = {"scaled_dot_product_attention", "multi_head_attention_forward", "_transformer_encoder_layer_fwd",
              "_native_multi_head_attention"}
_CONVS = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "convolution"}
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


def step_facts(step: fx.GraphModule, leaf_shapes: list[tuple[int, ...]]) -> StepFacts:
    """Batch dims the step keeps independent, and what kind of block it is.

    ``leaf_shapes``: the shape of the state, or of each tensor of a tuple state.
    Tracks, for each state-dependent value, which of its dims carry which state
    dim ("labels"). A label survives an op only if the op treats that dim
    elementwise (pointwise ops, contractions over other dims, normalisations
    over other dims, dim-preserving reshapes); unknown ops drop all labels.
    The leading dims the state tensors' shapes share (``shared_ndim``) carry
    one label per dim across all of them (dim ``d`` of every tensor indexes
    the same batch element); other dims carry labels of their own. A tensor's
    batch dims are the largest ``k < ndim`` with its labels of dims
    ``0..k-1`` intact at dims ``0..k-1`` of its next value.
    """
    destroyed: set = set()
    labels: dict[Node, Any] = {}
    attention = residual = convolution = False
    state = None
    state_nodes: set[Node] = set()  # the state placeholder and the state tensors taken from it
    shared_ndim = _common_prefix(leaf_shapes)
    leaf_labels = [tuple(d if d < shared_ndim else (i, d) for d in range(len(shape)))
                   for i, shape in enumerate(leaf_shapes)]

    def lab(x):
        return labels.get(x) if x.__class__ is Node else None

    def present(value, acc):
        if isinstance(value, list):
            for v in value:
                present(v, acc)
        elif isinstance(value, tuple):
            acc.update(l for l in value if l is not None)
        return acc

    def align(ndim, operands):
        out = [None] * ndim
        owner = [False] * ndim
        for labs in operands:
            off = ndim - len(labs)
            for i, l in enumerate(labs):
                at = off + i
                if at < 0:
                    if l is not None:
                        destroyed.add(l)
                    continue
                if not owner[at]:
                    out[at], owner[at] = l, True
                elif out[at] != l:
                    for x in (out[at], l):
                        if x is not None:
                            destroyed.add(x)
                    out[at] = None
        return tuple(out)

    def without(labs, dims):
        dims = {_dim(d, len(labs)) for d in dims}
        for d in dims:
            if isinstance(d, int) and 0 <= d < len(labs) and labs[d] is not None:
                destroyed.add(labs[d])
        return tuple(None if i in dims else l for i, l in enumerate(labs))

    def reshape(labs, shape_in, shape_out):
        out = [None] * len(shape_out)
        prefix_in = [1]
        for s in shape_in:
            prefix_in.append(prefix_in[-1] * s)
        prefix_out = [1]
        for s in shape_out:
            prefix_out.append(prefix_out[-1] * s)
        for i, l in enumerate(labs):
            if l is None:
                continue
            hit = [j for j in range(len(shape_out))
                   if prefix_out[j] == prefix_in[i] and shape_out[j] == shape_in[i]]
            if len(hit) == 1:
                out[hit[0]] = l
            else:
                destroyed.add(l)
        return tuple(out)

    for n in step.graph.nodes:
        if n.op == "placeholder":
            if state is None:
                state = n
                state_nodes.add(n)
                labels[n] = leaf_labels[0] if len(leaf_labels) == 1 else list(leaf_labels)
            continue
        if n.op == "output":
            out_arg = n.args[0]
            result = [lab(x) for x in out_arg] if isinstance(out_arg, (tuple, list)) else [lab(out_arg)]
            break
        flat = flatten_args((n.args, n.kwargs), [])
        dep_args = [a for a in flat if a.__class__ is Node and labels.get(a) is not None]
        if not dep_args:
            continue
        name = target_name(n)
        value = example(n)
        ndim = ndim_of(value)
        first = lab(n.args[0]) if n.args else None
        if n.target is operator.getitem and isinstance(first, list):
            # selecting an item mixes nothing; the other items are checked where they are read
            item = n.args[1]
            picked = first[item] if isinstance(item, int) and item < len(first) else None
            if picked is None:
                picked = (None,) * ndim if ndim is not None else [None]
            labels[n] = picked
            if n.args[0] is state:
                state_nodes.add(n)
            continue
        inputs_present = set()
        for a in dep_args:
            present(labels[a], inputs_present)
        out: Any = None
        if name in ATTENTION_OPS:
            attention = True
        if name in _CONVS:
            convolution = True
        if name in ("add", "__add__", "__radd__", "sub", "__sub__") and len(dep_args) == 2 \
                and any(a in state_nodes for a in dep_args):
            residual = True
        tensors_ok = all(isinstance(labels[a], tuple) for a in dep_args)
        if not tensors_ok:
            out = None
        elif name in _POINTWISE and ndim is not None:
            out = align(ndim, [labels[a] for a in dep_args])
        elif name == "batch_norm" and ndim is not None and len(dep_args) == 1 and first is not None:
            out = first if call_arg(n, 5, "training", False) is not True else None
        elif name == "linear" and first is not None and len(dep_args) == 1:
            out = first[:-1] + (None,)
            without(first, [-1])
        elif name in MATMUL_OPS and ndim is not None and len(n.args) >= 2:
            a_l, b_l = lab(n.args[0]), lab(n.args[1])
            if name == "__rmatmul__":
                a_l, b_l = b_l, a_l
            a_v, b_v = (example(x) if x.__class__ is Node else None for x in n.args[:2])
            if name == "__rmatmul__":
                a_v, b_v = b_v, a_v
            if a_l is not None and b_l is None and len(a_l) >= 2:
                without(a_l, [-1])
                out = align(ndim - 1, [a_l[:-1]]) + (None,) if ndim_of(b_v) and ndim_of(b_v) >= 2 else None
            elif b_l is not None and a_l is None and len(b_l) >= 2:
                without(b_l, [-2])
                out = align(ndim - 2, [b_l[:-2]]) + (None, b_l[-1])
            elif a_l is not None and b_l is not None and len(a_l) >= 2 and len(b_l) >= 2:
                attention = True
                without(a_l, [-1])
                without(b_l, [-2])
                out = align(ndim - 2, [a_l[:-2], b_l[:-2]]) + (a_l[-2], b_l[-1])
        elif name in ("layer_norm", "rms_norm") and first is not None and len(dep_args) == 1:
            shape = call_arg(n, 1, "normalized_shape")
            k = len(shape) if isinstance(shape, (tuple, list)) else 1
            out = without(first, list(range(-k, 0)))
        elif name in ("group_norm", "instance_norm") and first is not None and len(dep_args) == 1:
            keep = 1 if name == "group_norm" else 2
            out = without(first, list(range(keep, len(first))))
        elif name in ("softmax", "log_softmax", "normalize", "cumsum") and first is not None and len(dep_args) == 1:
            d = call_arg(n, 1 if name != "normalize" else 2, "dim", None if name != "normalize" else 1)
            out = without(first, [d]) if isinstance(d, int) else None
        elif name in _REDUCTIONS and first is not None and len(dep_args) == 1 and ndim is not None:
            d = call_arg(n, 1, "dim")
            if isinstance(d, int):
                d = [d]
            if isinstance(d, (tuple, list)) and all(isinstance(x, int) for x in d):
                dims = {_dim(x, len(first)) for x in d}
                kept = without(first, list(dims))
                out = kept if ndim == len(first) else tuple(l for i, l in enumerate(kept) if i not in dims)
        elif name in ("transpose", "swapaxes", "swapdims") and first is not None and len(n.args) >= 3:
            d0, d1 = _dim(n.args[1], len(first)), _dim(n.args[2], len(first))
            lst = list(first)
            lst[d0], lst[d1] = lst[d1], lst[d0]
            out = tuple(lst)
        elif name == "permute" and first is not None:
            dims = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (tuple, list)) else n.args[1:]
            if len(dims) == len(first):
                out = tuple(first[_dim(d, len(first))] for d in dims)
        elif name == "t" and first is not None and len(first) == 2:
            out = (first[1], first[0])
        elif name in _RESHAPES and first is not None and ndim is not None:
            shape_in = example(n.args[0]).shape
            out = reshape(first, list(shape_in), list(value.shape))
        elif name in ("chunk", "split", "unbind", "tensor_split") and first is not None \
                and isinstance(value, (tuple, list)):
            d = call_arg(n, 2 if name != "unbind" else 1, "dim", 0)
            kept = without(first, [d])
            if name == "unbind":
                kept = tuple(l for i, l in enumerate(kept) if i != _dim(d, len(first)))
            out = [kept for _ in value]
        elif name in ("cat", "concat", "stack") and ndim is not None:
            parts = [lab(x) for x in n.args[0]] if isinstance(n.args[0], (tuple, list)) else []
            d = _dim(call_arg(n, 1, "dim", 0), ndim)
            dep_parts = [x for x in parts if x is not None]
            if dep_parts and all(len(x) == len(dep_parts[0]) for x in dep_parts) and len(dep_parts) == len(parts):
                if name == "stack":
                    dep_parts = [x[:d] + (None,) + x[d:] for x in dep_parts]
                out = without(align(ndim, dep_parts), [d])
        elif name in _CONVS and first is not None and len(dep_args) == 1 and ndim is not None and ndim >= 3:
            out = (first[0],) + (None,) * (ndim - 1)
        elif name in _POOLS and first is not None and len(dep_args) == 1 and ndim is not None and ndim >= 3:
            out = (first[0], first[1]) + (None,) * (ndim - 2)
        elif name == "multi_head_attention_forward" and isinstance(value, (tuple, list)):
            q, k, v = (lab(x) for x in n.args[:3])
            dep_qkv = [x for x in (q, k, v) if x is not None]
            if len(dep_qkv) == 3 and all(len(x) == 3 for x in dep_qkv):
                batch = align(1, [x[1:2] for x in dep_qkv])[0]
                out = [(None, batch, None), (batch, None, None)]
        elif name == "scaled_dot_product_attention" and ndim is not None:
            dep_qkv = [lab(x) for x in n.args[:3] if lab(x) is not None]
            if dep_qkv and all(len(x) == ndim for x in dep_qkv):
                out = align(ndim - 2, [x[:-2] for x in dep_qkv]) + (None, None)
        elif name == "_transformer_encoder_layer_fwd" and first is not None and len(first) == 3:
            out = (first[0], None, None)
        elif name in _CELLS and all(len(labels[a]) == 2 for a in dep_args):
            # (batch, features) operands -> (batch, hidden) results: features mixed, the batch dim kept
            batch = align(1, [labels[a][:1] for a in dep_args]) + (None,)
            out = [batch for _ in value] if isinstance(value, (tuple, list)) else batch
        if out is None:
            out = [None] * len(value) if isinstance(value, (tuple, list)) else None
        # labels that vanish or repeat have been mixed
        out_present = present(out, set())
        destroyed.update(inputs_present - out_present)
        if isinstance(out, tuple):
            seen = Counter(l for l in out if l is not None)
            destroyed.update(l for l, c in seen.items() if c > 1)
        labels[n] = out if out is not None else (None,) * (ndim or 0)
        if out is None and ndim is None:
            labels[n] = [None]
    else:
        result = []
    leaf_batch = []
    for index, labs in enumerate(leaf_labels):
        after = result[index] if index < len(result) and isinstance(result[index], tuple) else ()
        k = 0
        while k < min(len(labs) - 1, len(after)) and after[k] == labs[k] and labs[k] not in destroyed:
            k += 1
        leaf_batch.append(k)
    return StepFacts(
        batch_ndim=min(leaf_batch), leaf_batch_ndims=tuple(leaf_batch), shared_ndim=shared_ndim,
        attention=attention, residual=residual, convolution=convolution,
    )


def _common_prefix(shapes: list[tuple[int, ...]]) -> int:
    """How many leading dims all ``shapes`` have in common (all of them for one shape)."""
    k = 0
    while all(len(shape) > k and shape[k] == shapes[0][k] for shape in shapes):
        k += 1
    return k
