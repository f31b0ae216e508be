"""Refining int4 scales and minimums against the float model: the quantized SmolLM2 moves closer to
float32 on text it was not tuned on, the codes stay, and the result saves and reloads exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmkernel.compress.calibrate import calibration_sequences
from lmkernel.compress.quantize import quantize_model, storage_dtypes
from lmkernel.compress.refine import refine_int4
from lmkernel.errors import LmkError
from lmkernel.layers.linear import Int4Linear
from lmkernel.loader.hf_export import save_model_dir
from lmkernel.loading import load_model

pytestmark = pytest.mark.slow  # GPTQ and its refinement: `make test` runs it, `make test-fast` does not


def float_layers(num_layers: int) -> list[str]:
    """All but the last layer stay float; only it goes to int4 (rounded to nearest, so there is much to
    recover): the backward pass stops at the first quantized layer, which keeps the test to seconds."""
    return [f"model.layers.{i}.*" for i in range(num_layers - 1)]


def _kl_to_float(lm, float_lm, windows: list[list[int]]) -> float:
    """Mean KL(float || quantized) in nats per token over `windows`."""
    total, count = 0.0, 0
    for ids in windows:
        with torch.inference_mode():
            p, q = float_lm.logits(ids).log_softmax(-1), lm.logits(ids).log_softmax(-1)
        total += float(F.kl_div(q, p, log_target=True, reduction="sum"))
        count += len(ids)
    return total / count


def test_refinement_moves_int4_closer_to_float_on_unseen_text(smollm_gguf, smollm, wikitext_lines, tmp_path) -> None:
    text = "\n".join(wikitext_lines)
    lm = load_model(smollm_gguf, quantization=None)
    done = quantize_model(lm.model, "int4", 128, skip=("lm_head", *float_layers(lm.config.num_layers)))
    assert len(done.quantized) == 7
    tune = calibration_sequences(lm, text, count=48, length=32, start=8192)
    held_out = calibration_sequences(lm, text, count=1, length=128, start=0)
    layers = {name: lm.model.get_submodule(name) for name in done.quantized}
    before = {name: (m.qweight.clone(), m.scales.clone()) for name, m in layers.items()}
    kl_before = _kl_to_float(lm, smollm, held_out)

    result = refine_int4(lm, smollm.model, tune, steps=8, lr=3e-4)

    kl_after = _kl_to_float(lm, smollm, held_out)
    print(f"held-out KL to float32: {kl_before:.4f} -> {kl_after:.4f}; training KL {result.first_kl:.4f} -> {result.last_kl:.4f}")
    assert result.steps == 8 and result.last_kl < result.first_kl
    assert kl_after < 0.85 * kl_before
    for name, m in layers.items():
        assert lm.model.get_submodule(name) is m and isinstance(m, Int4Linear)  # the int4 layers are back in place
        assert torch.equal(m.qweight, before[name][0])  # codes fixed
        assert not torch.equal(m.scales, before[name][1])

    out = save_model_dir(lm.model, lm.config, lm.tokenizer, lm.dtype, tmp_path / "refined",
                         extra_config={"quantization_config": done.to_json()}, store_as=storage_dtypes(lm.model))
    again = load_model(out)
    ids = held_out[0][:40]
    with torch.inference_mode():
        assert torch.equal(again.logits(ids), lm.logits(ids))


def test_refinement_refuses_what_it_cannot_do(smollm, minilm) -> None:
    windows = [[1, 2, 3, 4]]
    with pytest.raises(LmkError, match="has none"):
        refine_int4(smollm, smollm.model, windows, steps=1)
    with pytest.raises(LmkError, match="steps >= 1"):
        refine_int4(smollm, smollm.model, windows, steps=0)
    with pytest.raises(LmkError, match="empty"):
        refine_int4(smollm, smollm.model, [], steps=1)
    with pytest.raises(LmkError, match="encoders"):
        refine_int4(minilm, minilm.model, windows, steps=1)
