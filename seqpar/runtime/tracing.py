"""Tracing and compiling at run time, one at a time in the process.

torch.fx's tracer (what ``make_fx`` runs) patches ``torch.nn.Module.__call__``
and ``__getattr__`` for the whole process while it traces and puts the
originals back after. A trace in one thread while another thread traces, or
while Dynamo compiles there, is not safe: two traces can put back each other's
patches (the process keeps a tracer's wrapper), and Dynamo builds guards on the
patched method (seen: ``InternalTorchDynamoError: 'NoneType' object is not
subscriptable`` while two threads called one compiled model, one of them
compiling, the other tracing a chain's rolled loop at its first call).
Inductor's compiler patches its global config the same way.

seqpar traces at run time (the rolled and fused loops, a solve's windows and
blocks, ``solve_chain``'s programs), so every such trace and compile holds
Dynamo's own compile lock: one of them, or one Dynamo compile, at a time. The
lock is re-entrant: the traces the backend makes while Dynamo compiles (which
holds it) go straight on. A trace happens once per program and input layout,
so calls in other threads, which run compiled code without the lock, do not
wait for each other.
"""

from __future__ import annotations

from typing import Callable

from torch._dynamo.convert_frame import compile_lock as one_at_a_time
from torch.fx.experimental.proxy_tensor import make_fx as _make_fx

__all__ = ["make_fx", "one_at_a_time"]


def make_fx(fn: Callable, **options) -> Callable:
    """``torch.fx.experimental.proxy_tensor.make_fx(fn, **options)``, whose trace holds :data:`one_at_a_time`."""
    trace = _make_fx(fn, **options)

    def traced(*args):
        with one_at_a_time:
            return trace(*args)

    return traced
