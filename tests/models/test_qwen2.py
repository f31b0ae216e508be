"""llama.py against transformers' Qwen2 (QKV bias, grouped KV heads) and Llama with scaled RoPE."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_checks import flatten, load_dir, perturb_vectors, split
from torch import nn


# The last sequence runs past max_position_embeddings=64 of the Llama configs, where dynamic scaling starts.
SEQS = [[5, 17, 300, 999, 42, 7, 7, 8], [1, 2, 3], list(range(100, 190))]


def _check_logits(ref_model: nn.Module, directory: Path) -> nn.Module:
    """Save the reference, load it with lmkernel, and compare logits of a flattened batch per sequence."""
    ref_model.save_pretrained(directory, safe_serialization=True)
    ours = load_dir(directory)
    ids, positions, meta = flatten(SEQS, causal=True)
    with torch.no_grad():
        flat = ours.compute_logits(ours(ids, positions, meta))
        for seq, got in zip(SEQS, split(flat, meta)):
            torch.testing.assert_close(got, ref_model(torch.tensor([seq])).logits[0], atol=1e-4, rtol=0)
    return ours


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_qwen2_logits_match_transformers(tmp_path, tied):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    config = Qwen2Config(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied,
    )
    ours = _check_logits(perturb_vectors(Qwen2ForCausalLM(config), 0.3), tmp_path)
    assert ours.config.attention_bias and ours.config.num_kv_heads == 2
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied


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
def test_llama_rope_scaling_matches_transformers(tmp_path, rope):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    config = LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, rope_parameters={**rope, "rope_theta": 10000.0},
    )
    ours = _check_logits(perturb_vectors(LlamaForCausalLM(config), 0.3), tmp_path)
    assert ours.config.rope_scaling["rope_type"] == rope["rope_type"]
    assert ours.rotary.rope_type == rope["rope_type"]
