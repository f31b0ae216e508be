"""Quantizing SmolLM2: quality measured on WikiText-2, a saved model reloads to identical logits,
and bad requests fail cleanly with nothing half-written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from lmkernel.compress.calibrate import calibration_sequences
from lmkernel.compress.gptq import gptq_quantize
from lmkernel.compress.quantize import quantize_model, storage_dtypes
from lmkernel.errors import LmkError
from lmkernel.eval.perplexity import perplexity
from lmkernel.eval.embeddings import embedding_fidelity
from lmkernel.layers.linear import DynamicInt8Linear, Int4Linear, Int8Linear
from lmkernel.loader.hf_export import save_model_dir
from lmkernel.loading import load_model

pytestmark = pytest.mark.slow  # GPTQ calibration: `make test` runs it, `make test-fast` does not

FIRST_TOKENS = 4096  # the issue: "WikiText-2 (validation, first 4k tokens)"


@pytest.fixture(scope="module")
def wikitext(wikitext_lines: list[str]) -> str:
    return "\n".join(wikitext_lines)


@pytest.fixture(scope="module")
def float_ppl(smollm, wikitext: str) -> float:
    return perplexity(smollm, wikitext, FIRST_TOKENS).perplexity


def _check_reload(lm, done, kind, tmp_path) -> None:
    out = save_model_dir(lm.model, lm.config, lm.tokenizer, lm.dtype, tmp_path / done.method,
                         extra_config={"quantization_config": done.to_json()}, store_as=storage_dtypes(lm.model))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["method"] == done.method
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    again = load_model(out)
    assert all(isinstance(again.model.get_submodule(n), kind) for n in done.quantized)
    ids = lm.tokenizer.encode("The European lobster is a species of clawed lobster")
    with torch.inference_mode():
        assert torch.equal(again.logits(ids), lm.logits(ids))
    assert again.tokenizer.encode("Hello there") == lm.tokenizer.encode("Hello there")


def _change(lm, wikitext: str, float_ppl: float, label: str) -> float:
    result = perplexity(lm, wikitext, FIRST_TOKENS)
    assert result.tokens == FIRST_TOKENS - 1
    change = result.perplexity / float_ppl - 1
    print(f"{label}: perplexity {result.perplexity:.4f} vs float {float_ppl:.4f} ({change:+.2%}) over {result.tokens} tokens")
    return change


def test_int8_perplexity_and_reload(smollm_gguf, wikitext: str, float_ppl: float, tmp_path) -> None:
    lm = load_model(smollm_gguf, quantization=None)
    done = quantize_model(lm.model, "int8")
    assert len(done.quantized) == 7 * lm.config.num_layers and "lm_head" not in done.quantized
    assert all(isinstance(lm.model.get_submodule(n), Int8Linear) for n in done.quantized)
    assert abs(_change(lm, wikitext, float_ppl, "int8")) <= 0.01
    _check_reload(lm, done, Int8Linear, tmp_path)


def test_int4_g128_gptq_perplexity_and_reload(smollm_gguf, wikitext: str, float_ppl: float, tmp_path) -> None:
    lm = load_model(smollm_gguf, quantization=None)
    # 96 windows of 128 tokens, taken after the tokens perplexity scores: +7.0% here, against +6.3% with
    # the default 128 (BENCHMARKS.md) at three quarters of the time, which `make test` needs.
    calibration = calibration_sequences(lm, wikitext, count=96, start=FIRST_TOKENS)
    done = gptq_quantize(lm, calibration, group_size=128)
    assert done.rounding == "gptq" and done.group_size == 128
    assert len(done.quantized) == 7 * lm.config.num_layers and "lm_head" not in done.quantized
    layers = [lm.model.get_submodule(n) for n in done.quantized]
    assert all(isinstance(m, Int4Linear) and m.group_size == 128 for m in layers)
    assert abs(_change(lm, wikitext, float_ppl, "int4 g128 gptq")) <= 0.08
    _check_reload(lm, done, Int4Linear, tmp_path)




def test_bad_requests_leave_nothing_behind(smollm_gguf, tmp_path) -> None:
    lm = load_model(smollm_gguf, quantization=None)
    with pytest.raises(LmkError, match="group-size"):
        quantize_model(lm.model, "int4", group_size=100)
    with pytest.raises(LmkError, match="method"):
        quantize_model(lm.model, "int3")
    quantize_model(lm.model, "int8")
    with pytest.raises(LmkError, match="already quantized"):
        quantize_model(lm.model, "int4")
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(LmkError, match="--overwrite"):
        save_model_dir(lm.model, lm.config, lm.tokenizer, lm.dtype, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "no temporary directory left behind"


def test_gguf_kept_in_its_own_blocks(smollm_gguf, smollm) -> None:
    """SmolLM2 as shipped: the Q4_1 projections and the Q8_0 embedding (and head) stay in their blocks,
    the same values as the float model dequantized from the file, in about a sixth of its memory."""
    from lmkernel.layers.linear import GGUFLinear

    kept = load_model(smollm_gguf, quantization="keep")
    layers = [m for m in kept.model.modules() if isinstance(m, GGUFLinear)]
    assert len(layers) == 7 * kept.config.num_layers + 1  # and the head
    assert {m.gguf_type for m in layers} == {3, 8}  # Q4_1, Q8_0
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.7.mlp.down_proj", "lm_head"):
        ours = kept.model.get_submodule(name)
        assert torch.equal(ours.dequantized(), smollm.model.get_submodule(name).weight), name
    ids = smollm.tokenizer.encode("The European lobster is a species of clawed lobster found in")
    with torch.inference_mode():
        got, ref = torch.log_softmax(kept.logits(ids), -1), torch.log_softmax(smollm.logits(ids), -1)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9  # activations in 8 bits: close, not equal
    kl = (ref.exp() * (ref - got)).sum(-1)  # nats from the float model's next-token distribution, per position
    assert kl.max() < 0.05, kl

    def resident(model: torch.nn.Module) -> int:
        distinct = {t.data_ptr(): t for t in model.state_dict().values()}
        return sum(t.numel() * t.element_size() for t in distinct.values())

    assert resident(kept.model) < 0.2 * resident(smollm.model)
    with pytest.raises(LmkError, match="quantization"):
        load_model(smollm_gguf, quantization="int3")


def test_minilm_dynamic_int8_embeddings_and_reload(minilm_dir, minilm, phrasebank_sentences, tmp_path) -> None:
    lm = load_model(minilm_dir)
    done = quantize_model(lm.model, "int8-dynamic")
    assert len(done.quantized) == 6 * lm.config.num_layers
    assert all(isinstance(lm.model.get_submodule(n), DynamicInt8Linear) for n in done.quantized)
    sentences = phrasebank_sentences[:128]
    result = embedding_fidelity(lm, minilm, sentences)
    print(f"MiniLM dynamic int8: mean cosine {result.mean_cosine:.5f}, min {result.min_cosine:.5f}")
    assert result.mean_cosine >= 0.99 and 0.98 <= result.min_cosine < 1.0

    out = save_model_dir(lm.model, lm.config, lm.tokenizer, lm.dtype, tmp_path / "minilm-int8",
                         extra_config={"quantization_config": done.to_json()})
    again = load_model(out)
    assert all(isinstance(again.model.get_submodule(n), DynamicInt8Linear) for n in done.quantized)
    assert torch.equal(again.embed(sentences[:8]), lm.embed(sentences[:8]))




def test_quantization_config_round_trips_and_names_a_bad_field() -> None:
    from lmkernel.compress.quantize import QuantizationConfig

    config = QuantizationConfig("int4", 128, quantized=["model.layers.0.mlp.up_proj"], rounding="gptq", refine_steps=32)
    assert QuantizationConfig.from_json(config.to_json(), "config.json") == config
    with pytest.raises(LmkError, match="config.json: quantization_config.refine_steps must be a whole number"):
        QuantizationConfig.from_json({**config.to_json(), "refine_steps": "many"}, "config.json")
    with pytest.raises(LmkError, match="not one lmkernel wrote"):
        QuantizationConfig.from_json({"quant_method": "gptq"}, "config.json")
