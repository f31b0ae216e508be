"""llama.py on the real SmolLM2 (Llama architecture, grouped KV heads, tied head): its config and
tokenizer as the GGUF states them, log-probabilities equal to transformers' on WikiText-2, and the model
interface every engine and trainer relies on."""

from __future__ import annotations

import pytest
import torch

from lmkernel.models.interface import CausalLM, Encoder
from lmkernel.models.llama import LlamaForCausalLM


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


def test_models_meet_the_interface(smollm, minilm):
    assert isinstance(smollm.model, LlamaForCausalLM) and isinstance(smollm.model, CausalLM)
    assert not isinstance(smollm.model, Encoder)
    assert isinstance(minilm.model, Encoder) and not isinstance(minilm.model, CausalLM)
    assert smollm.model.fused_decode() is not None  # float32 on CPU: the fused decode step is on offer
