"""Quantizing SmolLM2: quality measured on WikiText-2, a saved model reloads to identical logits,
and bad requests fail cleanly with nothing half-written."""

from __future__ import annotations

import json

import pytest
import torch

from lmkernel.compress.quantize import quantize_model
from lmkernel.errors import LmkError
from lmkernel.eval.perplexity import perplexity
from lmkernel.layers.linear import Int4Linear, Int8Linear
from lmkernel.loader.hf_export import save_model_dir
from lmkernel.loading import load_model

FIRST_TOKENS = 4096


@pytest.fixture(scope="module")
def wikitext(wikitext_lines: list[str]) -> str:
    return "\n".join(wikitext_lines)


@pytest.fixture(scope="module")
def float_ppl(smollm, wikitext: str) -> float:
    return perplexity(smollm, wikitext, FIRST_TOKENS).perplexity


# SmolLM2 ships as Q4_1, 4-bit in blocks of 32: int4 in groups of 32 lands on the same grid, so it
# must lose (almost) nothing; that checks the whole int4 path. Groups of 128 lose far more on this
# model (see BENCHMARKS.md), which is why the 8% target for them is still open.
@pytest.mark.parametrize(("method", "group", "budget"), [("int8", None, 0.01), ("int4", 32, 0.01)])
def test_quantized_perplexity_and_reload(smollm_gguf, wikitext: str, float_ppl: float, method: str, group: int | None,
                                         budget: float, tmp_path) -> None:
    lm = load_model(smollm_gguf)
    done = quantize_model(lm.model, method, group_size=group)
    kind = Int8Linear if method == "int8" else Int4Linear
    assert len(done.quantized) == 7 * lm.config.num_layers and "lm_head" not in done.quantized
    assert all(isinstance(lm.model.get_submodule(n), kind) for n in done.quantized)
    result = perplexity(lm, wikitext, FIRST_TOKENS)
    change = result.perplexity / float_ppl - 1
    print(f"{method}: perplexity {result.perplexity:.4f} vs float {float_ppl:.4f} ({change:+.2%}) over {result.tokens} tokens")
    assert result.tokens == FIRST_TOKENS - 1
    assert abs(change) <= budget

    out = save_model_dir(lm.model, lm.config, lm.tokenizer, lm.dtype, tmp_path / method,
                         extra_config={"quantization_config": done.to_json()})
    assert json.loads((out / "config.json").read_text())["quantization_config"]["method"] == method
    again = load_model(out)
    assert all(isinstance(again.model.get_submodule(n), kind) for n in done.quantized)
    ids = lm.tokenizer.encode("The European lobster is a species of clawed lobster")
    with torch.inference_mode():
        assert torch.equal(again.logits(ids), lm.logits(ids))
    assert again.tokenizer.encode("Hello there") == lm.tokenizer.encode("Hello there")


def test_bad_requests_leave_nothing_behind(smollm_gguf, tmp_path) -> None:
    lm = load_model(smollm_gguf)
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


def test_gguf_kept_in_its_4_bits(smollm_gguf, smollm) -> None:
    kept = load_model(smollm_gguf, quantization="keep")
    layers = [m for m in kept.model.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 7 * kept.config.num_layers and all(m.group_size == 32 for m in layers)
    assert not isinstance(kept.model.lm_head, Int4Linear)
    ids = smollm.tokenizer.encode("The European lobster is a species of clawed lobster found in")
    with torch.inference_mode():
        diff = (kept.logits(ids) - smollm.logits(ids)).abs().max()
    assert diff <= 1e-3, "the same 4-bit values as the float model dequantized from the file"
    q_proj = kept.model.model.layers[0].self_attn.q_proj
    dense = smollm.model.model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(q_proj.dequantized(), dense, atol=1e-6)
    def resident(model: torch.nn.Module) -> int:
        distinct = {t.data_ptr(): t for t in model.state_dict().values()}
        return sum(t.numel() * t.element_size() for t in distinct.values())

    assert resident(kept.model) < 0.4 * resident(smollm.model)
    with pytest.raises(LmkError, match="quantization"):
        load_model(smollm_gguf, quantization="int3")
