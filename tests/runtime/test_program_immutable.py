"""Chain programs are immutable after construction; copies share traces, never per-call state.

A program's run spec (solver options, forward method, loop kind, layer
parameter slots) is fixed when it is built (:class:`ChainProgram`);
:meth:`ChainProgram.replace` makes another program over the same traces.
Traces are reused across compiled graphs whose step graphs are the same
(:func:`seqpar.passes.lower.step_key`), while each graph owns its program, so a
verification that demotes one graph's chain leaves every other graph's alone.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from seqpar.backend import SeqparBackend
from seqpar.passes.lower import step_key
from seqpar.runtime import ops, solve_chain, step_cache
from seqpar.runtime.ops import call_state

F64_ATOL = 1e-12  # float64 solves of contractive chains: rounding of a few hundred operations


def tanh_step(s, x, W):
    return torch.tanh(s @ W.T + x)


def chain_inputs(length=12, width=4, seed=0):
    torch.manual_seed(seed)
    W = 0.5 * torch.randn(width, width, dtype=torch.float64) / width**0.5
    return torch.randn(3, width, dtype=torch.float64), torch.randn(length, 3, width, dtype=torch.float64), W


def a_program(**options):
    s0, xs, W = chain_inputs()
    solve_chain(tanh_step, s0, xs, (W,), **options)
    return [program for program in ops._PROGRAMS.values() if program.step is tanh_step][-1]


@pytest.mark.parametrize("name", ["method", "solver_options", "loop", "param_slots", "jacobian", "lowered"])
def test_a_built_program_refuses_every_assignment(name):
    program = a_program()
    with pytest.raises(AttributeError, match="immutable"):
        setattr(program, name, getattr(program, name))


def test_solver_options_are_read_only():
    program = a_program()
    with pytest.raises(TypeError):
        program.solver_options["max_iters"] = 1


def test_replace_shares_the_traces_and_changes_only_the_run_spec():
    program = a_program()
    other = program.replace(method="sequential", sequential_reason="test")
    assert other.id != program.id
    assert other.lowered is program.lowered and other.steps_at is program.steps_at
    assert (other.method, other.sequential_reason) == ("sequential", "test")
    assert program.method == "parallel"
    assert other.solver_options == program.solver_options


@pytest.mark.parametrize("change", [{"loop": "bogus"}, {"method": "bogus"}])
def test_replace_validates_the_run_spec(change):
    with pytest.raises(ValueError, match=next(iter(change))):
        a_program().replace(**change)


def test_solve_chain_with_other_options_reuses_the_traces():
    first = a_program(tol=1e-8)
    second = a_program(tol=1e-9)
    assert second is not first and second.lowered is first.lowered
    assert second.solver_options["tol"] != first.solver_options["tol"]
    assert a_program(tol=1e-9) is second  # the same options: the same program


def residual_stack(depth=8, width=6, scale=0.5, seed=0):
    torch.manual_seed(seed)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(width, width)

        def forward(self, s):
            return s + scale * torch.tanh(self.linear(s))

    return nn.Sequential(*[Block() for _ in range(depth)]).double()


def compiled_programs(model, x, **options):
    torch._dynamo.reset()  # a recompilation would make a changed Python scalar a symbolic input
    backend = SeqparBackend({"policy": "parallel", **options})
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
    programs = [program for graph in backend.graphs for _, program in graph.programs]
    return out, programs


def test_two_copies_of_a_model_share_traces_but_not_programs():
    model = residual_stack()
    x = torch.randn(5, 6, dtype=torch.float64)
    out, (program,) = compiled_programs(model, x)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[0].linear.weight.mul_(-1)  # other values: traces are for shapes, not values
    twin_out, (twin_program,) = compiled_programs(twin, x)
    assert twin_program is not program and twin_program.id != program.id
    assert twin_program.lowered is program.lowered
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), atol=F64_ATOL, rtol=0)
        torch.testing.assert_close(twin_out, twin(x), atol=F64_ATOL, rtol=0)


def test_a_demoted_program_demotes_no_other_graphs_chain():
    model = residual_stack()
    x = torch.randn(5, 6, dtype=torch.float64)
    _, (program,) = compiled_programs(model, x)
    _, (twin_program,) = compiled_programs(copy.deepcopy(model), x)
    call_state(program).demoted = "test: verification mismatch"
    assert call_state(twin_program).demoted is None


def test_steps_that_differ_in_a_literal_do_not_share_traces():
    x = torch.randn(5, 6, dtype=torch.float64)
    halves, quarters = residual_stack(scale=0.5), residual_stack(scale=0.25)
    out_half, (half,) = compiled_programs(halves, x)
    out_quarter, (quarter,) = compiled_programs(quarters, x)
    assert half.lowered is not quarter.lowered
    with torch.no_grad():
        torch.testing.assert_close(out_half, halves(x), atol=F64_ATOL, rtol=0)
        torch.testing.assert_close(out_quarter, quarters(x), atol=F64_ATOL, rtol=0)


def test_step_key_names_callees_by_identity_and_literals_by_value():
    def graph_of(fn):
        return torch.fx.symbolic_trace(fn)

    same_a = graph_of(lambda s: torch.tanh(s) * 0.5)
    same_b = graph_of(lambda s: torch.tanh(s) * 0.5)
    literal = graph_of(lambda s: torch.tanh(s) * 0.25)
    callee = graph_of(lambda s: torch.sigmoid(s) * 0.5)
    assert step_key(same_a) == step_key(same_b)
    assert step_key(same_a) != step_key(literal)
    assert step_key(same_a) != step_key(callee)


def test_the_program_cache_is_bounded():
    assert len(step_cache._cache) <= step_cache.CAPACITY
