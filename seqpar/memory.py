"""Host memory a call may still take, and a guard that stops the speed trial's original call before it runs out.

On a GPU an allocation that does not fit raises ``torch.OutOfMemoryError``,
which the backend catches (:mod:`seqpar.backend`). On a CPU nothing is raised:
the kernel's OOM killer ends the process. Under policy ``"auto"`` the speed
trial (:mod:`seqpar.speed`) runs the original graph beside a process that
already holds what the rewritten graph left (compiled code, the allocator's
cached pages), so a training step whose eager form fits with little to spare
can be killed only because seqpar was asked (xLSTM at batch 4 and 4096 steps
on a 24 GiB machine: eager alone peaks at 22.4 GiB, the trial's original call
was killed; ``benchmarks/RESULTS.md``).

A differentiated call (one that records autograd) keeps what its backward
needs: the tensors autograd saves. Its memory is bounded by

    B = 2 * sum(bytes of every host tensor the graph computes that is not a view)

(each value held once, and its gradient once). Where ``B`` is at most the
memory available ``A`` (:func:`available_bytes`) less the reserve
``R = max(RESERVE_MIN, A / RESERVE_FRACTION)``, the call runs as it is. Where
not, it runs under :class:`HeadroomGuard`: every ``CHECK_EVERY`` bytes that
autograd saves beyond the call's inputs, and at the forward's end, the memory
available is read again, and below ``R`` (kept for the backward) the call
stops with :class:`OutOfHeadroom`, a ``torch.OutOfMemoryError``: the backend
then keeps the rewritten graph, as for a GPU's (the call computed by it).
The reserve is a stated margin, not a measurement of the backward's needs;
the hooks add a Python call per saved tensor to the timed call (microseconds;
on the original's side of the comparison, only where memory is short).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .passes.tokens import example
from .runtime.budget import cgroup_limits, host_memory

RESERVE_MIN = 512 * 2**20  # bytes left for the backward pass at least
RESERVE_FRACTION = 8  # ... or this share of what was available at the call's start, where larger
CHECK_EVERY = 64 * 2**20  # bytes saved between two readings of the memory available


def available_bytes() -> int | None:
    """Bytes this process may still allocate: ``MemAvailable`` of ``/proc/meminfo``, bounded by its memory
    cgroup's limit less its usage (cgroup v2 ``memory.max``/``memory.current``, v1
    ``memory.limit_in_bytes``/``memory.usage_in_bytes``); ``None`` where unknown (not Linux)."""
    available = host_memory("MemAvailable")
    if available is None:
        return None
    return min([available, *(limit - usage for limit, usage in cgroup_limits())])


def reserve(available: int) -> int:
    """Bytes a guarded call leaves for its backward: ``max(RESERVE_MIN, available / RESERVE_FRACTION)``."""
    return max(RESERVE_MIN, available // RESERVE_FRACTION)


def training_bound(graph: fx.Graph) -> int:
    """``B = 2 * sum`` of the bytes of every host tensor ``graph`` computes that is not a view, from its nodes'
    example values (``example_value``/``val``, as Dynamo records them; inputs, parameters and attributes not
    counted): what a differentiated call may hold in host memory, each value once and its gradient once."""
    total = 0
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        for leaf in pytree.tree_leaves(example(node)):
            if isinstance(leaf, torch.Tensor) and leaf.device.type == "cpu" and not leaf._is_view():
                total += leaf.numel() * leaf.element_size()
    return 2 * total


class OutOfHeadroom(torch.OutOfMemoryError):
    """A guarded call stopped before the memory available fell below its reserve."""


class HeadroomGuard:
    """Within it, autograd's saved tensors are counted (each storage once, the ``inputs``' not) and, every
    ``CHECK_EVERY`` bytes and at the end, the memory available is read: below ``reserve(available)`` it raises
    :class:`OutOfHeadroom`."""

    def __init__(self, available: int, inputs):
        self.available, self.reserve = available, reserve(available)
        self.known = {_storage(value) for value in pytree.tree_leaves(inputs) if isinstance(value, torch.Tensor)}
        self.saved = self.unchecked = 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, value: torch.Tensor) -> tuple[torch.Tensor, int]:
        """What autograd keeps of ``value``: an alias without its autograd history (saving an op's output with
        it would make a reference cycle that only the garbage collector frees), and its version."""
        key = _storage(value)
        if key is not None and key not in self.known:  # a sparse or a device tensor is not counted
            self.known.add(key)
            size = key[1]
            self.saved += size
            self.unchecked += size
            if self.unchecked >= CHECK_EVERY:
                self.unchecked = 0
                self._check()
        return value.detach(), value._version

    def shortage(self, bound: int) -> str:
        """Why a call bounded by ``bound`` bytes runs under this guard."""
        return (f"it may need up to {_gib(bound)} of host memory, with {_gib(self.available)} available and "
                f"{_gib(self.reserve)} of it kept for the backward")

    def _check(self) -> None:
        left = available_bytes()
        if left is not None and left < self.reserve:
            raise OutOfHeadroom(
                f"host memory: {_gib(left)} available after {_gib(self.saved)} saved for the backward, under the "
                f"{_gib(self.reserve)} kept for it")

    def __enter__(self) -> "HeadroomGuard":
        self.hooks.__enter__()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.hooks.__exit__(kind, error, traceback)
        if kind is None:
            self._check()


def _unpack(packed: tuple[torch.Tensor, int]) -> torch.Tensor:
    """The saved tensor, where no in-place op changed it since (autograd skips its own check of the version
    for tensors saved through hooks; the alias shares the tensor's version counter)."""
    value, version = packed
    if value._version != version:
        raise RuntimeError(
            f"one of the variables needed for gradient computation has been modified by an inplace operation: "
            f"[{value.type()} {list(value.shape)}] is at version {value._version}; expected version {version} "
            f"instead")
    return value


def headroom_guard(bound: int, inputs) -> HeadroomGuard | None:
    """For a differentiated call of a graph whose memory is bounded by ``bound`` bytes (:func:`training_bound`)
    on ``inputs``: a :class:`HeadroomGuard` to run it under, or ``None`` where none is needed or possible (an
    input on a device that raises out-of-memory errors itself, ``bound`` within the memory available less the
    reserve, or the memory available unknown)."""
    tensors = [value for value in pytree.tree_leaves(inputs) if isinstance(value, torch.Tensor)]
    available = None if any(value.device.type != "cpu" for value in tensors) else available_bytes()
    if available is None or bound <= available - reserve(available):
        return None
    return HeadroomGuard(available, tensors)


def _storage(value: torch.Tensor) -> tuple[int, int] | None:
    """``(address, bytes)`` of ``value``'s storage in host memory; ``None`` for a tensor without one (sparse,
    nested) or on a device."""
    if value.device.type != "cpu":
        return None
    try:
        storage = value.untyped_storage()
    except (NotImplementedError, RuntimeError):
        return None
    return storage.data_ptr(), storage.nbytes()


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"
