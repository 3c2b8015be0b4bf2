"""Lower a chain and its decision to a runtime program: the step traced for the solver.

Guarantees of :func:`build_chain_program`: a registered
:class:`~seqpar.runtime.program.ChainProgram` whose step is the chain's step
graph, traced on example tensors shaped like the chain's per-step inputs and
shared inputs; the program's methods (forward, adjoint, Jacobian, tolerance,
window) are the decision's, the window bounded by the device's memory where
the whole chain's Jacobian blocks do not fit (:mod:`seqpar.runtime.budget`); inputs that need no gradient (a whole group of
frozen parameters, buffers) are named ``frozen``; ``param_slots`` says which
per-step inputs the op receives as unstacked layer parameters. The program is
the graph's own (a verification that demotes it demotes no other graph's), its
traces shared with every chain whose step graph has the same
:func:`step_key`, shapes and methods.

:func:`chain_structure` lowers the chain's step first (the same trace the
program is then built on) to prove its Jacobian's structure for the policy.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..runtime.chain import build_program, lowered_step, validated_solver_options
from ..runtime.precision import autocast_as, autocast_state, computing_dtype
from ..runtime.program import ChainProgram, StateLayout
from ..runtime.step_cache import value_identity
from ..runtime.structure import StepStructure, step_structure
from .chain import Chain, map_state, state_leaves
from .inputs import stacked_inputs
from .policy import Decision
from .tokens import example, static_size


class StepAdapter:
    """``step(s, x_leaves, *shared) = chain.step(s, *x_leaves, *shared)``: the runtime's step signature
    (the per-step outputs' ``chain.output_step`` alike), run under the autocast settings in force when the graph
    was compiled. The graph's ops are those Dynamo traced under the caller's autocast, without its casts; the
    compiled graph around the chain op runs with autocast off (aot_autograd applied it when tracing), so the
    step applies it itself: a ``bfloat16`` autocast region gives the step eager's ``bfloat16`` products.
    Dynamo guards the autocast state: the graph runs under no other."""

    def __init__(self, graph_step: fx.GraphModule):
        self.graph_step = graph_step
        self.autocast = autocast_state()

    def __call__(self, state, x_leaves, *shared):
        if not self.autocast:
            return self.graph_step(state, *x_leaves, *shared)
        with autocast_as(self.autocast):
            return self.graph_step(state, *x_leaves, *shared)


def example_value(node: fx.Node) -> torch.Tensor:
    """The node's example value (:func:`~.tokens.example`), which must be a tensor."""
    value = example(node)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"node {node.name} has no tensor example value")
    return value


def _requires_grad(node: fx.Node) -> bool:
    return bool(example_value(node).requires_grad)


def _empty_like(value: torch.Tensor, lead: tuple[int, ...] = ()) -> torch.Tensor:
    """A real, uninitialised tensor shaped like a (fake) example value, for tracing."""
    return torch.empty((*lead, *value.shape), dtype=value.dtype, device=value.device)


def stacks_parameters_in_graph(chain: Chain, decision: Decision, standalone: bool) -> bool:
    """Whether the rewrite stacks the chain's layer parameters in the graph or hands them to the op unstacked.

    In the graph only when the rewritten graph runs without an inner compiler
    (``standalone``: inductor compiles a stack of a thousand inputs slowly),
    and there when autograd records the chain (its output and some layer
    parameter require grad: one ``unbind`` backward instead of ``L * P``
    gradients through the op) or the forward is the parallel solve (which
    stacks them anyway): ``torch.stack`` of each parameter group is one C++
    op, while handing ``L * P`` separate tensors to the custom op costs
    dispatch work per tensor on every call (measured at 4096 layers: 5.3 ms
    of a 34 ms call, benchmarks/call_overhead.py). The rolled loop of an
    untrained chain reads the parameters where they are, unstacked.
    """
    trained = any(_requires_grad(node) for item in chain.per_step if item.kind == "parameter" for node in item.nodes)
    final = [node for node in state_leaves(chain.outputs[-1]) if node is not None]
    recorded = trained and any(example_value(node).requires_grad for node in final)
    return standalone and (recorded or decision.method == "parallel")


def state_layout(chain: Chain) -> StateLayout:
    """How the chain's state (a tensor or a tuple of tensors) packs into ``(N, w)``: ``batch_ndim`` batch dims."""
    state = map_state(example_value, chain.start)
    shapes = chain.leaf_shapes
    return StateLayout(
        spec=pytree.tree_structure(state),
        batch_shape=torch.Size(shapes[0][: chain.batch_ndim]),
        leaf_shapes=tuple(torch.Size(shape[chain.batch_ndim :]) for shape in shapes),
        dtype=chain.state_dtype,
        device=state_leaves(state)[0].device,
    )


def _trace_examples(chain: Chain) -> tuple[StateLayout, list, list]:
    """``(layout, xs examples, shared examples)`` to trace the chain's step on: real, uninitialised tensors,
    ``L`` slices of a slice input and an ``(L, ...)`` tensor per other per-step input.

    Raises ValueError for a chain of symbolic shape (a program is traced for one shape)."""
    symbolic = [node for node in [*state_leaves(chain.start), *chain.shared]
                if any(static_size(size) is None for size in example_value(node).shape)]
    if symbolic:
        raise ValueError(
            f"{symbolic[0].name} has the symbolic shape {tuple(example_value(symbolic[0]).shape)}: seqpar solves "
            "chains of static shape (torch.compile(..., dynamic=False))"
        )
    layout = state_layout(chain)
    xs_examples = stacked_inputs(
        chain,
        lambda node: _empty_like(example_value(node)),
        lambda nodes: _empty_like(example_value(nodes[0]), (len(nodes),)),
        layout.device,
    )
    return layout, list(xs_examples), [_empty_like(example_value(node)) for node in chain.shared]


def chain_structure(chain: Chain) -> StepStructure:
    """The structure of the chain's step Jacobian (:mod:`seqpar.runtime.structure`), proven on the step lowered
    for the runtime (cached: :func:`build_chain_program` builds the program on the same trace).

    Raises what lowering raises (a symbolic shape, a step that cannot be traced)."""
    return step_structure(_lowered(chain, *_trace_examples(chain)))


def _lowered(chain: Chain, layout, xs_examples, shared_examples) -> fx.GraphModule:
    """The chain's step lowered on these examples (cached under its :func:`step_key`)."""
    with torch._guards.tracing(None), unset_fake_temporarily():  # outside Dynamo's fake mode, as below
        return lowered_step(
            StepAdapter(chain.step), layout, pytree.tree_structure(xs_examples), xs_examples, shared_examples,
            step_key=step_key(chain.step),
        )


def build_chain_program(
    chain: Chain, decision: Decision, tol, max_iters, *, standalone: bool = False
) -> ChainProgram:
    """Trace the chain's step for the solver, with the decision's methods attached.

    Raises ValueError for a chain of symbolic shape (the program is traced for one shape)."""
    layout, xs_examples, shared_examples = _trace_examples(chain)
    unstacked = not stacks_parameters_in_graph(chain, decision, standalone)
    param_slots = [index for index, item in enumerate(chain.per_step) if item.kind == "parameter" and unstacked]
    # Buffers (running statistics, masks) get no gradient; some ops do not differentiate them.
    frozen = frozenset(
        [("xs", i) for i, item in enumerate(chain.per_step)
         if item.kind in ("parameter", "slice") and not any(map(_requires_grad, item.nodes))]
        + [("shared", i) for i, node in enumerate(chain.shared) if node.op == "placeholder" and not _requires_grad(node)]
    )
    jacobian = decision.jacobian if decision.method == "parallel" else "identity"
    lowered = _lowered(chain, layout, xs_examples, shared_examples)
    precision = computing_dtype(lowered, chain.state_dtype)
    solver_options = validated_solver_options(tol, max_iters, None, precision, chain.length, jacobian, decision.window,
                                              layout=layout, diagonal=step_structure(lowered).diagonal)
    # Trace outside Dynamo's tracing context: its fake mode would make the sizes symbolic.
    with torch._guards.tracing(None), unset_fake_temporarily():
        program = build_program(
            StepAdapter(chain.step),
            layout,
            chain.length,
            pytree.tree_structure(xs_examples),
            xs_examples,
            shared_examples,
            jacobian,
            decision.adjoint,
            solver_options,
            frozen,
            method=decision.method,
            sequential_reason=f"kept sequential: {decision.reason}",
            loop=decision.loop,
            param_slots=param_slots,
            step_key=step_key(chain.step),
            outputs=None if chain.output_step is None else StepAdapter(chain.output_step),
            outputs_key=None if chain.output_step is None else step_key(chain.output_step),
            outputs_at_next=chain.outputs_read_next,
            own=True,
        )
    return program


def step_key(step: fx.GraphModule) -> tuple:
    """What a step graph's traces depend on: its code, the functions it calls and its literals.

    Two step graphs with equal keys trace to the same program (for equal
    shapes and methods), so a chain compiled again (a recompilation, a copy
    of the model, a second stack of the same shape) reuses the traces. The
    callees are named by identity, literals by value
    (:func:`~seqpar.runtime.step_cache.value_identity`); a graph reading
    anything but its placeholders (a ``get_attr``) is named by itself.
    """
    nodes = []
    for node in step.graph.nodes:
        if node.op not in ("placeholder", "call_function", "output"):
            return ("object", id(step))
        literals = [arg for arg in pytree.tree_leaves((node.args, node.kwargs)) if not isinstance(arg, fx.Node)]
        nodes.append((node.op, value_identity(node.target), tuple(map(value_identity, literals))))
    return ("graph", step.code, tuple(nodes))
