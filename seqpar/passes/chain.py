"""What detection finds in an FX graph: plain records, no numerics.

A :class:`Chain` is a maximal run of ``L`` isomorphic segments of a graph where
segment ``l`` computes ``s_l = f(s_{l-1}, x_l, *shared)``: it reads the graph
only through the carried state ``s_{l-1}``, its per-step inputs ``x_l`` (the
parameters of layer ``l``, per-step literals, hoisted state-independent
values) and inputs shared by every segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

CHAIN_KINDS = ("layers", "residual", "denoise", "recurrent", "transformer")
INPUT_KINDS = ("parameter", "computed", "constant")


@dataclass
class ChainInput:
    """One per-step input of the step function, seen across the ``L`` steps.

    ``kind``:
      * ``"parameter"``: ``nodes[l]`` are graph placeholders (Dynamo lifts
        parameters and buffers to placeholders); stacked once and cached.
      * ``"computed"``: ``nodes[l]`` are graph values that do not depend on the
        state (hoisted out of the step); stacked on every call.
      * ``"constant"``: ``values[l]`` are Python numbers or tensors that differ
        between steps (timesteps, coefficients) and are literals in the graph.
    """

    kind: str
    nodes: list[fx.Node] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)


@dataclass
class Chain:
    """A chain found in a graph, ready for the rewrite.

    ``step`` is an ``fx.GraphModule`` built from segment 0 whose placeholders
    are, in order, the state, one per entry of ``per_step`` (the slice of step
    ``l``; a ``"constant"`` input arrives as a 0-d or stacked-slice tensor), and
    one per entry of ``shared``; it returns the next state. ``nodes[l]`` are
    the graph nodes of segment ``l`` (the rewrite erases them); ``outputs[l]``
    is ``s_{l+1}``; ``used_outside`` lists the indexes ``l < L-1`` of states
    read by nodes after the chain. ``batch_ndim`` is the number of leading
    state dims the step treats independently (per-element Jacobian blocks).
    """

    kind: str
    start: fx.Node
    outputs: list[fx.Node]
    nodes: list[list[fx.Node]]
    step: fx.GraphModule
    per_step: list[ChainInput]
    shared: list[fx.Node]
    modules: list[str]
    state_shape: tuple[int, ...]
    state_dtype: torch.dtype
    batch_ndim: int
    used_outside: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.outputs)


@dataclass
class Candidate:
    """A repeated structure detection saw but did not turn into a :class:`Chain`.

    Reported by ``seqpar.explain`` and the debug dump with its ``reason``.
    """

    kind: str
    length: int
    modules: list[str]
    state_shape: tuple[int, ...] | None
    reason: str
