"""The fused loop: a kept-sequential chain's per-step inputs computed in its step, the step compiled by inductor.

Mamba's reference loop (:class:`seqpar.testing.models.SelectiveScan` in miniature) computes
``dA = exp(A[None, :, None, :] * dt[..., None])`` and ``dBu`` for every step
before the loop, ``L`` times the state's values each, and reads one slice per
step. Kept sequential for cost (a wide diagonal state), the chain takes those
producers into its step (``seqpar.passes.absorb``) and runs the step compiled
by inductor (``seqpar.runtime.fused_loop``). Tolerances: float64 models equal
eager to 1e-12 relative (the same ops on the same numbers, per slice, in
another kernel); float32 ones are compared with the float64 model: no further
from it than eager's own float32 loop is, up to a factor 4 (a few roundings per
step each, on a contractive chain), or 1e-6 relative.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from seqpar.backend import SeqparBackend
from seqpar.runtime import fused_loop
from seqpar.runtime.ops import call_state
from seqpar.speed import DECIDED_AFTER
from seqpar.testing import models as zoo


def scan_model(dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    return zoo.SelectiveScan(**kwargs).to(dtype).eval(), torch.randn(1, 80, 64, dtype=dtype)


def compiled(model, grad=False, **options):
    torch._dynamo.reset()
    backend = SeqparBackend(options)
    function = torch.compile(model, backend=backend)
    return function, backend


def chain_of(backend):
    ((report, program),) = [item for graph in backend.graphs for item in graph.programs]
    return report, program


def relative_error(out, exact):
    return float((out.double() - exact).abs().max() / exact.abs().max())


@pytest.mark.parametrize("views", ["index", "unsqueeze"])
def test_the_producers_run_in_the_step_compiled_by_inductor(views):
    model, x = scan_model(views=views)
    function, backend = compiled(model)
    with torch.no_grad():
        outs = [function(x) for _ in range(3)]  # the first call traces under aot_autograd: compiled at the next
        exact, eager = model.double()(x.double()), model.float()(x)
    report, program = chain_of(backend)
    assert report.method == "sequential" and report.form == "rolled" and program.loop == "fused"
    assert "fused loop: the ops computing its per-step inputs (exp, mul" in report.reason
    assert all(fused_loop._COMPILED[program].values())  # compiled; which loop runs is timed (below)
    for out in outs:
        assert relative_error(out, exact) <= max(4 * relative_error(eager, exact), 1e-6)


def test_a_float64_model_equals_eager():
    model, x = scan_model(torch.float64)
    function, backend = compiled(model)
    with torch.no_grad():
        outs = [function(x) for _ in range(2)]
        want = model(x)
    assert chain_of(backend)[1].loop == "fused"
    for out in outs:
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))


def test_the_fused_loop_reads_the_weights_of_this_call():
    model, x = scan_model()
    function, backend = compiled(model)
    with torch.no_grad():
        function(x), function(x)
        model.A_log.data.add_(0.5)
        model.dt_bias.data.mul_(0.5)
        model.proj.weight.data.mul_(-1.0)
        out, want = function(x), model(x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_training_graphs_keep_the_producers_and_give_eagers_gradients():
    model, x = scan_model()
    function, backend = compiled(model)
    function(x).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().sum().backward()
    assert "the ops computing its per-step inputs" not in chain_of(backend)[0].reason
    for got, want in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("options", [{"inner": "eager"}, {"policy": "sequential"}])
def test_no_fused_loop_without_inductor_or_a_cost_decision(options):
    """inner="eager": nothing is compiled; policy="sequential": eager's kernels, bit for bit."""
    model, x = scan_model()
    function, backend = compiled(model, **options)
    with torch.no_grad():
        out, want = function(x), model(x)
    report, program = chain_of(backend)
    assert program.loop != "fused" and "fused loop" not in report.reason
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("model_options", [{"noise": True}, {"mutate": True, "views": "unsqueeze"}])
def test_producers_stay_outside_where_they_expand_nothing_or_their_inputs_change(model_options):
    """A per-value random draw among the producers: the per-step input holds no more values than what it is
    computed from; a producer's input written in place after the producer ran: the step would read the new
    values. The loop may still run the step compiled; values equal eager's (without the noise: inductor draws
    other random numbers than eager)."""
    model, x = scan_model(**model_options)
    function, backend = compiled(model)
    with torch.no_grad():
        outs = [function(x) for _ in range(3)]
        want = model(x)
    report, program = chain_of(backend)
    assert "the ops computing its per-step inputs" not in report.reason
    if not model_options.get("noise"):
        for out in outs:
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("fused_seconds, kept", [(0.02, "generated"), (0.005, "fused")])  # within DECISIVE
def test_the_faster_loop_is_kept(monkeypatch, fused_seconds, kept):
    """The first calls alternate the compiled step and the generated loop; the faster by its fastest call runs
    from then on (a clock that makes one of them slow decides; both give the same values to rounding)."""
    model, x = scan_model()
    function, backend = compiled(model)
    ticks = iter(range(10**6))
    running = {}

    def clock():  # each timed loop takes fused_seconds when fused, 0.01 s when generated
        return next(ticks) * (fused_seconds if running.get("form") == "fused" else 0.01)

    real_run_into = fused_loop.run_into

    def run_into(program, *args):
        trial = fused_loop._TRIALS.get(program)
        running["form"] = (trial.kept or trial.next_form()) if trial is not None else "fused"
        return real_run_into(program, *args)

    monkeypatch.setattr(fused_loop, "clock", clock)
    monkeypatch.setattr(fused_loop, "run_into", run_into)
    with torch.no_grad():
        outs = [function(x) for _ in range(16)]  # the graph's own trial runs the op on half of calls 2-7
        want = model(x)
    program = chain_of(backend)[1]
    trial = fused_loop._TRIALS[program]
    assert trial.kept == kept and list(map(len, trial.times.values())) == [fused_loop.SAMPLES] * 2
    for out in outs:
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_a_hand_written_lstm_cell_runs_the_fused_loop_equal_to_eager():
    """No producers to take in: the step itself (a dozen pointwise ops around one product) is compiled; every
    ``h_t`` and one ``c_t`` read after the loop."""
    model, (x,) = zoo.hand_lstm(steps=72, inputs=16, hidden=16, batch=8, outputs="all")
    function, backend = compiled(model)
    with torch.no_grad():
        outs = [function(x) for _ in range(3)]
        exact, eager = model.double()(x.double()), model.float()(x)
    report, program = chain_of(backend)
    assert program.loop == "fused" and "fused loop: the step compiled by inductor" in report.reason
    assert all(fused_loop._COMPILED[program].values())
    for out in outs:
        for got, want, own in zip(out, exact, eager):
            assert relative_error(got, want) <= max(4 * relative_error(own, want), 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_run_the_fused_loop_within_their_rounding(dtype):
    """The compiled step rounds like inductor's half-precision code: compared with the float64 model, no further
    than eager's own loop in that dtype, up to a factor 4."""
    model, x = scan_model(dtype)
    function, backend = compiled(model)
    with torch.no_grad():
        outs = [function(x) for _ in range(3)]
        eager = model(x)
        exact = model.double()(x.double())
    assert chain_of(backend)[1].loop == "fused"
    for out in outs:
        assert out.dtype == dtype
        assert relative_error(out, exact) <= 4 * relative_error(eager, exact)


def test_verify_accepts_the_fused_loops_rounding():
    """``verify=True`` compares the graph with the original in float64: the fused loop's float32 rounding on a
    contractive chain passes, and the rewritten graph keeps running."""
    model, x = scan_model()
    function, backend = compiled(model, verify=True)
    with torch.no_grad():
        outs = [function(x) for _ in range(3)]
        want = model(x)
    record = backend.graphs[0]
    assert not record.fell_back and chain_of(backend)[1].loop == "fused"
    for out in outs:
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_the_per_step_outputs_come_from_the_fused_loop(monkeypatch):
    """``y_l = s_l C_l`` is computed in the compiled step, next to ``s_l``: ``chain_outputs`` serves those values
    instead of evaluating ``g`` again on every state (equal to eager to float32 rounding)."""
    model, x = scan_model()
    served = []
    real = fused_loop.served_outputs
    monkeypatch.setattr(fused_loop, "served_outputs", lambda *args: served.append(real(*args)) or served[-1])
    function, backend = compiled(model)
    with torch.no_grad():
        outs = [function(x) for _ in range(16)]
        want = model(x)
    program = chain_of(backend)[1]
    assert fused_loop._TRIALS[program].kept == "fused" and served[-1] is not None
    for out in outs:
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_a_loop_without_a_generated_form_keeps_the_compiled_step_and_lets_the_graph_trial_run(monkeypatch):
    """Where the rolled loop has no writing form (``run_into``), the loop trial has nothing to time the compiled
    step against: it keeps it after the first call, and the graph's speed trial (which waits for loop trials)
    still decides."""
    from seqpar.runtime import sequential

    real_loop_for = sequential.loop_for
    monkeypatch.setattr(sequential, "loop_for",
                        lambda *args: dataclasses.replace(real_loop_for(*args), run_into=None))
    model, x = scan_model()
    function, backend = compiled(model)
    with torch.no_grad():
        outs = [function(x) for _ in range(DECIDED_AFTER + 2)]
        want = model(x)
    assert fused_loop._TRIALS[chain_of(backend)[1]].kept == "fused"
    assert backend.graphs[0].speed.kept is not None
    for out in outs:
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_inference_mode_and_a_second_sequence_length():
    """Under ``torch.inference_mode`` (tensors without version counters) the loop runs, the outputs are evaluated
    by ``chain_outputs``; a new length compiles another graph and program."""
    model, x = scan_model()
    function, backend = compiled(model)
    with torch.inference_mode():
        outs = [function(x) for _ in range(DECIDED_AFTER + 2)]
        want = model(x)
        longer = torch.randn(1, 96, 64)
        out_longer, want_longer = function(longer), model(longer)
    assert backend.graphs[0].programs[0][1].loop == "fused"
    for got, expected in [*((out, want) for out in outs), (out_longer, want_longer)]:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_float64_gradients_and_weights_after_an_optimizer_step_or_load_state_dict():
    """A training graph's forward may run the fused loop (its producers stay outside): float64 gradients with
    respect to every parameter and the input equal eager's to 1e-12; then an SGD step and a ``load_state_dict``
    change every weight in place, and inference calls see the new ones."""
    model, x = scan_model(torch.float64)
    x.requires_grad_(True)
    function, backend = compiled(model)
    function(x).square().sum().backward()
    got = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    model.zero_grad()
    x.grad = None
    model(x).square().sum().backward()
    want = [p.grad for p in model.parameters()] + [x.grad]
    assert chain_of(backend)[1].loop == "fused"
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()))
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    state = {name: value * 0.7 for name, value in model.state_dict().items()}
    inputs = x.detach()
    with torch.no_grad():
        stepped = [function(inputs), model(inputs)]
        model.load_state_dict(state)
        loaded = [function(inputs), model(inputs)]
    for out, expected in (stepped, loaded):
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))
