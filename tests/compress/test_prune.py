"""Unstructured pruning of SmolLM2: every row at the target sparsity, the result loads in transformers."""

from __future__ import annotations

import pytest
import torch

from lmkernel.compress.calibrate import calibration_sequences
from lmkernel.compress.prune import prune_structured, prune_unstructured
from lmkernel.errors import LmkError
from lmkernel.eval.perplexity import perplexity
from lmkernel.loader.hf_export import save_model_dir
from lmkernel.loading import load_model

pytestmark = pytest.mark.slow  # calibration runs: `make test` runs it, `make test-fast` does not


@pytest.fixture(scope="module")
def text(wikitext_lines: list[str]) -> str:
    return "\n".join(wikitext_lines)


def test_wanda_half_sparsity_per_row_and_loads_in_transformers(smollm_gguf, text: str, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    lm = load_model(smollm_gguf, quantization=None)
    dense_ppl = perplexity(lm, text, 512).perplexity
    report = prune_unstructured(lm, "wanda", 0.5, calibration_sequences(lm, text, count=8))
    assert len(report.layers) == 7 * lm.config.num_layers
    for name in report.layers:
        w = lm.model.get_submodule(name).weight
        per_row = (w == 0).sum(dim=1)
        assert (per_row >= w.shape[1] // 2).all(), f"{name}: a row below 50% zeros"
    pruned_ppl = perplexity(lm, text, 512).perplexity
    assert dense_ppl < pruned_ppl < 10 * dense_ppl  # worse, as it must be, but still a language model

    out = save_model_dir(lm.model, lm.config, lm.tokenizer, lm.dtype, tmp_path / "wanda50")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = lm.tokenizer.encode("The European lobster is a species of clawed lobster")
    with torch.inference_mode():
        theirs = hf(torch.tensor([ids])).logits[0].float()
        torch.testing.assert_close(lm.logits(ids), theirs, atol=2e-3, rtol=1e-3)
    again = load_model(out)
    with torch.inference_mode():
        assert torch.equal(again.logits(ids), lm.logits(ids))


def test_magnitude_and_bad_values(smollm_gguf) -> None:
    lm = load_model(smollm_gguf, quantization=None)
    for sparsity in (-0.1, 1.0, 1.5):
        with pytest.raises(LmkError, match="sparsity"):
            prune_unstructured(lm, "magnitude", sparsity)
    with pytest.raises(LmkError, match="calibration"):
        prune_unstructured(lm, "wanda", 0.5, [])
    with pytest.raises(LmkError, match="method"):
        prune_unstructured(lm, "random", 0.5)
    report = prune_unstructured(lm, "magnitude", 0.3)
    w = lm.model.get_submodule(report.layers[0]).weight
    assert ((w == 0).sum(dim=1) >= int(w.shape[1] * 0.3)).all()


def test_structured_prune_is_smaller_and_loads_in_transformers(smollm_gguf, text: str, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    lm = load_model(smollm_gguf, quantization=None)
    dense_ppl = perplexity(lm, text, 512).perplexity
    calibration = calibration_sequences(lm, text, count=8)
    pruned, report = prune_structured(lm, calibration, ffn=0.3, heads=0.25, layers=2)
    c = pruned.config
    assert (c.intermediate_size, c.num_heads, c.num_kv_heads, c.num_layers) == (1072, 6, 3, 28)
    assert report.heads == (9, 6) and len(report.layers_removed) == 2
    assert report.parameters[1] < 0.8 * report.parameters[0]
    assert pruned.model.model.layers[0].mlp.down_proj.weight.shape == (576, 1072)
    pruned_ppl = perplexity(pruned, text, 512).perplexity
    print(f"structured: perplexity {dense_ppl:.2f} -> {pruned_ppl:.2f}, parameters {report.parameters}")
    assert dense_ppl < pruned_ppl < 20 * dense_ppl  # damaged, as it must be, but not noise

    out = save_model_dir(pruned.model, pruned.config, pruned.tokenizer, pruned.dtype, tmp_path / "structured")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.num_hidden_layers == 28 and hf.config.num_attention_heads == 6
    ids = lm.tokenizer.encode("The European lobster is a species of clawed lobster")
    with torch.inference_mode():
        theirs = hf(torch.tensor([ids])).logits[0].float()
        torch.testing.assert_close(pruned.logits(ids), theirs, atol=2e-3, rtol=1e-3)
        assert torch.equal(load_model(out).logits(ids), pruned.logits(ids))


def test_structured_bad_values(smollm) -> None:
    lm, calibration = smollm, [[1, 2, 3, 4]]  # refused before any of it is read, so the shared model is safe
    for kwargs, field in (({"ffn": 1.0}, "ffn"), ({"heads": -0.5}, "heads"), ({"heads": 0.9}, "heads"),
                          ({"layers": 30}, "layers")):
        with pytest.raises(LmkError, match=field):
            prune_structured(lm, calibration, **kwargs)
    with pytest.raises(LmkError, match="calibration"):
        prune_structured(lm, [], ffn=0.3)
