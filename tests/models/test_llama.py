"""llama.py on the real SmolLM2 (Llama architecture, grouped KV heads, tied head): its config and
tokenizer as the GGUF states them, log-probabilities equal to transformers' on WikiText-2, and the model
interface every engine and trainer relies on."""

from __future__ import annotations

import pytest
import torch



@pytest.mark.slow  # transformers' model loaded and run on 20 lines: make test runs it, make test-fast not
def test_smollm_logprobs_match_transformers_on_wikitext(smollm, hf_smollm_model, hf_smollm_tokenizer, wikitext_lines):
    """Next-token log-probabilities over the whole vocabulary, 20 WikiText-2 lines, float32."""
    worst = 0.0
    for line in wikitext_lines[:20]:
        ids = smollm.tokenizer.encode(line)[:256]
        assert ids == hf_smollm_tokenizer(line).input_ids[:256]
        ours = torch.log_softmax(smollm.logits(ids), dim=-1)
        with torch.no_grad():
            ref = torch.log_softmax(hf_smollm_model(torch.tensor([ids])).logits[0].float(), dim=-1)
        assert ours.shape == (len(ids), 49152)
        worst = max(worst, (ours - ref).abs().max().item())
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    assert worst <= 1e-3, f"max |log p - log p_ref| = {worst}"



def test_smollm_config_and_tokenizer(smollm):
    c = smollm.config
    assert (c.architecture, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == ("llama", 30, 576, 9, 3)
    assert c.tie_word_embeddings and c.max_position_embeddings == 8192 and c.rope_theta == 100000.0
    assert smollm.num_parameters == 134_515_008
    assert (smollm.tokenizer.bos_token_id, smollm.tokenizer.eos_token_id, smollm.tokenizer.pad_token_id) == (1, 2, 2)


def test_models_meet_the_interface(smollm, minilm, st_minilm):
    """The interface's calls do what it says: a decoder's forward over sequences laid end to end gives each the
    logits it gets alone (no sequence sees another), its fused decode step declines a step it does not cover (a
    prefill) with None, and an encoder's pooled output is sentence-transformers' embedding."""
    from lmkernel.layers.attention import AttentionMetadata

    a, b = [1, 400, 2000, 35, 9], [77, 8, 1234]
    positions = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    meta = AttentionMetadata.for_lengths([5, 3], causal=True)
    lm, enc = smollm.model, minilm.model
    texts = ["Profit rose.", "Sales fell sharply in the quarter."]
    ids = [minilm.tokenizer.encode(t) for t in texts]
    with torch.inference_mode():
        both = lm.compute_logits(lm(torch.tensor(a + b), positions, meta))
        alone = [lm.compute_logits(lm(torch.tensor(x), torch.arange(len(x)), AttentionMetadata.for_lengths([len(x)], causal=True)))
                 for x in (a, b)]
        declined = lm.fused_decode()(torch.tensor(a + b), positions, meta, [])
        bidirectional = AttentionMetadata.for_lengths([len(x) for x in ids], causal=False)
        hidden = enc(torch.tensor([t for x in ids for t in x]), torch.cat([torch.arange(len(x)) for x in ids]), bidirectional)
        pooled = enc.pool(hidden, bidirectional)
    assert both.shape == (8, smollm.config.vocab_size) and declined is None
    torch.testing.assert_close(both, torch.cat(alone), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pooled, torch.from_numpy(st_minilm.encode(texts)), atol=2e-5, rtol=1e-4)
