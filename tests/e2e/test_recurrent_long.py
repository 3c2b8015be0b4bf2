"""The real recurrent models of test_step_outputs at sequence 1024 (slow: Dynamo unrolls every step).

Each model is its tiny config (test_step_outputs), fed 1024 tokens, compiled
with the default policy and with ``policy="parallel"``: the hidden states
equal eager's, and so do the gradients of every weight where eager can
differentiate the loop (not RWKV's CPU loop). Tolerance: the recurrences run
in float32 whatever the model's dtype (Mamba is float64 throughout), so
float32's, 1e-5 of the values' scale (``F32_RTOL``); over 1024 steps of a
contracting recurrence the solver's stopping tolerance, relative to the
states' scale, stays below it.
"""

from __future__ import annotations

import pytest
import torch

from tests.e2e.test_backend import chain_reports, compile_with
from tests.e2e.test_step_outputs import (
    assert_close_at_scale,
    assert_weight_gradients_close,
    tiny_mamba,
    tiny_recurrent_gemma,
    tiny_rwkv,
    tiny_xlstm,
)

pytestmark = pytest.mark.slow

SEQUENCE = 1024
PEELED = 3  # first steps at most left before a chain
MODELS = {  # builder, whether eager's loop can be differentiated, keyword arguments of the call
    "mamba": (tiny_mamba, True, {}),
    "rwkv": (tiny_rwkv, False, {}),
    "recurrent_gemma": (tiny_recurrent_gemma, True, {}),
    "xlstm": (tiny_xlstm, True, {"use_cache": False}),
}


@pytest.mark.parametrize("policy", ["auto", "parallel"])
@pytest.mark.parametrize("family", list(MODELS))
def test_real_recurrences_at_sequence_1024_equal_eager(family, policy):
    make, differentiable, call_options = MODELS[family]
    model, _ = make()
    ids = torch.randint(0, 50, (1, SEQUENCE), generator=torch.Generator().manual_seed(0))
    run = lambda ids: model(ids, **call_options).last_hidden_state  # noqa: E731
    compiled, backend = compile_with(run, policy=policy)
    with torch.set_grad_enabled(differentiable):
        got, want = compiled(ids), run(ids)
    assert_close_at_scale(got, want)
    # Chains (not the candidates a later detection round reports: repeats that read no previous segment).
    recurrences = [chain for chain in chain_reports(backend) if chain.kind == "recurrent" and chain.method]
    lengths = [chain.length for chain in recurrences]
    # RWKV's and xLSTM's later recurrences start after their first steps, which read constant initial states
    # (traced as literals, a different graph): those steps stay before the chain.
    assert lengths and all(SEQUENCE - PEELED <= length <= SEQUENCE for length in lengths), lengths
    if policy == "parallel":
        assert all(chain.decision == "parallel" for chain in recurrences)
    if not differentiable:
        return
    assert_weight_gradients_close(model, got, want)
