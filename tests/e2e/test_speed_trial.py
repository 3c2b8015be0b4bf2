"""Policy "auto" never slower than the original graph: the speed trial (seqpar.speed) on the first calls.

Timing is not asserted here (tests never time): the trial's clock is replaced
by one that says how long each form took, and the tests check what the
backend does with it. Values are compared with eager in float64 on every call
(solver tolerance 1e-10 relative, F64_ATOL as in test_backend).
"""

import torch
import torch.fx as fx

from seqpar.runtime.ops import call_state
from seqpar import speed
from seqpar.speed import DECIDED_AFTER, SAMPLES, SpeedTrial, differentiated
from seqpar.testing import models as zoo

from .test_backend import F64_ATOL, compile_with, to_double


def fake_clock(monkeypatch, original_seconds: float, rewritten_seconds: float,
               backward_seconds: dict[str, float] | None = None) -> list[str]:
    """Make every timed call report the given durations, and every timed backward (where the call is
    differentiated) ``backward_seconds`` of the form whose call it ends; returns the forms in the order they
    ran."""
    ran, real_time_backward = [], speed.time_backward

    def timed_call(function, args):
        form = "original" if isinstance(function, fx.GraphModule) else "rewritten"
        ran.append(form)
        return function(*args), original_seconds if form == "original" else rewritten_seconds

    def time_backward(outputs, finished):
        form = ran[-1]
        return real_time_backward(outputs, lambda _seconds: finished(backward_seconds[form]))

    monkeypatch.setattr("seqpar.backend.timed_call", timed_call)
    monkeypatch.setattr("seqpar.speed.time_backward", time_backward)
    return ran


def rolled_chain():
    """A 64-layer tanh MLP: policy auto keeps it sequential in the rolled form (a chain program)."""
    model, inputs = to_double(*zoo.deep_mlp(depth=64, width=4))
    return model.eval(), inputs


def solves(backend) -> list:
    return [call_state(program).last_stats for _, program in backend.graphs[0].programs]


def test_a_slower_rewrite_hands_the_graph_back_to_the_original(monkeypatch):
    ran = fake_clock(monkeypatch, original_seconds=1.0, rewritten_seconds=2.0)
    model, inputs = rolled_chain()
    compiled, backend = compile_with(model)
    with torch.no_grad():
        expected = model(*inputs)
        for call in range(DECIDED_AFTER):
            torch.testing.assert_close(compiled(*inputs), expected, atol=F64_ATOL, rtol=0)
            assert backend.trials_running == (call < DECIDED_AFTER - 1)
        assert ran == ["rewritten", "original"] * SAMPLES  # alternating, one form per call
        graph = backend.graphs[0]
        assert graph.speed.kept == "original"
        assert "rewritten 2e+03 ms, original 1e+03 ms (0.50x): the original graph runs" in graph.chains[0].reason
        before = solves(backend)
        torch.testing.assert_close(compiled(*inputs), expected, atol=F64_ATOL, rtol=0)
        assert solves(backend) == before  # the chain op did not run again
        assert len(ran) == 2 * SAMPLES  # nor is anything timed any more


def test_a_faster_rewrite_is_kept(monkeypatch):
    ran = fake_clock(monkeypatch, original_seconds=2.0, rewritten_seconds=1.0)
    model, inputs = rolled_chain()
    compiled, backend = compile_with(model)
    with torch.no_grad():
        for _ in range(DECIDED_AFTER + 2):
            torch.testing.assert_close(compiled(*inputs), model(*inputs), atol=F64_ATOL, rtol=0)
    assert backend.graphs[0].speed.kept == "rewritten" and len(ran) == 2 * SAMPLES
    assert "(2.00x): the rewritten graph runs" in backend.graphs[0].chains[0].reason


def training_step(compiled, model, inputs):
    """One call and backward of ``compiled``: its output and input gradient against eager's (float64)."""
    x = inputs[0].clone().requires_grad_()
    expected_x = inputs[0].clone().requires_grad_()
    out, expected = compiled(x), model(expected_x)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(out, expected, atol=F64_ATOL, rtol=0)
    torch.testing.assert_close(x.grad, expected_x.grad, atol=F64_ATOL, rtol=0)


def test_a_training_graph_is_timed_forward_and_backward(monkeypatch):
    # The rewritten forward is faster, its backward slower by more: the original trains faster.
    ran = fake_clock(monkeypatch, original_seconds=2.0, rewritten_seconds=1.0,
                     backward_seconds={"original": 1.0, "rewritten": 3.0})
    model, inputs = rolled_chain()
    compiled, backend = compile_with(model)
    training_step(compiled, model, inputs)
    trial = backend.graphs[0].speed
    assert trial.with_backward
    compiled(inputs[0].clone().requires_grad_())
    assert ran == ["rewritten"] and trial.times == {"rewritten": [], "original": []}  # counted at its backward
    for _ in range(2 * SAMPLES):
        training_step(compiled, model, inputs)
    assert ran == ["rewritten"] + ["rewritten", "original"] * SAMPLES
    assert trial.kept == "original" and trial.times == {"rewritten": [4.0] * SAMPLES, "original": [3.0] * SAMPLES}
    assert ("calls, forward and backward each): rewritten 4e+03 ms, original 3e+03 ms (0.75x): the original graph runs"
            in backend.graphs[0].chains[0].reason)
    before = solves(backend)
    training_step(compiled, model, inputs)
    assert solves(backend) == before and len(ran) == 2 * SAMPLES + 1


def test_a_faster_parallel_backward_keeps_the_rewrite_for_training(monkeypatch):
    ran = fake_clock(monkeypatch, original_seconds=1.0, rewritten_seconds=2.0,
                     backward_seconds={"original": 10.0, "rewritten": 1.0})
    model, inputs = rolled_chain()
    compiled, backend = compile_with(model)
    for _ in range(DECIDED_AFTER + 2):
        training_step(compiled, model, inputs)
    assert backend.graphs[0].speed.kept == "rewritten" and len(ran) == 2 * SAMPLES
    assert "(3.67x): the rewritten graph runs" in backend.graphs[0].chains[0].reason


def test_a_differentiated_graph_called_without_backward_is_timed_by_its_forward(monkeypatch):
    # Evaluation with grad enabled: no backward ever comes; after SAMPLES calls the trial times forwards alone.
    ran = fake_clock(monkeypatch, original_seconds=1.0, rewritten_seconds=2.0,
                     backward_seconds={"original": 0.0, "rewritten": 0.0})
    model, inputs = rolled_chain()
    compiled, backend = compile_with(model)
    x = inputs[0].clone().requires_grad_()
    for _ in range(1 + SAMPLES + 2 * SAMPLES + 1):
        torch.testing.assert_close(compiled(x), model(x), atol=F64_ATOL, rtol=0)
    trial = backend.graphs[0].speed
    assert not trial.with_backward and trial.kept == "original"
    assert ran == ["rewritten"] * SAMPLES + ["rewritten", "original"] * SAMPLES
    assert "(fastest of 3 calls each)" in backend.graphs[0].chains[0].reason


def test_forced_policies_are_not_timed(monkeypatch):
    ran = fake_clock(monkeypatch, original_seconds=1.0, rewritten_seconds=2.0)
    model, inputs = rolled_chain()
    for policy in ("parallel", "sequential"):
        compiled, backend = compile_with(model, policy=policy)
        with torch.no_grad():
            for _ in range(DECIDED_AFTER):
                compiled(*inputs)
        assert backend.graphs[0].speed is None
    assert ran == []


def test_verified_calls_are_not_timed(monkeypatch):
    # verify=2 checks calls 1, 2, 4, 6, ...: the check's reference run would count against the rewrite.
    ran = fake_clock(monkeypatch, original_seconds=1.0, rewritten_seconds=2.0)
    model, inputs = rolled_chain()
    compiled, backend = compile_with(model, verify=2)
    with torch.no_grad():
        for _ in range(6):
            compiled(*inputs)
    assert len(ran) == 2 and all(entry.startswith(("call 1:", "call 2:", "call 4:", "call 6:"))
                                 for entry in backend.graphs[0].verification)


def test_the_trial_keeps_the_faster_form_by_its_fastest_call():
    trial = SpeedTrial(with_backward=False, decided=print)
    for original, rewritten in zip([5.0, 1.0, 1.0], [2.0, 2.0, 1.5]):
        assert trial.next_form() == "rewritten"
        trial.add("rewritten", rewritten)
        assert trial.kept is None and trial.next_form() == "original"
        trial.add("original", original)
    assert trial.kept == "original"  # 1.0 < 1.5: one slow call (5.0) of the original does not decide


def test_a_decisive_first_pair_ends_the_trial():
    # A rewrite far faster than the original (a parallel adjoint against eager's training step) is kept after
    # one call of each: two more calls of the slow form would only cost.
    trial = SpeedTrial(with_backward=True, decided=print)
    trial.add("rewritten", 1.0)
    trial.add("original", 4.5)
    assert trial.kept == "rewritten"
    close = SpeedTrial(with_backward=True, decided=print)
    close.add("rewritten", 1.0)
    close.add("original", 3.5)
    assert close.kept is None  # within DECISIVE (4x): more calls decide
    slow = SpeedTrial(with_backward=False, decided=print)
    slow.add("rewritten", 5.0)
    slow.add("original", 1.0)
    assert slow.kept == "original"


def test_a_call_is_differentiated_through_its_inputs_or_the_graphs_own_parameters():
    layer, x = torch.nn.Linear(2, 2), torch.randn(1, 2)
    assert differentiated(layer, (x,))  # a parameter Dynamo did not lift to an input
    with torch.no_grad():
        assert not differentiated(layer, (x.requires_grad_(),))
    layer.requires_grad_(False)
    assert differentiated(layer, (x,)) and not differentiated(layer, (x.detach(),))


class CountingMLP(torch.nn.Module):
    """A rolled chain and an in-place buffer update (a call counter): every call must update it exactly once."""

    def __init__(self):
        super().__init__()
        self.mlp, self.inputs = rolled_chain()
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        self.calls.add_(1)
        return self.mlp(x)


def test_every_call_of_the_trial_updates_a_buffer_once(monkeypatch):
    ran = fake_clock(monkeypatch, original_seconds=1.0, rewritten_seconds=2.0)
    model = CountingMLP()
    compiled, backend = compile_with(model)
    with torch.no_grad():
        for call in range(1, DECIDED_AFTER + 3):
            torch.testing.assert_close(compiled(*model.inputs), model.mlp(*model.inputs), atol=F64_ATOL, rtol=0)
            assert model.calls.item() == call
    assert len(ran) == 2 * SAMPLES and backend.graphs[0].speed.kept == "original"
