"""Traced chain programs, reused while what their trace depends on is unchanged.

A :class:`~seqpar.runtime.program.ChainProgram` bakes into its graphs every
Python value the step reads that is not a tensor argument: a step size in a
closure, a module-level constant, a coefficient an object carries. So a
program may be reused only for a step that would trace the same graph:

* :func:`step_identity` names a plain function by its code, its defaults, the
  contents of its closure cells and the module globals its code names (scalars
  by value, one-element tensors by value, other objects by identity), so that
  a fresh ``lambda`` built on every call (the usual style inside a training
  loop) reuses the program traced for the first, while a closure over another
  step size does not. A bound method is its function's identity and its
  object's; any other callable (a module, a callable object) is named by
  identity. The cache keeps the step (and so its object) alive, so the
  identity cannot be reused by another object.
* What the identity cannot see (an attribute read through ``self``, a global
  read inside a helper the step calls) is caught by the caller's check of the
  first step (:func:`seqpar.runtime.chain.solve_chain` compares the program's
  first step with the step's own), which rebuilds the program on a mismatch.

The cache holds at most :data:`CAPACITY` programs (least recently used go);
the op registry refers to programs weakly, so an evicted program is freed once
no autograd graph or compiled graph holds it. Beside it, as many lowered
steps (``kind="lowered"``: the step traced once, whose structure chooses the
Jacobians before a program is built on it).
"""

from __future__ import annotations

import threading
import types
from collections import OrderedDict

import torch

CAPACITY = 256

_SCALARS = (int, float, complex, bool, str, bytes, type(None), type(Ellipsis))
# Immutable torch values that name themselves by value.
_TORCH_VALUES = (torch.dtype, torch.device, torch.layout, torch.memory_format)
_cache: "OrderedDict[tuple, tuple]" = OrderedDict()  # programs
_TABLES = {"program": _cache, "lowered": OrderedDict()}
# A lookup reads and reorders, a store inserts and evicts: one thread at a time (a key evicted between another
# thread's read and reorder would raise KeyError).
_LOCK = threading.Lock()


def value_identity(value):
    """A hashable stand-in for ``value``: scalars and one-element tensors by value, the rest by identity."""
    if isinstance(value, _SCALARS):
        return (type(value), value)
    if isinstance(value, _TORCH_VALUES):
        return (type(value), str(value))
    if isinstance(value, slice):
        return (slice, value_identity(value.start), value_identity(value.stop), value_identity(value.step))
    if isinstance(value, torch.Tensor) and value.numel() <= 1 and value.device.type != "meta":
        return ("tensor", value.dtype, value.device, tuple(value.shape), value.detach().cpu().tolist())
    if isinstance(value, (tuple, frozenset)) and len(value) <= 16:
        return (type(value), tuple(value_identity(item) for item in value))
    return ("object", id(value))


def step_identity(step) -> tuple:
    """What names ``step``'s trace: see the module docstring."""
    if isinstance(step, types.MethodType):
        return ("method", step_identity(step.__func__), id(step.__self__))
    if not isinstance(step, types.FunctionType):
        return ("object", id(step))
    code = step.__code__
    cells = tuple(value_identity(cell.cell_contents) if _filled(cell) else None for cell in step.__closure__ or ())
    names = set(code.co_names)
    for constant in code.co_consts:  # lambdas and comprehensions inside the step
        if isinstance(constant, types.CodeType):
            names |= set(constant.co_names)
    read = tuple(
        (name, value_identity(step.__globals__[name])) for name in sorted(names) if name in step.__globals__
    )
    defaults = tuple(value_identity(value) for value in step.__defaults__ or ())
    keywords = tuple((name, value_identity(value)) for name, value in (step.__kwdefaults__ or {}).items())
    return ("function", code, cells, read, defaults, keywords)


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell (a name assigned later in the enclosing function)
        return False
    return True


def lookup(key: tuple, kind: str = "program"):
    """The program (or lowered step, ``kind="lowered"``) cached under ``key`` (made most recently used), or ``None``."""
    table = _TABLES[kind]
    with _LOCK:
        entry = table.get(key)
        if entry is None:
            return None
        table.move_to_end(key)
    return entry[0]


def store(key: tuple, program, step, kind: str = "program") -> None:
    """Cache ``program`` (or a lowered step) under ``key``, keeping ``step`` (what the key names by identity)
    alive with it; evict beyond :data:`CAPACITY`."""
    table = _TABLES[kind]
    with _LOCK:
        table[key] = (program, step)
        table.move_to_end(key)
        while len(table) > CAPACITY:
            table.popitem(last=False)


def clear() -> None:
    with _LOCK:
        for table in _TABLES.values():
            table.clear()
