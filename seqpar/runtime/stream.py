"""A kept-sequential chain of an inference graph run in blocks: only the last state and the per-step outputs kept.

Where a graph records no autograd and reads a sequential chain's states only
as its final state and its per-step outputs ``y_l = g(s_{l-1}, x_l, *shared)``
(the recurrences of Mamba, xLSTM and RWKV in inference), holding all ``L``
states ``(L, N, w)`` costs what eager's loop never pays: xLSTM's matrix memory
of 65536 values a step is 1 GiB at 4096 steps, written to fresh pages and read
back, where eager keeps one state in cache. Here the loop runs in blocks of
``K`` steps (:func:`block_length`: a block's states within
:data:`BLOCK_BYTES`), and after each block its outputs are evaluated in one
batched call at the block's states:

    s = s_0
    for a = 0, K, 2K, ..:                     b = min(a + K, L)
        S = (s_{a+1}, .., s_b)               the chain's sequential loop from s = s_a
        Y^j[a:b] = g^j(S', x_{a+1..b})       one batched call; S' = (s_a, .., s_{b-1}),
        s = s_b                                or S where g reads the step's result
    return s_L, Y^1, .., Y^J

The states are those of the loop ``seqpar::chain_solve`` runs, bit for bit (a
loop's step does not depend on where its block starts); the outputs are those
of the batched ``g`` of ``seqpar::chain_outputs``, evaluated per block (a
batched kernel may round differently for another batch size, as it may for
another ``L``). A chain that fits in one block runs exactly as with the two
ops, the fused loop's outputs included (:func:`~.fused_loop.served_outputs`).
"""

from __future__ import annotations

from typing import Callable

import torch

from . import fused_loop
from .program import windowed_outputs
from .sequential import run_loop

# The most bytes of states a block holds: its states stay in this CPU's shared L3 cache (32 MiB here) while the
# block's outputs read them back.
BLOCK_BYTES = 8 << 20


def block_length(program) -> int:
    """``K``: the steps of a block, as many as :data:`BLOCK_BYTES` of states hold (at least one, at most ``L``)."""
    layout = program.layout
    step_bytes = layout.batch_size * layout.width * layout.dtype.itemsize
    return max(1, min(program.length, BLOCK_BYTES // step_bytes))


def block_windows(program) -> list[int]:
    """The block lengths shorter than ``L`` a run of ``program`` uses (``K`` and a shorter last block where ``K``
    does not divide ``L``), whose per-step outputs need traces of their own; none where it has no per-step outputs
    (a chain in one block uses :attr:`~.program.ChainProgram.outputs_at`)."""
    if program.outputs is None:
        return []
    block = block_length(program)
    return sorted({block, program.length % block} - {0, program.length})


def trace_blocks(program, xs_leaves, shared) -> None:
    """Trace, up front, the batched per-step outputs of each block length (:func:`block_windows`): a trace made
    inside the op's kernel, below autograd, fails under ``vmap``. ``xs_leaves``: per-step inputs with the
    program's leaves' dtypes, devices and shapes after the first dimension; ``shared``: alike."""
    for window in block_windows(program):
        windowed_outputs(program, window, xs_leaves, shared)


def run_in_blocks(program, s0: torch.Tensor, columns, stacked_inputs: Callable[[], list], shared, compiled: bool):
    """``(s_L, [Y^1, .., Y^J], how)`` of ``program`` from ``s0`` ``(N, w)``, the loop run in blocks of
    :func:`block_length` steps (``how``: the loop the last block ran, as :func:`~.sequential.run_loop` says).

    ``columns``: the per-step inputs as columns (the loop reads them where they are); ``stacked_inputs()``: the
    same stacked ``(L, ...)``, made where a block's outputs read its rows; ``compiled``: whether the compiled
    loops may run."""
    length, block = program.length, block_length(program)
    in_blocks = block < length  # else one block: the outputs are those of chain_outputs, as they come
    outputs = [s0.new_empty(shape, dtype=dtype) for shape, dtype in program.output_shapes] if in_blocks else []
    state, how, leaves = s0, "", None
    for start in range(0, length, block):
        stop = min(start + block, length)
        states, how = run_loop(program, state, columns, shared, start, False, compiled, stop)
        served = fused_loop.served_outputs(program, states) if program.outputs is not None else None
        if served is not None:  # the fused loop wrote them along with the whole chain's states
            outputs = served
        elif program.outputs is not None:
            leaves = stacked_inputs() if leaves is None else leaves
            prev = program.output_states(state, states)
            if not in_blocks:
                outputs = list(program.outputs_at(prev, leaves, shared))
            else:
                rows = [leaf[start:stop] for leaf in leaves]
                part = windowed_outputs(program, stop - start, rows, shared)(prev, rows, shared)
                for whole, block_rows in zip(outputs, part):
                    whole[start:stop] = block_rows
        state = states[-1]
    return state, outputs, how
