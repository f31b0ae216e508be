"""GGUF loading: layout (Q/K permutation, names, tied head), every readable tensor type, and bad files."""

from __future__ import annotations


import gguf
import pytest
import torch
from model_checks import flatten, split
from tiny_gguf import T, vocabulary, write_llama_gguf

from lmkernel import load_model
from lmkernel.errors import UnsupportedModelError, WeightsError
from lmkernel.loader import gguf_file

# Every tensor type the loader claims to read, spread over the tensors of a two-layer model.
MIXED_TYPES = {
    "token_embd.weight": T.Q8_0,
    "blk.0.attn_q.weight": T.Q4_K,
    "blk.0.attn_k.weight": T.Q5_K,
    "blk.0.attn_v.weight": T.Q6_K,
    "blk.0.attn_output.weight": T.Q4_0,
    "blk.0.ffn_gate.weight": T.Q4_1,
    "blk.0.ffn_up.weight": T.F16,
    "blk.0.ffn_down.weight": T.BF16,
    "blk.1.attn_q.weight": T.Q8_0,
    "blk.1.attn_k.weight": T.Q4_0,
}


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocabulary()), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # RMSNorm weights start at 1; make them count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


IDS = [1, 40, 70, 259, 100, 3, 200, 261, 88, 2, 17, 150]


def test_f32_gguf_matches_original_model(tmp_path, tiny_llama):
    """Undoing llama.cpp's Q/K permutation and renaming gives back the exact original model."""
    path = write_llama_gguf(tmp_path / "tiny.gguf", tiny_llama)
    ours = load_model(path)
    assert ours.config.tie_word_embeddings and ours.config.num_kv_heads == 2
    with torch.no_grad():
        ref = tiny_llama(torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(ours.logits(IDS), ref, atol=1e-4, rtol=0)


def test_every_supported_tensor_type_matches_transformers(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    path = write_llama_gguf(tmp_path / "mixed.gguf", tiny_llama, MIXED_TYPES)
    reader = gguf.GGUFReader(str(path))
    assert {t.tensor_type for t in reader.tensors} >= set(MIXED_TYPES.values())
    ours = load_model(path)
    ref_model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype="float32").eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(ours.logits(IDS), ref, atol=1e-4, rtol=0)


def test_batched_sequences_equal_one_at_a_time(tmp_path, tiny_llama):
    """Sequences laid end to end attend only within themselves."""
    model = load_model(write_llama_gguf(tmp_path / "tiny.gguf", tiny_llama))
    seqs = [IDS, IDS[:5], [7, 8, 9, 10, 11, 12, 13]]
    ids, positions, meta = flatten(seqs, causal=True)
    with torch.no_grad():
        logits = model.model.compute_logits(model.model(ids, positions, meta))
    for s, got in zip(seqs, split(logits, meta)):
        torch.testing.assert_close(got, model.logits(s), atol=1e-5, rtol=0)


def test_unreadable_tensor_type_names_file_tensor_and_type(tmp_path, tiny_llama):
    raw = write_llama_gguf(tmp_path / "iq4.gguf", tiny_llama, {"blk.1.ffn_up.weight": T.IQ4_XS})
    with pytest.raises(UnsupportedModelError) as err:
        load_model(raw)
    message = str(err.value)
    assert str(raw) in message and "blk.1.ffn_up.weight" in message and "IQ4_XS" in message and "Q4_K" in message


def test_truncated_gguf_is_a_clear_error(tmp_path, smollm_gguf):
    cut = tmp_path / "cut.gguf"
    with smollm_gguf.open("rb") as src, cut.open("wb") as dst:
        dst.write(src.read(2_000_000))
    with pytest.raises(WeightsError) as err:
        load_model(cut)
    assert str(cut) in str(err.value)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"definitely not gguf" * 10)
    with pytest.raises(WeightsError, match="junk.gguf"):
        load_model(bad)


def test_unsupported_gguf_architecture(tmp_path, tiny_llama):
    path = write_llama_gguf(tmp_path / "tiny.gguf", tiny_llama)
    data = bytearray(path.read_bytes())
    at = data.find(b"llama")  # general.architecture's value, first string in the file
    data[at : at + 5] = b"mamba"
    (tmp_path / "other.gguf").write_bytes(bytes(data))
    with pytest.raises(UnsupportedModelError, match=r"other\.gguf.*'mamba'.*expected one of"):
        load_model(tmp_path / "other.gguf")


def test_unpermute_inverts_llama_cpp_permutation():
    from tiny_gguf import _permute

    w = torch.arange(8 * 64 * 3, dtype=torch.float32).reshape(8 * 64 // 8, 24)
    assert torch.equal(gguf_file._unpermute(torch.from_numpy(_permute(w.numpy(), 4)), 4), w)




def test_keep_runs_q8_0_and_q4_layers_in_their_own_bits(tmp_path, tiny_llama):
    from lmkernel.layers.linear import Int4Linear, Int8Linear

    path = write_llama_gguf(tmp_path / "mixed.gguf", tiny_llama, MIXED_TYPES)
    dense = load_model(path)
    kept = load_model(path, quantization="keep")
    q8 = kept.model.model.layers[1].self_attn.q_proj
    assert isinstance(q8, Int8Linear) and q8.group_size == 32 and q8.weight_scale.shape == (256, 8)
    assert torch.equal(q8.dequantized(), dense.model.model.layers[1].self_attn.q_proj.weight)
    for q4 in (kept.model.model.layers[0].self_attn.o_proj, kept.model.model.layers[0].mlp.gate_proj,
               kept.model.model.layers[1].self_attn.k_proj):
        assert isinstance(q4, Int4Linear) and q4.group_size == 32
    assert not isinstance(kept.model.model.layers[0].self_attn.q_proj, (Int4Linear, Int8Linear))  # Q4_K: dequantized
    with torch.inference_mode():
        torch.testing.assert_close(kept.logits(IDS), dense.logits(IDS), atol=1e-4, rtol=0)
        x = torch.randn(6, 256)  # decode rows through the kernel, four at a time, against the dense layer
        torch.testing.assert_close(q8(x), x @ dense.model.model.layers[1].self_attn.q_proj.weight.T, atol=1e-4, rtol=1e-4)
