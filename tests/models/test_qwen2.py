"""llama.py against transformers' Qwen2 (QKV bias, grouped KV heads) and Llama with scaled RoPE."""

from __future__ import annotations

import pytest
import torch
from flat_batch import add_tokenizer, flatten, split

from lmkernel import load_model

SEQS = [[5, 17, 300, 999, 42, 7, 7, 8], [1, 2, 3], list(range(100, 190))]


def _check(ref_model, directory, minilm_dir):
    ours = load_model(add_tokenizer(directory, minilm_dir))
    ids, positions, meta = flatten(SEQS, causal=True)
    with torch.no_grad():
        flat = ours.model.compute_logits(ours.model(ids, positions, meta))
        for seq, got in zip(SEQS, split(flat, meta)):
            torch.testing.assert_close(got, ref_model(torch.tensor([seq])).logits[0], atol=1e-4, rtol=0)
    return ours


def _randomise_norms(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("tied", [False, True])
def test_qwen2_logits_match_transformers(tmp_path, minilm_dir, tied):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    config = Qwen2Config(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied,
    )
    model = _randomise_norms(Qwen2ForCausalLM(config))
    with torch.no_grad():  # biases start at zero; make them count
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.save_pretrained(tmp_path)
    ours = _check(model, tmp_path, minilm_dir)
    assert ours.config.attention_bias and ours.config.num_kv_heads == 2
    assert (ours.model.lm_head.weight is ours.model.model.embed_tokens.weight) == tied


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 32},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    ],
    ids=lambda r: r["rope_type"],
)
def test_llama_rope_scaling_matches_transformers(tmp_path, minilm_dir, rope):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    config = LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, rope_parameters={**rope, "rope_theta": 10000.0},
    )
    model = _randomise_norms(LlamaForCausalLM(config))
    model.save_pretrained(tmp_path)
    ours = _check(model, tmp_path, minilm_dir)
    assert ours.config.rope_scaling["rope_type"] == rope["rope_type"]
