"""seqpar.distributed.LayerParallel over 2 and 4 gloo ranks: forward, gradients and an optimizer step equal to the
whole nn.Sequential run eagerly (float64; tolerance 1e-12 as in test_solve_chain: Newton to 1e-10 relative,
quadratic, so states and gradients are exact to rounding)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from seqpar.testing.ranks import run_ranks_once

F64 = 1e-12


def stack(depth, width=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)]).double()


def training_case(rank, world, depth, frozen_rank=None):
    """Forward, backward and two SGD steps of LayerParallel against the same stack run eagerly on every rank.
    ``frozen_rank``: that rank's blocks do not require grad (and neither does the input)."""
    from seqpar.distributed import LayerParallel
    from seqpar.distributed.layer_parallel import shares

    eager = stack(depth)
    model = LayerParallel(copy.deepcopy(eager))
    first = model.first
    counts = shares(depth, world)
    if frozen_rank is not None:
        start = sum(counts[:frozen_rank])
        for block in list(eager)[start:start + counts[frozen_rank]]:
            block.requires_grad_(False)
        if rank == frozen_rank:
            model.requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, dtype=torch.float64, generator=generator)
    target = torch.randn(3, 4, dtype=torch.float64, generator=generator)
    errors = []
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad] or [torch.zeros(1)], lr=0.1)
    eager_optimizer = torch.optim.SGD([p for p in eager.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        x_mine, x_eager = x.clone().requires_grad_(frozen_rank is None), x.clone().requires_grad_(frozen_rank is None)
        out, expected = model(x_mine), eager(x_eager)
        (out - target).square().sum().backward()
        (expected - target).square().sum().backward()
        local = list(eager)[first:first + len(model.blocks)]
        grads = [(a.grad - b.grad).abs().max().item() for block, ref in zip(model.blocks, local)
                 for a, b in zip(block.parameters(), ref.parameters()) if a.requires_grad]
        errors.append(dict(out=(out - expected).abs().max().item(), grads=max(grads, default=0.0),
                           x=0.0 if frozen_rank is not None else (x_mine.grad - x_eager.grad).abs().max().item()))
        optimizer.step(), eager_optimizer.step()
        optimizer.zero_grad(), eager_optimizer.zero_grad()
    return dict(errors=errors, first=first, blocks=len(model.blocks), repr=repr(model))


def from_share_case(rank, world):
    """Each rank builds only its own blocks (uneven shares): forward and gradients equal the whole stack's."""
    from seqpar.distributed import LayerParallel

    counts = [3, 5] if world == 2 else [1, 3, 2, 2]
    eager = stack(sum(counts))
    first = sum(counts[:rank])
    model = LayerParallel.from_share([copy.deepcopy(block) for block in list(eager)[first:first + counts[rank]]])
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    out, expected = model(x), eager(x)
    out.square().sum().backward()
    expected.square().sum().backward()
    local = list(eager)[first:first + counts[rank]]
    grads = max((a.grad - b.grad).abs().max().item() for block, ref in zip(model.blocks, local)
                for a, b in zip(block.parameters(), ref.parameters()))
    return dict(out=(out - expected).abs().max().item(), grads=grads, first=model.first, total=model.total)


def compiled_and_explained(rank, world):
    """Inside a model compiled with seqpar: the stack runs as it is (a graph break), the rest compiled; explain
    lists it as a distributed chain."""
    import seqpar
    from seqpar.distributed import LayerParallel

    eager = stack(6)
    head = nn.Linear(4, 4).double()
    model = nn.Sequential(copy.deepcopy(head), LayerParallel(copy.deepcopy(eager)))
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    compiled = torch.compile(model, backend="seqpar")
    errors = [(compiled(x) - eager(head(x))).abs().max().item() for _ in range(5)]  # past the forward's trial
    report = seqpar.explain(model, x)
    (chain,) = [chain for chain in report.chains if chain.decision == "distributed"]
    torch._dynamo.reset()
    return dict(error=max(errors), modules=chain.modules, reason=chain.reason, length=chain.length,
                method=chain.method, stats=chain.stats, table=str(report), form=model[1].forward_form)


def trial_per_shape_case(rank, world):
    """A forward decided at one batch size times both forms again at another (the crossover moves with the
    batch), and keeps the first size's decision; values exact throughout."""
    from seqpar.distributed import LayerParallel

    eager = stack(6)
    model = LayerParallel(copy.deepcopy(eager))
    small, large = (torch.randn(batch, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(batch))
                    for batch in (1, 32))
    forms, errors = [], []
    with torch.no_grad():
        for x in (small,) * 4 + (large,) + (small,) + (large,) * 3:
            errors.append((model(x) - eager(x)).abs().max().item())
            forms.append(model.forward_form)
    return dict(forms=forms, error=max(errors))


def empty_batch_case(rank, world):
    """A batch of 0: the empty output eager gives, and zero gradients."""
    from seqpar.distributed import LayerParallel

    model = LayerParallel(stack(6))
    x = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
    out = model(x)
    out.square().sum().backward()
    return dict(shape=tuple(out.shape), x_grad=tuple(x.grad.shape),
                grads=max(float(p.grad.abs().max()) for p in model.parameters()))


def scenarios(rank, world):
    return dict(
        empty_batch=empty_batch_case(rank, world),
        per_shape=trial_per_shape_case(rank, world),
        from_share=from_share_case(rank, world),
        compiled=compiled_and_explained(rank, world),
        even=training_case(rank, world, depth=12),
        uneven=training_case(rank, world, depth=world + 1),
        frozen=training_case(rank, world, depth=8, frozen_rank=0),
    )


def results(world):
    return run_ranks_once(scenarios, world)


# 4 ranks as a slow case: CI runs 2 (its time near the 20-minute limit); `-m "slow or not slow"` runs both
WORLDS = pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])


@WORLDS
@pytest.mark.parametrize("case", ["even", "uneven", "frozen"])
def test_forward_gradients_and_sgd_steps_equal_the_eager_stack(world, case):
    for result in results(world):
        for step in result[case]["errors"]:
            assert step["out"] < F64 and step["grads"] < F64 and step["x"] < F64, (case, result[case])


@WORLDS
def test_each_input_shape_gets_its_own_forward_trial(world):
    for result in results(world):
        case = result["per_shape"]
        forms = case["forms"]
        assert case["error"] < F64
        # Calls: small x4, large, small, large x3. A trial decides after 2 + 2 calls, or after 1 + 1 where one
        # form is 4x faster (trial.DECISIVE: the first parallel call may still pay for tracing), and then stays.
        small, large = [forms[index] for index in (0, 1, 2, 3, 5)], forms[6:9]
        for calls in (small, large):
            decided = calls[-1]
            assert decided in ("parallel", "sequential"), forms
            first = calls.index(decided)
            assert calls[:first] == [None] * first and calls[first:] == [decided] * (len(calls) - first), forms
        assert forms[0] is None and forms[4] is None, forms  # one timed call of one form decides nothing
    assert len({tuple(result["per_shape"]["forms"]) for result in results(world)}) == 1  # every rank alike


@WORLDS
def test_each_rank_may_build_only_its_own_share(world):
    counts = [3, 5] if world == 2 else [1, 3, 2, 2]
    for rank, result in enumerate(results(world)):
        case = result["from_share"]
        assert case["out"] < F64 and case["grads"] < F64, case
        assert (case["first"], case["total"]) == (sum(counts[:rank]), sum(counts))


@WORLDS
def test_inside_a_compiled_model_it_runs_as_it_is_and_explain_lists_it(world):
    for result in results(world):
        case = result["compiled"]
        assert case["error"] < F64
        assert case["modules"] == ["1.blocks"] and case["length"] == 6
        assert f"split over {world} ranks by seqpar.distributed.LayerParallel" in case["reason"]
        assert "distributed" in case["table"]


@WORLDS
def test_the_faster_forward_is_kept_by_every_rank_and_explain_says_which(world):
    forms = {result["compiled"]["form"] for result in results(world)}
    assert len(forms) == 1 and forms <= {"parallel", "sequential"}
    for result in results(world):
        case = result["compiled"]
        assert case["method"] == case["form"]
        assert "the faster on this group's first calls with input shape (3, 4) (in parallel" in case["reason"]
        if case["form"] == "sequential":
            assert case["stats"]["fallback"] == "forward='sequential'"
        else:
            assert case["stats"]["iterations"] >= 1


@WORLDS
def test_each_rank_keeps_its_contiguous_share(world):
    shares = [(result["uneven"]["first"], result["uneven"]["blocks"]) for result in results(world)]
    assert shares == [(0, 2)] + [(index + 1, 1) for index in range(1, world)]
    assert "blocks 0..1 of" in results(world)[0]["uneven"]["repr"]


@WORLDS
def test_a_batch_of_zero_gives_the_empty_output_and_zero_gradients(world):
    for result in results(world):
        assert result["empty_batch"] == dict(shape=(0, 4), x_grad=(0, 4), grads=0.0), result["empty_batch"]
