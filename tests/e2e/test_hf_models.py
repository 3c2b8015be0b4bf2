"""Hugging Face transformers models built from configs (random weights, nothing downloaded).

Tolerance: float64, 1e-9 absolute, as the zoo in test_backend.py.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import seqpar  # noqa: E402
from seqpar.backend import PerShape, SeqparBackend  # noqa: E402
from tests.e2e.test_backend import (  # noqa: E402
    F64_ATOL, chain_reports, compile_with, compiled_matches_eager_with_gradients,
)


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=6, n_embd=16, n_head=2, n_positions=32, vocab_size=50,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(config).double().eval(), torch.randint(0, 50, (2, 6))


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=6, hidden_size=16, num_attention_heads=2,
                                     intermediate_size=32, vocab_size=50, max_position_embeddings=32)
    return transformers.BertModel(config).double().eval(), torch.randint(0, 50, (2, 6))


@pytest.mark.parametrize("make, modules", [(tiny_gpt2, ("h.0", "h.5")), (tiny_bert, ("encoder.layer.0",
                                                                                     "encoder.layer.5"))],
                         ids=["gpt2", "bert"])
def test_transformer_blocks_of_hf_models_are_one_chain_equal_to_eager(make, modules):
    model, ids = make()

    def hidden_states(ids):
        return model(ids, use_cache=False).last_hidden_state if isinstance(model, transformers.GPT2Model) \
            else model(ids).last_hidden_state

    compiled, backend = compile_with(hidden_states, policy="parallel")
    torch.testing.assert_close(compiled(ids), hidden_states(ids), atol=F64_ATOL, rtol=0)
    (chain,) = chain_reports(backend)
    assert (chain.kind, chain.length, chain.decision) == ("transformer", 6, "parallel")
    assert (chain.modules[0], chain.modules[-1]) == modules


def test_a_returned_key_value_cache_is_served_as_per_step_outputs_of_the_blocks():
    model, ids = tiny_gpt2()
    report = seqpar.explain(model, ids, options={"policy": "parallel", "min_chain": 4})
    (chain,) = report.chains
    assert (chain.kind, chain.decision, chain.outputs) == ("transformer", "parallel", 2)  # keys and values
    compiled, _ = compile_with(model, policy="parallel")
    got, want = compiled(ids), model(ids)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=F64_ATOL, rtol=0)
    for layer, expected in zip(got.past_key_values.layers, want.past_key_values.layers, strict=True):
        torch.testing.assert_close(layer.keys, expected.keys, atol=F64_ATOL, rtol=0)
        torch.testing.assert_close(layer.values, expected.values, atol=F64_ATOL, rtol=0)



def test_generation_with_a_growing_cache_compiles_one_symbolic_step_and_reports_its_blocks():
    """Dynamo traces generation's third step with a symbolic cache length. Under ``no_grad`` the 12 blocks have no
    adjoint, and no size below 64 steps rewrites them: the graph keeps its symbolic sizes (one compile for every
    later length, not one per length), and its report still shows the blocks, found at the call's sizes where
    detection does not see through the symbolic ones, kept in the graph at every size. Tokens equal eager's."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=12, n_embd=16, n_head=2, n_positions=64, vocab_size=50,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    ids = torch.randint(1, 50, (1, 6))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    backend = SeqparBackend({"inner": "eager"})
    compiled = []
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward,
                                  backend=lambda gm, example: compiled.append(backend(gm, example)) or compiled[-1])
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)
    assert len(compiled) == 3 and not isinstance(compiled[-1], PerShape)
    (symbolic,) = backend.graphs[-1].chains
    assert (symbolic.kind, symbolic.decision, symbolic.form) == ("transformer", "sequential", "unrolled")
    assert "kept in the graph at every size" in symbolic.reason

@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_a_training_gpt2_with_zero_dropout_and_gradient_checkpointing_is_one_chain(checkpointing):
    # Train mode with dropout probabilities 0 (dropout(x, 0.0, True) draws nothing: not random); with
    # gradient_checkpointing_enable() every block is a tag_activation_checkpoint call with its own body.
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=6, n_embd=16, n_head=2, n_positions=32, vocab_size=50,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2Model(config).double().train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    ids = torch.randint(0, 50, (2, 6))

    def hidden_states(ids):
        return model(ids, use_cache=False).last_hidden_state

    backend = compiled_matches_eager_with_gradients(hidden_states, (ids,), list(model.parameters()),
                                                    policy="parallel")
    (chain,) = chain_reports(backend)
    assert (chain.kind, chain.length, chain.decision, chain.modules[0]) == ("transformer", 6, "parallel", "h.0")


def test_a_training_llama_under_gradient_checkpointing_is_one_chain_where_dynamo_keeps_one_graph():
    # Llama's checkpointed blocks mutate state outside the checkpoint (the `kernels` package's layer wrapper):
    # Dynamo breaks the graph at every block (gb0067) unless told not to replay that side effect in the backward.
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    model = transformers.LlamaModel(config).double().train()
    model.gradient_checkpointing_enable()
    ids = torch.randint(0, 100, (2, 7))

    def hidden_states(ids):
        return model(ids, use_cache=False).last_hidden_state

    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        backend = compiled_matches_eager_with_gradients(hidden_states, (ids,), list(model.parameters()),
                                                        policy="parallel")
    (chain,) = chain_reports(backend)
    assert (chain.kind, chain.length, chain.modules[0], chain.modules[-1]) == ("transformer", 8, "layers.0", "layers.7")
