"""A stack of identical blocks run as one ``scan`` over their stacked parameters.

``seqpar.scan_layers(blocks)`` turns ``L`` blocks of one structure (an
``nn.Sequential``, an ``nn.ModuleList`` or a list of modules, each mapping a
tensor to a tensor of the same shape) into one module computing

    s_L = block_{L-1}( ... block_1(block_0(s_0)) ... )

as ``torch.ops.higher_order.scan`` over the blocks' parameters and buffers,
stacked on a new leading dim by ``torch.func.stack_module_state``; step ``l``
is ``torch.func.functional_call(template, state_l, (s,))`` with the ``l``-th
row of every stacked tensor. Dynamo traces the step once instead of ``L``
inlined blocks (a 1024-layer MLP: under a second instead of ~20 s), and the
``seqpar`` backend finds the scan as a chain (:mod:`seqpar.passes.scan`), so
the first call of a deep stack compiles in seconds. Without the backend it
is torch's own scan (eager, or any other backend), with the same numbers as
the blocks run one after another.

The module owns the stacked tensors (``L`` times each block parameter, as
one ``nn.Parameter`` each): build optimizers after converting. Blocks whose
BatchNorm tracks running statistics run in eval mode only (a scan cannot
update buffers; training mode raises ``ValueError``).
``to_sequential()`` gives the blocks back as an ``nn.Sequential``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch._higher_order_ops.scan import scan
from torch.func import functional_call, stack_module_state


def _attribute(name: str) -> str:
    """The stacked tensor's attribute name for a block parameter or buffer ``name`` (``0.weight`` -> ``0_weight``)."""
    return name.replace(".", "_")


class ScannedLayers(nn.Module):
    """``L`` blocks of one structure as one scan over their stacked parameters and buffers (see the module doc).

    ``parameter_names`` / ``buffer_names``: the block's own names (``0.weight``);
    each stacked tensor, ``(L, *shape)``, is the attribute ``name.replace('.', '_')``.
    """

    def __init__(self, blocks):
        super().__init__()
        blocks = validated_blocks(blocks)
        params, buffers = stack_module_state(blocks)
        self.length = len(blocks)
        self.parameter_names = list(params)
        self.buffer_names = list(buffers)
        for name, value in params.items():
            self.register_parameter(_attribute(name), nn.Parameter(value.detach().clone(),
                                                                   requires_grad=value.requires_grad))
        for name, value in buffers.items():
            self.register_buffer(_attribute(name), value.clone())
        # The block's structure without storage; every call swaps the step's rows in. Kept out of
        # the module tree (a tuple) so that its meta tensors are not the module's parameters.
        self._template = (copy.deepcopy(blocks[0]).to("meta"),)
        self._tracks_statistics = any(isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats
                                      for module in self._template[0].modules())
        self.train(blocks[0].training)

    def train(self, mode: bool = True):
        super().train(mode)
        self._template[0].train(mode)
        return self

    def _stacked(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, _attribute(name)) for name in self.parameter_names + self.buffer_names}

    def forward(self, state: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``s_L`` from ``s_0 = state``: ``s_{l+1} = block_l(s_l, *args, **kwargs)`` by one scan over the
        stacked rows; ``args``/``kwargs`` (a mask, a conditioning tensor) are the same for every block."""
        if self.training and self._tracks_statistics:
            raise ValueError("scan_layers: the blocks' BatchNorm in training mode updates its running statistics, "
                             "which a scan cannot do (torch's scan forbids mutating its inputs); call .eval(), or "
                             "keep the blocks unrolled (seqpar then reports them as sequential)")
        template = self._template[0]

        def step(s, rows):
            return functional_call(template, rows, (s, *args), kwargs), ()

        final, _ = scan(step, state, self._stacked())
        return final

    def to_sequential(self) -> nn.Sequential:
        """The ``L`` blocks as an ``nn.Sequential`` holding copies of their rows (their dtype and device)."""
        stacked = self._stacked()
        blocks = []
        for index in range(self.length):
            block = copy.deepcopy(self._template[0])
            block.load_state_dict({name: value[index].detach().clone() for name, value in stacked.items()},
                                  assign=True)
            blocks.append(block)
        return nn.Sequential(*blocks)

    def extra_repr(self) -> str:
        return f"{self.length} x {type(self._template[0]).__name__}"


def scan_layers(blocks) -> ScannedLayers:
    """``blocks`` (``nn.Sequential``, ``nn.ModuleList`` or a list of modules of one structure) as one
    :class:`ScannedLayers`: the same function, run as a ``scan`` over their stacked parameters."""
    return ScannedLayers(blocks)


def validated_blocks(blocks) -> list[nn.Module]:
    """The blocks as a list; ``ValueError`` naming the first block that differs from block 0 in
    type, parameter or buffer names, shapes or dtypes, or in training mode."""
    if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        raise ValueError(f"scan_layers takes an nn.Sequential, an nn.ModuleList or a list of modules, "
                         f"not one {type(blocks).__name__}")
    blocks = list(blocks)
    if not blocks:
        raise ValueError("scan_layers needs at least one block")
    for index, block in enumerate(blocks):
        if not isinstance(block, nn.Module):
            raise ValueError(f"scan_layers: block {index} is a {type(block).__name__}, not an nn.Module")

    def layout(block: nn.Module):
        return (type(block), block.training,
                [(name, tuple(p.shape), p.dtype, p.requires_grad) for name, p in block.named_parameters()],
                [(name, tuple(b.shape), b.dtype) for name, b in block.named_buffers()])

    first = layout(blocks[0])
    for index, block in enumerate(blocks[1:], start=1):
        other = layout(block)
        if other != first:
            what = ("type", "training mode", "parameters (names, shapes, dtypes)", "buffers (names, shapes, dtypes)")
            differs = next(label for label, a, b in zip(what, first, other) if a != b)
            raise ValueError(f"scan_layers: block {index} differs from block 0 in its {differs}; "
                             "every block must have the structure of block 0")
    names = [_attribute(name) for name, _ in blocks[0].named_parameters()] + \
            [_attribute(name) for name, _ in blocks[0].named_buffers()]
    if len(set(names)) != len(names):
        raise ValueError("scan_layers: two of the block's parameter or buffer names collide once '.' becomes '_'")
    return blocks
