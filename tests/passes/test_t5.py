"""Hugging Face T5 built from a config (random weights, nothing downloaded): its block stacks are chains.

T5's block 0 computes the relative position bias (and, in the decoder, the
causal mask on it) that blocks 1.. read; each block then takes its own
``.contiguous()`` of it (the decoder recomputes the causal mask per block).
Detection finds blocks 1..N-1 as equal segments, sharing block 1's value, and
block 0 joins by extension since it reads the same value computed again.
With N = 8 = the default ``min_chain`` the run of equal segments is one short
of it; the chain is kept because extension makes it 8 long.

Tolerance: float64, 1e-9 absolute, as the zoo in test_backend.py.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import seqpar  # noqa: E402
from tests.e2e.test_backend import (  # noqa: E402
    F64_ATOL, chain_reports, compile_with, compiled_matches_eager_with_gradients,
)

LAYERS = 8


def tiny_t5(model_class):
    torch.manual_seed(0)
    config = transformers.T5Config(d_model=32, d_ff=64, num_layers=LAYERS, num_decoder_layers=LAYERS, num_heads=4,
                                   d_kv=8, vocab_size=100, dropout_rate=0.0)
    return model_class(config).double().eval(), torch.randint(0, 100, (2, 7)), torch.randint(0, 100, (2, 5))


def test_t5_encoder_blocks_are_one_chain_from_block_0_at_the_default_min_chain_equal_to_eager():
    model, ids, _ = tiny_t5(transformers.T5EncoderModel)

    def hidden_states(ids):
        return model(ids).last_hidden_state

    compiled, backend = compile_with(hidden_states, policy="parallel", min_chain=LAYERS)
    torch.testing.assert_close(compiled(ids), hidden_states(ids), atol=F64_ATOL, rtol=0)
    (chain,) = chain_reports(backend)
    assert (chain.kind, chain.length, chain.decision) == ("transformer", LAYERS, "parallel")
    assert (chain.modules[0], chain.modules[-1]) == ("encoder.block.0", f"encoder.block.{LAYERS - 1}")


def test_t5_encoder_chain_gives_eager_gradients_for_every_parameter():
    model, ids, _ = tiny_t5(transformers.T5EncoderModel)

    def loss(ids):
        return model(ids).last_hidden_state.square().sum()

    def gradients(fn):
        model.zero_grad(set_to_none=True)
        fn(ids).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    expected = gradients(loss)
    compiled, backend = compile_with(loss, policy="parallel", min_chain=LAYERS)
    got = gradients(compiled)
    assert got.keys() == expected.keys()
    torch.testing.assert_close(got, expected, atol=F64_ATOL, rtol=0)
    assert [chain.length for chain in chain_reports(backend)] == [LAYERS]


def test_t5_encoder_and_decoder_stacks_are_two_chains_equal_to_eager():
    model, ids, decoder_ids = tiny_t5(transformers.T5Model)

    def both(ids, decoder_ids):
        out = model(ids, decoder_input_ids=decoder_ids, use_cache=False)
        return out.last_hidden_state, out.encoder_last_hidden_state

    compiled, backend = compile_with(both, policy="parallel", min_chain=LAYERS)
    torch.testing.assert_close(compiled(ids, decoder_ids), both(ids, decoder_ids), atol=F64_ATOL, rtol=0)
    chains = chain_reports(backend)
    assert [(c.kind, c.length, c.decision) for c in chains] == [("transformer", LAYERS, "parallel")] * 2
    assert [(c.modules[0], c.modules[-1]) for c in chains] == [
        ("encoder.block.0", f"encoder.block.{LAYERS - 1}"), ("decoder.block.0", f"decoder.block.{LAYERS - 1}")]


def test_t5_decoder_returning_its_cache_serves_it_as_per_step_outputs_and_the_model_stays_exact():
    model, ids, decoder_ids = tiny_t5(transformers.T5Model)
    report = seqpar.explain(model, ids, decoder_input_ids=decoder_ids, options={"policy": "parallel",
                                                                                  "min_chain": 4})
    (encoder,) = [chain for chain in report.chains if chain.modules[0].startswith("encoder.")]
    (decoder,) = [chain for chain in report.chains if chain.modules[0].startswith("decoder.")]
    assert (encoder.length, encoder.decision) == (LAYERS, "parallel")
    # the self-attention keys and values (the cross-attention ones read only the encoder's output: they are
    # no step's work); block 0 (it computes the position bias) returns its own cache, so it is not added by
    # extension, which adds only segments whose state alone is read after them
    assert (decoder.kind, decoder.decision, decoder.outputs) == ("transformer", "parallel", 2)
    assert decoder.modules[0] == "decoder.block.1"

    compiled, _ = compile_with(model, policy="parallel")
    got, expected = compiled(ids, decoder_input_ids=decoder_ids), model(ids, decoder_input_ids=decoder_ids)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=F64_ATOL, rtol=0)
    for cache in ("self_attention_cache", "cross_attention_cache"):
        for layer_got, layer in zip(getattr(_cache(got), cache).layers, getattr(_cache(expected), cache).layers):
            torch.testing.assert_close((layer_got.keys, layer_got.values), (layer.keys, layer.values),
                                       atol=F64_ATOL, rtol=0)


def _cache(output):
    """The returned ``EncoderDecoderCache`` (``cache`` in transformers 5, ``past_key_values`` before)."""
    return output["cache"] if "cache" in output else output["past_key_values"]


def test_t5_encoder_under_gradient_checkpointing_passes_its_bias_through_and_is_one_chain_with_eager_gradients():
    # Each checkpointed block is a call of its own body returning (hidden, position_bias), the bias block 0's
    # passed through: read from the call's operand, the state is the hidden states alone (it was a pair of
    # differently shaped tensors, rejected). Block 0 computes the bias: the chain is blocks 1..7, the last
    # block's body (its bias output pruned by Dynamo) alike once the others drop theirs.
    model, ids, _ = tiny_t5(transformers.T5EncoderModel)
    model.train().gradient_checkpointing_enable()

    def hidden_states(ids):
        return model(ids).last_hidden_state

    backend = compiled_matches_eager_with_gradients(hidden_states, (ids,), list(model.parameters()),
                                                    policy="parallel")
    (chain,) = chain_reports(backend)
    assert (chain.kind, chain.length, chain.decision) == ("transformer", LAYERS - 1, "parallel")
    assert (chain.modules[0], chain.modules[-1]) == ("encoder.block.1", f"encoder.block.{LAYERS - 1}")
