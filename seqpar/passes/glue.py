"""What counts as glue: graph nodes that compute nothing worth an inner compiler.

A rewritten graph that holds nothing but chain ops and glue (views, shape
queries, packing and unpacking of states, parameter stacks, zero initial
states) runs as it is, without the inner backend: compiling it would cost
seconds and save nothing.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..runtime import ops  # noqa: F401  (registers torch.ops.seqpar)
from ..runtime.slicing import slice_steps
from .tokens import VIEW_ATTRIBUTES, VIEW_OPS

GLUE_METHODS = VIEW_OPS | {"contiguous", "size", "narrow", "split", "chunk", "unbind"}
GLUE_ATTRIBUTES = VIEW_ATTRIBUTES | {"shape", "dtype", "device"}
GLUE_FUNCTIONS = {
    torch.ops.seqpar.chain_solve.default, torch.ops.seqpar.chain_outputs.default, torch.ops.aten.select.int,
    operator.getitem, torch.stack, torch.cat, torch.movedim,
    slice_steps, torch.split, torch.unbind, torch.transpose, torch.t, torch.zeros, torch.zeros_like, torch.ones,
    torch.ones_like,
}


def has_other_compute(gm: fx.GraphModule, ignore: frozenset | set = frozenset()) -> bool:
    """Whether ``gm`` computes anything besides the nodes in ``ignore``, chain ops and glue."""
    for node in gm.graph.nodes:
        if node in ignore or (node.op == "call_method" and node.target in GLUE_METHODS):
            continue
        if node.op == "call_function" and node.target in GLUE_FUNCTIONS:
            continue
        if node.op == "call_function" and node.target is getattr and node.args[1] in GLUE_ATTRIBUTES:
            continue
        if node.op in ("call_function", "call_method", "call_module"):
            return True
    return False
