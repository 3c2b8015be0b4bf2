"""The sequential loop of a chain as one generated Python function: the kept-sequential ("rolled") form.

A chain kept sequential runs

    s_l = f(s_{l-1}, x_l, *shared),    l = start + 1 .. L,

on packed states ``(N, w)``. Calling the user's step (a ``GraphModule``
behind an adapter) once per step costs a module call, pytree work and
packing per step, which made the rolled form 1.5-2x slower than the eager
loop. Here the packed step is traced once, on one position, to the aten ops
eager dispatches (``make_fx`` before dispatch: ``linear``, ``layer_norm``,
``gru_cell`` stay one call each and run the kernels eager runs, so the
values are the eager loop's, bit for bit), and its nodes are written out as
the body of one Python ``for`` loop (:func:`generate_loop`):

    def rolled_into(s, columns, shared, start, stop, out):
        x0c, x1c = columns                   # per-step inputs: sequences of L tensors
        v5 = t(sh0)                          # nodes that read neither s nor x_l: once
        packed = written = out.unbind(0)     # the states buffer (L - start, N, w)
        for l in range(start, stop):
            x0 = x0c[l]; x1 = x1c[l]
            o = written[l - start]
            v2 = linear(s, x0, x1, out=o)    # the step's calls as traced; its last ones
            v3 = tanh_(v2)                   #   write the state in place, no allocation
            s = packed[l - start]
        return out

Each call is the op's ``torch`` binding (:data:`BINDINGS`) or its C++ entry
(``OpOverload._op``), without a module, hook or pytree layer in between. A
per-step input is a *column*: any sequence of ``L`` tensors (the rows of a
stacked tensor, ``unbind(0)``, or the per-layer parameters as the graph hands
them over), so the layer parameters are read where they live, never copied.
Reshapes to the shape they already have are dropped (the values do not
change); nodes that do not depend on the state or the step's inputs run
once, before the loop, unless the step may mutate anything or draws random
numbers. Where the pre-dispatch graph has a node the generator does not
write out (a higher-order op), the functional aten graph is tried; the loop
is generated on the first call and kept per program (:func:`loop_for`); a
step neither covers runs by calling the step, and the reason is kept
(:attr:`RolledLoop.kind`, :attr:`RolledLoop.reason`).
"""

from __future__ import annotations

import math
import operator
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor
from torch.func import functionalize

from . import dense_step
from .errors import brief
from .dense_step import DenseStep
from .tracing import make_fx

_aten = torch.ops.aten
# Ops returning their input's values in a new shape: dropped where the shape does not change.
_RESHAPES = (_aten.reshape.default, _aten.view.default, _aten._unsafe_view.default, _aten.alias.default)


@dataclass
class RolledLoop:
    """A chain's generated loop (:func:`generate_loop`): ``run(s, columns, shared, start, L)`` returns
    ``[s_{start+1}, ..., s_L]``, ``run_into(..., out)`` writes them into ``out`` (``None`` where the step's
    last ops have no ``out=`` / in-place forms).

    ``kind``: ``"generated"`` (the traced step written out as one loop) or
    ``"step calls"`` (``run`` is ``None``: the step is called per step;
    ``reason`` says why); ``source``: the generated code; ``dense``: the step
    as ``h(s W^T + b)`` where it is one (:mod:`.dense_step`: a compiled loop
    may run it, rounding differently from eager's kernels).
    """

    kind: str
    run: Callable | None = None
    run_into: Callable | None = None
    source: str = ""
    reason: str = ""
    dense: DenseStep | None = None


_LOOPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def loops(program) -> dict:
    """The loops generated so far for ``program``'s traced step (shared by its copies), by ``(dtype, device)``."""
    return _LOOPS.get(program.lowered, {})


def loop_for(program, state: torch.Tensor, columns, shared) -> RolledLoop:
    """The program's loop for inputs like these, generated at their first call.

    One loop per dtype and device of the state (a program is built for one
    set of shapes; the float64 reference of a verification runs it on
    widened inputs).
    """
    signature = (state.dtype, state.device)
    loops = _LOOPS.setdefault(program.lowered, {})
    loop = loops.get(signature)
    if loop is None:
        reasons, retry = [], False
        for eager_ops in (True, False):
            try:
                with torch.no_grad():
                    graph_module = trace_step(program, state, [column[0] for column in columns], shared, eager_ops)
                run, run_into, source, dense = generate_loop(graph_module, len(columns), len(shared))
                loop = RolledLoop("generated", run, run_into, source, dense=dense)
                break
            except UnrecordedTrace as error:  # this call's dispatch context, not the step: try again next call
                retry = True
                reasons.append(f"{type(error).__name__}: {error}")
            except Exception as error:  # a step the generator does not cover keeps the plain loop
                reasons.append(brief(error))
        else:
            loop = RolledLoop("step calls", reason="; ".join(dict.fromkeys(reasons)))
            if retry:
                return loop
        loops[signature] = loop
    return loop


def trace_step(program, state, x_leaves, shared, eager_ops: bool = True) -> fx.GraphModule:
    """The packed step ``(N, w) -> (N, w)`` on one position as a graph of aten ops.

    ``eager_ops``: the ops the step calls, as eager dispatches them (``make_fx``
    before dispatch: ``linear``, ``layer_norm``, ``gru_cell`` stay one call each
    and run the very kernels eager runs, in-place ops stay in place); else the
    functional graph below composite ops (``functionalize``, as the solver's
    lowering, but without its substitutions: no ``view -> reshape``, no
    math-backend attention).
    """
    examples = [tensor.detach() for tensor in (state, *x_leaves, *shared)]
    state, x_leaves, shared = examples[0], examples[1 : 1 + len(x_leaves)], examples[1 + len(x_leaves) :]

    def step(s, x, sh):
        return program.step_packed(s, x, sh)

    if eager_ops:
        traced = make_fx(step, tracing_mode="fake", pre_dispatch=True)(state, x_leaves, shared)
    else:
        traced = make_fx(functionalize(step, remove="mutations"), tracing_mode="fake")(state, x_leaves, shared)
    traced.graph.eliminate_dead_code()
    check_recorded(traced)
    return traced


class UnrecordedTrace(ValueError):
    """``make_fx`` did not record the step's ops (see :func:`check_recorded`)."""


def check_recorded(traced: fx.GraphModule) -> None:
    """:class:`UnrecordedTrace` where the trace did not record the step: an output that reads no input, or a constant that
    is a fake tensor (a value computed while tracing, not recorded). That happens where the op's kernel runs
    below dispatch keys make_fx needs (the first call of an inductor graph runs inside aot_autograd's
    aliasing-check mode): a loop from such a trace would return that constant."""
    for node in traced.graph.find_nodes(op="get_attr"):
        if isinstance(getattr(traced, node.target, None), FakeTensor):
            raise UnrecordedTrace(f"the trace kept a value computed while tracing ({node.target}) instead of its ops")
    inputs = set(traced.graph.find_nodes(op="placeholder"))
    (output,) = traced.graph.find_nodes(op="output")
    for result in pytree.tree_leaves(output.args[0]):
        if isinstance(result, fx.Node) and not _reads_any(result, inputs):
            raise UnrecordedTrace(f"the traced step's output {result.name} reads none of its inputs")


def _reads_any(node: fx.Node, inputs: set) -> bool:
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current in inputs:
            return True
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return False


def generate_loop(
    graph_module: fx.GraphModule, n_columns: int, n_shared: int
) -> tuple[Callable, Callable | None, str, DenseStep | None]:
    """``graph_module`` (placeholders ``s, x_0 .. x_{n-1}, shared_0 ..``, one output) as loop functions.

    Returns ``(rolled, rolled_into, source, dense)``: ``rolled(s, columns, shared,
    start, stop)`` returns the list of the states ``s_{start+1} .. s_stop``
    (step ``l`` reads ``columns[i][l]``, 0-based), computed by the traced ops
    as they are (autograd can record it); ``rolled_into(s, columns, shared,
    start, stop, out)`` writes them into ``out`` ``(stop - start, N, w)``
    instead, without allocating: the step's last ops, a chain
    ``h_k(... h_1(z))`` of ops with in-place forms on a freshly computed ``z``
    (``tanh(z @ W^T + b)``), become ``z = op(..., out=out[l])`` and
    ``h_j_(out[l])``, the same kernels on the same values. ``rolled_into`` is
    ``None`` where the step does not end that way (or mutates, or draws
    random numbers); it must not run where autograd records (``out=`` ops
    have no derivative). ``dense``: the step as ``h(s W^T + b)`` where it is one
    (:func:`.dense_step.match`), else ``None``.
    """
    plan = StepPlan(graph_module, n_columns, n_shared)
    if len(plan.results) != 1 or not isinstance(plan.result, fx.Node):
        raise ValueError("traced step does not return one tensor")
    tail = plan.writable_tail()
    source = plan.source("rolled", None)
    if tail is not None:
        source += "\n" + plan.source("rolled_into", tail)
    namespace = dict(plan.constants)
    exec(compile(source, "<seqpar rolled loop>", "exec"), namespace)
    return namespace["rolled"], namespace.get("rolled_into"), source, dense_step.match(plan)


class StepPlan:
    """A traced graph's nodes as lines of Python: before the loop (loop-invariant) or in its body.

    Placeholders: the state ``s``, the per-step inputs ``x_0 ..``, the shared
    tensors ``sh_0 ..``, then ``n_carried`` values the loop carries from one
    step to the next besides the state (``c_0 ..``: the adjoint's cotangent);
    the state, the per-step inputs and the carried values vary per step.
    ``results``: the output's leaves (nodes, or ``None``). Each call node gets
    ``(callable, args, kwargs)``; a reshape to the shape it already has is an
    alias of its input; ``t(W)`` read only by ``addmm(b, a, t(W))`` /
    ``mm(a, t(W))`` with ``a`` 2-D becomes ``linear(a, W, b)`` (what
    ``F.linear`` runs: the same ``addmm``), one call instead of two.
    """

    def __init__(self, graph_module: fx.GraphModule, n_columns: int, n_shared: int, n_carried: int = 0):
        nodes = list(graph_module.graph.nodes)
        placeholders = [node for node in nodes if node.op == "placeholder"]
        if len(placeholders) != 1 + n_columns + n_shared + n_carried:
            raise ValueError(
                f"traced graph has {len(placeholders)} inputs, expected {1 + n_columns + n_shared + n_carried}"
            )
        (output,) = [node for node in nodes if node.op == "output"]
        self.state = placeholders[0]
        self.xs = placeholders[1 : 1 + n_columns]
        self.shared = placeholders[1 + n_columns : 1 + n_columns + n_shared]
        self.carried = placeholders[1 + n_columns + n_shared :]
        self.names = {self.state: "s"}
        self.names.update({node: f"x{i}" for i, node in enumerate(self.xs)})
        self.names.update({node: f"sh{i}" for i, node in enumerate(self.shared)})
        self.names.update({node: f"c{i}" for i, node in enumerate(self.carried)})
        self.constants: dict[str, object] = {}
        self.calls = [node for node in nodes if node.op in ("call_function", "get_attr")]
        unknown = [node for node in self.calls if node.op == "call_function" and not _callable_target(node.target)]
        if unknown:
            raise ValueError(f"traced step calls {unknown[0].target!r}, which the loop generator does not write out")
        # Mutations (copied back into inputs by functionalize) and random draws run once per step, in order.
        self.stateful = any(may_mutate(node.target) or draws_random(node.target)
                            for node in self.calls if node.op == "call_function")
        self.aliases: dict[fx.Node, fx.Node] = {}  # node -> the node whose value it is
        self.absorbed: set[fx.Node] = set()  # t(W) nodes folded into linear
        self.call: dict[fx.Node, tuple] = {}  # node -> (op, args, kwargs)
        self.varying = {self.state, *self.xs, *self.carried}
        for index, node in enumerate(self.calls):
            self.names[node] = f"v{index}"
            if node.op == "get_attr":
                continue
            if self.stateful or any(arg in self.varying for arg in node.all_input_nodes):
                self.varying.add(node)
            if node.target in _RESHAPES and not self.stateful and _same_shape(node, node.args[0]):
                self.aliases[node] = self.resolve(node.args[0])
            else:
                self.call[node] = (node.target, node.args, node.kwargs)
        for node in self.call:
            self._fold_linear(node)
        self.results = [self.resolve(node) if isinstance(node, fx.Node) else node
                        for node in pytree.tree_leaves(output.args[0])]
        self.graph_module = graph_module

    @property
    def result(self):
        """The one result of a step's graph (:func:`generate_loop` checks that there is one)."""
        return self.results[0]

    def resolve(self, node):
        return self.aliases.get(node, node)

    def _fold_linear(self, node) -> None:
        op, args, kwargs = self.call[node]
        if kwargs or op not in (_aten.addmm.default, _aten.mm.default):
            return
        *bias, operand, transposed = args
        if not isinstance(transposed, fx.Node) or self.call.get(transposed, (None,))[0] is not _aten.t.default:
            return
        if len(transposed.users) != 1 or transposed not in self.varying or _rank(operand) != 2:
            return
        weight = self.call[transposed][1][0]
        self.call[node] = (_aten.linear.default, (operand, weight, *bias), {})
        self.absorbed.add(transposed)

    def users(self, node) -> list:
        """The nodes that read ``node``'s value, through aliases."""
        found = []
        for user in node.users:
            found += self.users(user) if user in self.aliases else [user]
        return found

    def writable_tail(self):
        """``(head, in_place, trailing, shape)`` where the step ends ``reshape(h_k(..h_1(head)))`` (each
        ``h_j`` with an in-place form, on a value nothing else reads; ``trailing``: the reshapes, which the
        buffer's view of ``head``'s ``shape`` replaces) and ``head`` has an ``out=`` form; else ``None``."""
        if self.stateful or self.result not in self.call or self.result not in self.varying:
            return None
        node, trailing = self.result, []  # reshapes at the end (packing the state): the buffer is viewed instead
        while self.call[node][0] in _RESHAPES and isinstance(self.call[node][1][0], fx.Node):
            source = self.resolve(self.call[node][1][0])
            if source not in self.call or source not in self.varying or self.users(source) != [node]:
                return None
            trailing.append(node)
            node = source
        in_place = []
        while True:
            op, args, kwargs = self.call[node]
            source = self.resolve(args[0]) if args and isinstance(args[0], fx.Node) else None
            variant = _variant(op, "inplace")
            if (variant is None or source not in self.call or source not in self.varying
                    or self.users(source) != [node] or not _same_value_type(node, source) or not _fresh(self.call[source][0])
                    or any(self.resolve(arg) is source for arg in args[1:] if isinstance(arg, fx.Node))):
                break
            in_place.insert(0, node)
            node = source
        head = node
        if _variant(self.call[head][0], "out") is None or not _fresh(self.call[head][0]):
            if not in_place:
                return None
            head = in_place.pop(0)  # its out= form reads the previous value and writes the buffer
        value, state = head.meta.get("val"), self.state.meta.get("val")
        if not isinstance(value, torch.Tensor) or not isinstance(state, torch.Tensor):
            return None
        if value.dtype != state.dtype or value.numel() != state.numel() or not value.is_contiguous():
            return None
        return head, in_place, trailing, tuple(value.shape)

    def _emit(self, arg) -> str:
        if isinstance(arg, fx.Node):
            return self.names[self.resolve(arg)]
        if isinstance(arg, list):
            return "[" + ", ".join(map(self._emit, arg)) + "]"
        if isinstance(arg, tuple):
            return "(" + "".join(self._emit(item) + ", " for item in arg) + ")"
        if arg is None or isinstance(arg, (bool, int, str)) or (isinstance(arg, float) and math.isfinite(arg)):
            return repr(arg)
        return self._constant(arg)  # dtypes, devices, layouts, memory formats, non-finite floats

    def _constant(self, value) -> str:
        name = f"_c{len(self.constants)}"
        self.constants[name] = value
        return name

    def _line(self, node, op, extra_kwargs: str = "") -> str:
        _, args, kwargs = self.call[node]
        arguments = [self._emit(arg) for arg in args] + [f"{key}={self._emit(value)}" for key, value in kwargs.items()]
        if extra_kwargs:
            arguments.append(extra_kwargs)
        return f"{self.names[node]} = {self._constant(_entry(op))}({', '.join(arguments)})"

    def statements(self, tail=None) -> tuple[list[str], list[str]]:
        """``(before, body)``: the lines computing the graph's values once before the loop and in its body
        (``tail``, :meth:`writable_tail`: the forward's last ops write into the step's row ``o`` of a buffer)."""
        head, in_place, trailing, _ = tail if tail is not None else (None, [], [], None)
        before, body = [], []
        for node in self.calls:
            if node in self.aliases or node in self.absorbed or node in trailing:
                continue
            if node.op == "get_attr":
                before.append(f"{self.names[node]} = {self._constant(getattr(self.graph_module, node.target))}")
                continue
            op = self.call[node][0]
            if node is head:
                line = self._line(node, _variant(op, "out"), "out=o")
            elif node in in_place:
                line = self._line(node, _variant(op, "inplace"))
            else:
                line = self._line(node, op)
            (body if node in self.varying else before).append(line)
        return before, body

    def unpacking(self) -> list[str]:
        """The lines naming the per-step input columns and the shared tensors at the function's start."""
        lines = []
        if self.xs:
            lines.append("    " + "".join(f"{self.names[node]}c, " for node in self.xs) + "= columns")
        if self.shared:
            lines.append("    " + "".join(f"{self.names[node]}, " for node in self.shared) + "= shared")
        return lines

    def step_inputs(self, position: str) -> list[str]:
        """The loop body's lines reading the per-step inputs at ``position`` (an expression)."""
        return [f"{self.names[node]} = {self.names[node]}c[{position}]" for node in self.xs]

    def source(self, name: str, tail) -> str:
        """The forward loop function's source; ``tail`` (:meth:`writable_tail`) writes the states into ``out``."""
        shape = tail[3] if tail is not None else None
        before, body = self.statements(tail)
        signature = "s, columns, shared, start, stop" + (", out" if tail is not None else "")
        lines = [f"def {name}({signature}):", *self.unpacking()]
        lines += ["    " + line for line in before]
        if tail is None:
            lines += ["    states = []", "    append = states.append"]
        elif shape == tuple(self.state.meta["val"].shape):  # out[l - start]: the state (N, w), written as is
            lines += ["    packed = written = out.unbind(0)"]
        else:  # written through a view of the head's shape
            lines += ["    packed = out.unbind(0)", f"    written = out.view(out.shape[0], *{shape!r}).unbind(0)"]
        lines.append("    for l in range(start, stop):")
        lines += ["        " + line for line in self.step_inputs("l")]
        if tail is not None:
            lines.append("        o = written[l - start]")
        lines += ["        " + line for line in body]
        if tail is None:
            lines += [f"        s = {self.names[self.result]}", "        append(s)", "    return states"]
        else:
            lines += ["        s = packed[l - start]", "    return out"]
        return "\n".join(lines) + "\n"


def _callable_target(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) or target is operator.getitem


def _entry(target):
    """What the loop calls for ``target``: its Python binding (:data:`BINDINGS`), else the operator's C++
    entry point (what ``OpOverload.__call__`` calls), else the target itself."""
    if target in BINDINGS:
        return BINDINGS[target]
    return getattr(target, "_op", target) if isinstance(target, torch._ops.OpOverload) else target


def _bindings() -> dict:
    """Aten overloads of the ops a layer step spends its time in -> the ``torch`` functions eager calls.

    The generated bindings parse arguments faster than an overload's entry
    point (0.2-0.5 us a call: ``torch.mm`` 1.4 us, ``aten.mm.default._op``
    1.8 us on a 2-core CPU); each takes the traced arguments (the schema's
    own, ``out=`` included) to the same overload, checked in ``tests/runtime/test_rolled.py``.
    """
    nn_ = torch._C._nn
    table = [  # (packet, overloads, binding)
        ("mm", ("default", "out"), torch.mm), ("addmm", ("default", "out"), torch.addmm),
        ("bmm", ("default", "out"), torch.bmm), ("matmul", ("default", "out"), torch.matmul),
        ("linear", ("default", "out"), nn_.linear), ("conv2d", ("default",), torch.conv2d),
        ("layer_norm", ("default",), torch.layer_norm), ("batch_norm", ("default",), torch.batch_norm),
        ("softmax", ("int",), torch.softmax),
        ("tanh", ("default", "out"), torch.tanh), ("sigmoid", ("default", "out"), torch.sigmoid),
        ("relu", ("default",), torch.relu), ("gelu", ("default", "out"), nn_.gelu), ("silu", ("default", "out"), nn_.silu),
        ("add", ("Tensor", "out"), torch.add), ("sub", ("Tensor", "out"), torch.sub), ("mul", ("Tensor", "out"), torch.mul),
        ("tanh_", ("default",), torch.tanh_), ("sigmoid_", ("default",), torch.sigmoid_), ("relu_", ("default",), torch.relu_),
        ("gelu_", ("default",), nn_.gelu_), ("silu_", ("default",), nn_.silu_), ("add_", ("Tensor",), torch.Tensor.add_),
        ("sub_", ("Tensor",), torch.Tensor.sub_), ("mul_", ("Tensor",), torch.Tensor.mul_),
        ("t", ("default",), torch.t), ("permute", ("default",), torch.permute), ("transpose", ("int",), torch.transpose),
        ("reshape", ("default",), torch.reshape), ("view", ("default",), torch.Tensor.view),
        ("chunk", ("default",), torch.chunk), ("cat", ("default",), torch.cat),
    ]
    return {getattr(getattr(torch.ops.aten, name), overload): binding
            for name, overloads, binding in table for overload in overloads}


BINDINGS = _bindings()


def _variant(op, kind: str):
    """``op``'s in-place (``tanh_``) or ``out=`` (``tanh.out``) overload taking the same arguments, or ``None``."""
    if not isinstance(op, torch._ops.OpOverload) or len(op._schema.returns) != 1:
        return None
    packet = op.overloadpacket
    if kind == "inplace":
        other = getattr(getattr(torch.ops.aten, packet.__name__ + "_", None), op._overloadname, None)
        arguments = other._schema.arguments if other is not None else None
    else:
        other = getattr(packet, "out", None)
        if other is None or [arg.name for arg in other._schema.arguments if arg.is_out] != ["out"]:
            return None
        arguments = [arg for arg in other._schema.arguments if not arg.is_out]
    if arguments is None or [(a.name, str(a.type)) for a in arguments] != [(a.name, str(a.type)) for a in op._schema.arguments]:
        return None
    return other


def _fresh(op) -> bool:
    """Whether ``op`` returns a new tensor (not a view of an input)."""
    return isinstance(op, torch._ops.OpOverload) and all(ret.alias_info is None for ret in op._schema.returns)


def may_mutate(target) -> bool:
    """Whether ``target`` may write to a tensor (its schema says so, or a composite op that may, e.g.
    ``batch_norm`` updating running statistics)."""
    return isinstance(target, torch._ops.OpOverload) and (
        target._schema.is_mutable or torch.Tag.maybe_aliasing_or_mutating in target.tags
    )


def draws_random(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags


def _rank(node) -> int | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.ndim if isinstance(value, torch.Tensor) else None


def _same_shape(node: fx.Node, source) -> bool:
    if not isinstance(source, fx.Node):
        return False
    before, after = source.meta.get("val"), node.meta.get("val")
    return isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and before.shape == after.shape


def _same_value_type(node: fx.Node, source: fx.Node) -> bool:
    """Same shape, dtype and strides: an in-place op on ``source`` gives ``node``'s value."""
    before, after = source.meta.get("val"), node.meta.get("val")
    return (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and before.shape == after.shape
            and before.dtype == after.dtype and before.stride() == after.stride())
