"""Hugging Face config.json parsing: rope settings in either form, end-of-sequence ids from both files."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from lmkernel.loader import hf_config


def test_rope_settings_in_both_transformers_forms(tmp_path):
    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    old = {**base, "rope_theta": 5e5, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    new = {**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}}
    for raw in (old, new):
        (tmp_path / "config.json").write_text(json.dumps(raw))
        save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
        c = hf_config.parse_config(tmp_path)
        assert c.rope_theta == 5e5 and c.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_every_end_of_sequence_id_is_read(tmp_path):
    """config.json names one; generation_config.json may list more (Qwen2.5: <|im_end|> and <|endoftext|>)."""
    import json

    config = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 100, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 64, "eos_token_id": 7, "sliding_window": 32, "use_sliding_window": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")  # parse_config reads the stored dtype
    assert hf_config.parse_config(tmp_path).eos_token_ids == [7]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [9, 7]}))
    parsed = hf_config.parse_config(tmp_path)
    assert parsed.eos_token_ids == [7, 9] and parsed.sliding_window is None and parsed.max_context == 64
