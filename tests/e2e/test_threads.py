"""Calls from several threads: each call's values and gradients are eager's, and nothing raises.

torch.fx's tracer patches ``torch.nn.Module.__call__`` for the whole process
while it traces; seqpar traces at run time (a chain's loops at their first
call, a solve's windows, ``solve_chain``'s programs, a symbolic graph's copy
per shape), so one thread's trace beside another's Dynamo compile made Dynamo
raise while building guards (about one run in ten of the two-thread test below
before :mod:`seqpar.runtime.tracing`). The invariant that removes the race is
tested directly: every patch a trace makes holds Dynamo's compile lock.
Tolerances: float64 models equal eager to 1e-9 (the solver's float64
tolerance is 1e-10 relative on these contracting chains, conditioning O(1)).
"""

from __future__ import annotations

import concurrent.futures
import threading

import pytest
import torch
import torch.fx._symbolic_trace as symbolic_trace
from torch._dynamo.convert_frame import compile_lock

from seqpar.backend import SeqparBackend
from seqpar.runtime import solve_chain, step_cache
from seqpar.runtime.chain import prepare_chain
from seqpar.runtime.ops import call_state
from seqpar.testing import models as zoo

from tests.conftest import rnn_chain, rnn_step, sequential_loop
from tests.e2e.test_trust import TOL, chain_reports, compiled, gradients, tanh_mlp


@pytest.fixture
def patches(monkeypatch):
    """``(name, whether the patching thread held Dynamo's compile lock)`` of every method torch.fx's tracer patches
    from now on."""
    seen = []
    patch_method = symbolic_trace._Patcher.patch_method

    def spy(self, frame_dict, name, new_fn, deduplicate=True):
        seen.append((name, compile_lock._is_owned()))
        return patch_method(self, frame_dict, name, new_fn, deduplicate)

    monkeypatch.setattr(symbolic_trace._Patcher, "patch_method", spy)
    return seen


def in_two_threads(work):
    """``work(0) + work(1)``, each run in its own thread, the two started together (every wait bounded)."""
    start = threading.Barrier(2, timeout=120)

    def started(thread):
        start.wait()
        return work(thread)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(started, thread) for thread in range(2)]
        return [item for future in futures for item in future.result(timeout=600)]


def test_the_traces_of_a_compiled_chains_first_calls_hold_dynamos_compile_lock(patches):
    model = tanh_mlp(32, 8)
    function, backend = compiled(model, policy="auto")
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    compiled_at = len(patches)
    for _ in range(4):  # the rolled loop is traced at its first call; the speed trial's calls after
        out = function(x)
        gradients(model, x, out)
    assert chain_reports(backend) and len(patches) > compiled_at  # traces at run time, not only at compile time
    assert all(held for _, held in patches), [name for name, held in patches if not held]


def test_the_fused_loops_compile_at_run_time_holds_dynamos_compile_lock(patches):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = zoo.SelectiveScan().eval(), torch.randn(1, 80, 64)
    function = torch.compile(model, backend=SeqparBackend({}))
    with torch.no_grad():
        for _ in range(3):  # the first call traces under aot_autograd: the loop is compiled at the next
            function(x)
    assert patches and all(held for _, held in patches)


def test_a_symbolic_graphs_copy_per_shape_and_solve_chain_trace_holding_dynamos_compile_lock(patches):
    function, backend = compiled(tanh_mlp(32, 8), policy="parallel")
    for batch in (4, 6, 8):  # Dynamo makes the batch symbolic at the second size: seqpar compiles a copy per size
        function(torch.randn(batch, 8, dtype=torch.float64))
    s0, xs, shared = rnn_chain(16, 4)
    torch.testing.assert_close(solve_chain(rnn_step, s0, xs, shared), sequential_loop(rnn_step, s0, xs, shared),
                               rtol=TOL, atol=TOL)
    assert len(backend.graphs) >= 3 and patches and all(held for _, held in patches)


@pytest.mark.parametrize("policy", ["auto", "parallel"])
def test_a_compiled_model_called_from_two_threads_at_once_gives_each_call_eager_values_and_gradients(policy):
    # Two threads start together at the first call: both compile (one after the other, under Dynamo's lock), the
    # verified first call, the speed trial's turns, the chains' first-call traces and backward passes run beside
    # the other thread's calls. Every call's output and gradients (input and parameters, from autograd.grad:
    # nothing accumulated) equal eager's for its input.
    model = tanh_mlp(32, 8)
    function, backend = compiled(model, policy=policy)
    calls = 6
    inputs = [torch.randn(4, 8, dtype=torch.float64, requires_grad=True) for _ in range(2 * calls)]

    def calls_of(thread):
        made = []
        for x in inputs[thread::2]:
            out = function(x)
            made.append((x, out, gradients(model, x, out)))
        return made

    results = in_two_threads(calls_of)
    assert len(results) == 2 * calls and chain_reports(backend)
    for x, out, got_gradients in results:
        torch.testing.assert_close(out, model(x), rtol=TOL, atol=TOL)
        for got, want in zip(got_gradients, gradients(model, x, model(x)), strict=True):
            torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)


def test_solve_chain_from_two_threads_with_its_cache_evicting_gives_each_call_the_loops_states(monkeypatch):
    # A cache of 2 programs and 6 steps (each gain its own program): every call evicts another thread's entries
    # between its lookup and its store. Each call's states equal its sequential loop's.
    monkeypatch.setattr(step_cache, "CAPACITY", 2)
    s0, xs, shared = rnn_chain(12, 4)
    steps = [lambda s, x, W, U, b, gain=gain: torch.tanh(gain * (s @ W.T) + x @ U.T + b) for gain in
             (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]
    results = in_two_threads(
        lambda thread: [(step, solve_chain(step, s0, xs, shared)) for _ in range(3) for step in steps[thread::2]])
    assert len(results) == 18
    for step, states in results:
        torch.testing.assert_close(states, sequential_loop(step, s0, xs, shared), rtol=TOL, atol=TOL)


def test_a_solves_check_and_stats_belong_to_the_thread_that_called_it():
    # The verified call's check, set by its caller, is taken by that thread's solve, never by another thread's call
    # of the same program; solve_chain's stats are its own call's, whatever another thread solved since. Both
    # handshakes run in one thread (the op's forward runs in the calling thread).
    s0, xs, shared = rnn_chain(16, 4)
    defaults = dict(jacobian="auto", tol=None, max_iters=None, damping=None, window=None, length=None,
                    batch_ndim=None, adjoint="auto", forward="parallel")
    program = prepare_chain(rnn_step, s0, xs, shared, **defaults)[0]
    checked = []

    def check(reference, states, exact):
        checked.append(threading.get_ident())
        return True, "checked"

    mine = call_state(program).thread
    mine.check = check
    states, my_stats = solve_chain(rnn_step, s0, xs, shared, return_stats=True)
    assert checked == [threading.get_ident()] and mine.check is None and mine.check_result == (True, "checked")
    mine.check, mine.check_result = check, None
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a call in another thread, on larger initial states
        other_stats = pool.submit(solve_chain, rnn_step, 3 * s0, xs, shared, return_stats=True).result(timeout=120)[1]
    assert checked == [threading.get_ident()] and mine.check is check and mine.check_result is None
    assert other_stats is not my_stats and mine.last_stats is my_stats
    assert call_state(program).last_stats is other_stats  # what reports show: the program's last call, any thread's
    torch.testing.assert_close(states, sequential_loop(rnn_step, s0, xs, shared), rtol=TOL, atol=TOL)
