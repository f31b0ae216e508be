"""GGUF loading: layout (Q/K permutation, names, tied head), every readable tensor type, and bad files."""

from __future__ import annotations


import gguf
import pytest
import torch
from model_checks import flatten, split
from tiny_gguf import T, write_llama_gguf

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
    ours = load_model(path, quantization=None)  # dequantized, as transformers reads it
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


def test_keep_runs_every_layer_in_its_own_blocks(tmp_path, tiny_llama):
    """The default on CPU: every linear layer and the embedding stay in their stored blocks (no float
    weight), equal to the dequantized weights, and each layer's output stays within 1.5% of the float
    layer's (the activations' 8-bit quantization; the whole random model is too chaotic to compare:
    its attention is nearly one-hot)."""
    from lmkernel.layers.linear import GGUFEmbedding, GGUFLinear

    path = write_llama_gguf(tmp_path / "mixed.gguf", tiny_llama, MIXED_TYPES)
    dense = load_model(path, quantization=None)
    kept = load_model(path)
    layers = dict(kept.model.named_modules())
    assert isinstance(layers["model.embed_tokens"], GGUFEmbedding)
    assert kept.model.lm_head.blocks is layers["model.embed_tokens"].blocks  # the tied head reads the same blocks
    expected = {gguf_file.hf_name(name).removesuffix(".weight"): qtype for name, qtype in MIXED_TYPES.items()}
    for name, layer in layers.items():
        if isinstance(layer, torch.nn.Linear):
            raise AssertionError(f"{name} was dequantized")
        if isinstance(layer, GGUFLinear) and name in expected:
            weight = dict(dense.model.named_modules())[name].weight
            assert layer.gguf_type == int(expected[name])
            assert torch.equal(layer.dequantized(), weight), name
            x = torch.randn(5, layer.in_features)
            with torch.inference_mode():
                assert (layer(x) - x @ weight.T).norm() / (x @ weight.T).norm() < 0.015, name
    assert max(t.numel() for t in kept.model.state_dict().values() if t.is_floating_point()) <= 512  # norms only
    assert kept.num_parameters == dense.num_parameters
    assert torch.equal(kept.model.model.embed_tokens(torch.tensor(IDS)), dense.model.model.embed_tokens(torch.tensor(IDS)))


def test_keep_is_refused_where_it_cannot_be_honoured(tmp_path, tiny_llama):
    from lmkernel.errors import LmkError

    path = write_llama_gguf(tmp_path / "tiny.gguf", tiny_llama)
    with pytest.raises(LmkError, match="quantization must be one of"):
        load_model(path, quantization="int3")
    from lmkernel.loading.load import _keep_gguf
    from lmkernel.registry import resolve

    source = resolve(path)
    cuda = torch.device("cuda")
    assert not _keep_gguf("auto", source, cuda, None)  # "auto" dequantizes for CUDA (the block kernels are CPU's)
    with pytest.raises(LmkError, match="quantization='keep' runs GGUF blocks on the CPU kernels"):
        _keep_gguf("keep", source, cuda, None)


def test_contexts_past_a_sliding_window_attend_within_it(tmp_path, tiny_llama):
    """Mistral v0.1's sliding window of 16 tokens on a context of 3x that and more: the reference forward,
    the engine's chunked prefill (16 tokens a step, chunks reading earlier ones from the cache) and its decode
    steps (the fused decoder and the paged kernel) give the log-probs of transformers' Mistral with the window,
    and differ from attending to the whole context; the blocks that left the window go back to the pool."""
    from transformers import MistralConfig, MistralForCausalLM

    from lmkernel import LLM, SamplingParams

    model = load_model(write_llama_gguf(tmp_path / "window.gguf", tiny_llama, sliding_window=16))
    assert model.config.sliding_window == 16 and model.config.max_context == 128
    assert [model.config.window(i) for i in range(2)] == [16, 16]
    c = tiny_llama.config
    mistral = MistralForCausalLM(MistralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=True, sliding_window=16, attn_implementation="eager",
    )).eval()
    mistral.load_state_dict(tiny_llama.state_dict())
    ids = (IDS * 6)[:60]
    with torch.inference_mode():
        expected = torch.log_softmax(mistral(torch.tensor([ids])).logits[0], -1)
        whole = torch.log_softmax(tiny_llama(torch.tensor([ids])).logits[0], -1)
    got = torch.log_softmax(model.logits(ids), -1)
    assert (got - expected).abs().max().item() <= 1e-4
    assert (whole - expected).abs().max().item() > 1e-2  # the window matters here

    llm = LLM(model, kv_cache_memory=1 << 20, max_num_batched_tokens=16, max_num_seqs=4, verbose=False)
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=12, prompt_logprobs=1, ignore_eos=True))[0]
    scored = torch.tensor([out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])
    assert (scored - expected[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]).abs().max().item() <= 1e-4
    continued = list(ids)
    with torch.inference_mode():
        for _ in range(12):
            continued.append(int(mistral(torch.tensor([continued])).logits[0, -1].argmax()))
    assert list(out.outputs[0].token_ids) == continued[len(ids):]
    # Every layer slides, so the one KV group gives back blocks that left the window: the 72 tokens (5 blocks of
    # 16) never held more than the window and a chunk straddle (3 blocks).
    assert llm.stats()["kv_blocks_peak"] <= 3 and llm.stats()["decode_backend"] == "fused"


