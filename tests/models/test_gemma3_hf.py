"""Gemma 3 from Hugging Face directories, against transformers on tiny random checkpoints: the decoder
(Gemma3ForCausalLM, local layers of an 8-token window on 30-token sequences) and EmbeddingGemma's bidirectional
Gemma3TextModel with sentence-transformers Dense layers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from model_checks import flatten, load_dir, perturb_vectors, split
from safetensors.torch import save_file

SEQS = [[2, *range(10, 38)], [2, 5, 9], [2, *range(100, 117)]]


def _tiny_config(**extra):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=128, sliding_window=8, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 100_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1_000.0}},
        **extra,
    )


def _save(model, directory) -> None:
    model.save_pretrained(directory, safe_serialization=True)


def test_decoder_matches_transformers_past_its_window(tmp_path):
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(0)
    reference = perturb_vectors(Gemma3ForCausalLM(_tiny_config()).eval(), 0.3)
    _save(reference, tmp_path)
    ours = load_dir(tmp_path)
    assert ours.config.architecture == "gemma3" and [ours.config.window(i) for i in range(4)] == [8, None, 8, None]
    ids, positions, meta = flatten(SEQS, causal=True)
    with torch.inference_mode():
        got = split(ours.compute_logits(ours(ids, positions, meta)), meta)
        for seq, logits in zip(SEQS, got):
            expected = reference(torch.tensor([seq])).logits[0]
            torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)
        windowless = copy.deepcopy(reference.config)
        windowless.sliding_window = 64  # the window matters: without it the long sequence differs
        wide = Gemma3ForCausalLM(windowless).eval()
        wide.load_state_dict(reference.state_dict())
        assert (wide(torch.tensor([SEQS[0]])).logits[0] - got[0]).abs().max() > 1e-3


def test_embeddinggemma_layout_matches_sentence_transformers_modules(tmp_path):
    """A bidirectional Gemma3TextModel saved as sentence-transformers saves EmbeddingGemma: mean pooling, two
    Dense layers without bias, normalisation; compared with the same steps run on transformers' model."""
    from transformers import Gemma3TextModel

    torch.manual_seed(1)
    reference = perturb_vectors(Gemma3TextModel(_tiny_config(use_bidirectional_attention=True)).eval(), 0.3)
    _save(reference, tmp_path)
    dense = [torch.randn(96, 64) * 0.1, torch.randn(64, 96) * 0.1]
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    for i, w in enumerate(dense):
        folder = tmp_path / f"{i + 2}_Dense"
        folder.mkdir()
        save_file({"linear.weight": w.contiguous()}, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"in_features": w.shape[1], "out_features": w.shape[0], "bias": False,
                                                        "activation_function": "torch.nn.modules.linear.Identity"}))
        modules.append({"idx": i + 2, "name": str(i + 2), "path": folder.name, "type": "sentence_transformers.models.Dense"})
    modules.append({"idx": 4, "name": "4", "path": "4_Normalize", "type": "sentence_transformers.models.Normalize"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": "q: "}}))
    ours = load_dir(tmp_path)
    c = ours.config
    assert c.is_encoder and c.bidirectional and c.sliding_window == 5 and c.prompts == {"query": "q: "} and c.matryoshka
    ids, positions, meta = flatten(SEQS, causal=False)
    with torch.inference_mode():
        got = ours.pool(ours(ids, positions, meta), meta)
        for seq, row in zip(SEQS, got):
            hidden = reference(torch.tensor([seq])).last_hidden_state[0]
            expected = F.normalize(hidden.mean(0) @ dense[0].T @ dense[1].T, dim=-1)
            torch.testing.assert_close(row, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("activation", ["torch.nn.modules.activation.ReLU", "nonsense"])
def test_an_unknown_dense_activation_is_refused_by_name(tmp_path, activation):
    from transformers import Gemma3TextModel

    from lmkernel.errors import UnsupportedModelError
    from lmkernel.loader.hf_config import parse_config

    _save(Gemma3TextModel(_tiny_config(use_bidirectional_attention=True)), tmp_path)
    (tmp_path / "2_Dense").mkdir()
    save_file({"linear.weight": torch.zeros(8, 64)}, tmp_path / "2_Dense" / "model.safetensors")
    (tmp_path / "2_Dense" / "config.json").write_text(json.dumps({"in_features": 64, "out_features": 8,
                                                                  "activation_function": activation}))
    (tmp_path / "modules.json").write_text(json.dumps([{"path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(UnsupportedModelError, match=r"2_Dense/config\.json: a Dense module needs"):
        parse_config(tmp_path)
