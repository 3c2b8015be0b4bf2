"""How many positions of a chain one batched evaluation of a parallel solve takes.

A parallel solve holds, per position it evaluates at once, one Jacobian block:
``N w`` values for diagonal blocks, ``N w^2`` for dense ones (``N`` batch
elements of ``w`` state values), besides the states themselves (``N w``,
what the sequential loop returns too). Taken over the whole chain that is
``L N w^2`` values, which can exceed the device's memory where the model
itself fits: a GRU of width 64 at batch 1024 over 4096 steps holds 64 GiB of
blocks. Two bounds:

- **memory, every device**: one evaluation's blocks take at most
  ``M / DEVICE_MEMORY_SHARE`` bytes, ``M`` the device's memory
  (:func:`device_memory`). The whole solve's peak is a small multiple of its
  blocks (measured on CPU: the Newton forward 2.1-2.3x, the PCR combine steps
  of the torch path 1.2-2x more on top; the Triton kernels solve in chunks
  with per-chunk aggregates only), so a bounded solve stays under about a
  fifth of the device. Where the whole chain does not fit, the Newton forward
  takes a sliding window of the positions that do (:func:`memory_window`:
  exact like any window, more iterations), and an affine chain's linear solve
  and the parallel adjoint take runs of them (:func:`positions_per_run`,
  each run exact from the last state or adjoint of the one before), as does
  a rank's share of a chain across ranks (:mod:`seqpar.distributed.runs`).
- **speed, CPU**: an affine chain's linear solve and a parallel adjoint take
  runs whose blocks fit ``CPU_RUN_BYTES`` (cache-sized; at least
  ``CPU_RUN_MIN`` positions): chain-sized temporaries cost a page fault per
  4 KiB on every call (:mod:`seqpar.runtime.spec`).

The bound is on the device's total memory, not on what is free when the
program is built: a program is traced for its window once, and its choice
must not depend on what else happened to be allocated at that moment.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from . import spec

_NO_LIMIT = 2**60  # cgroup v1 writes "no limit" as a number near 2**63


@functools.lru_cache(maxsize=None)
def device_memory(device: torch.device) -> int | None:
    """Bytes of memory of ``device``: a GPU's total memory; for the CPU the machine's ``MemTotal`` bounded by
    this process's memory cgroup limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``); ``None`` where
    unknown (a CPU outside Linux, another device type). Read once per device and process: the runs are asked
    for on every call of a chain op (reading ``/proc`` costs about 80 us), and a device's total does not change."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        return None
    total = host_memory("MemTotal")
    if total is None:
        return None
    return min([total, *(limit for limit, _ in cgroup_limits())])


def host_memory(field: str) -> int | None:
    """Bytes of ``field`` of ``/proc/meminfo`` (``"MemTotal"``, ``"MemAvailable"``), ``None`` where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cgroup_limits() -> list[tuple[int, int]]:
    """``(limit, usage)`` in bytes of this process's memory cgroup, for each of cgroup v2 (``memory.max``,
    ``memory.current``) and v1 (``memory.limit_in_bytes``, ``memory.usage_in_bytes``) that sets a limit."""
    found = []
    for limit, usage in (("memory.max", "memory.current"),
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            cap = (Path("/sys/fs/cgroup") / limit).read_text().strip()
            if cap != "max" and int(cap) < _NO_LIMIT:
                found.append((int(cap), int((Path("/sys/fs/cgroup") / usage).read_text())))
        except (OSError, ValueError):
            continue
    return found


def block_bytes(layout, kind: str) -> int:
    """Bytes of one position's Jacobian block of ``kind`` (``"diag"``: ``N w`` values, ``"full"``: ``N w^2``,
    ``"identity"``: none) for the chain's :class:`~seqpar.runtime.program.StateLayout`, in the dtype the linear
    solve holds them in (:func:`~seqpar.runtime.spec.accumulation_dtype`: float32 for half precision)."""
    if kind == "identity":
        return 0
    block = layout.width if kind == "diag" else layout.width**2
    return layout.batch_size * block * spec.accumulation_dtype(layout.dtype).itemsize


def positions_in_memory(layout, kind: str) -> int | None:
    """The most positions whose blocks of ``kind`` fit in :func:`device_memory` / ``DEVICE_MEMORY_SHARE``
    (at least one), or ``None`` where nothing bounds them (no blocks, or the device's memory unknown)."""
    per_position = block_bytes(layout, kind)
    memory = device_memory(layout.device) if per_position else None
    if memory is None:
        return None
    return max(1, memory // spec.DEVICE_MEMORY_SHARE // per_position)


def positions_per_run(layout, length: int, kind: str) -> int:
    """Positions per batched evaluation of a chain taken in runs (an affine chain's linear solve, a parallel
    adjoint): on CPU the most positions whose blocks of ``kind`` fit in ``CPU_RUN_BYTES``, at least
    ``CPU_RUN_MIN``; elsewhere (a GPU) all ``length``; on every device at most :func:`positions_in_memory`."""
    run = length
    if layout.device.type == "cpu":
        run = max(spec.CPU_RUN_MIN, spec.CPU_RUN_BYTES // max(1, block_bytes(layout, kind)))
    in_memory = positions_in_memory(layout, kind)
    return min(length, run, length if in_memory is None else in_memory)


def memory_window(layout, length: int, kind: str, window: int | None) -> int | None:
    """The sliding window a parallel forward with blocks of ``kind`` solves with: ``window`` when one is asked
    for (``None``: the whole chain), bounded by :func:`positions_in_memory`; ``None`` when the whole chain fits."""
    in_memory = positions_in_memory(layout, kind)
    asked = length if window is None else min(window, length)
    if in_memory is None or asked <= in_memory:
        return None if asked >= length else asked
    return in_memory


def memory_window_reason(layout, length: int, kind: str, window: int) -> str:
    """Why :func:`memory_window` chose ``window``, for explain and the log."""
    memory = device_memory(layout.device)
    whole = length * block_bytes(layout, kind)
    return (f"{window} of {length} positions evaluated at once (a sliding window; an affine chain, and a rank's "
            f"share across ranks, in runs): the whole chain's {kind} Jacobian blocks ({whole / 2**30:.3g} GiB) "
            f"exceed 1/{spec.DEVICE_MEMORY_SHARE} of the {layout.device.type} memory ({memory / 2**30:.3g} GiB)")
