"""The one quantize path (`lmk quantize`, `lmk bench compress`): bad requests are refused before a model
is loaded or a file written, calibration is asked for only when GPTQ or the refinement needs it, and
what it writes loads back as the model it quantized."""

from __future__ import annotations

import json

import pytest
import torch

from lmkernel.compress.calibrate import calibration_sequences
from lmkernel.compress.pipeline import QuantizeSettings, quantize_pipeline
from lmkernel.errors import LmkError
from lmkernel.layers.linear import Int4Linear, Int8Linear
from lmkernel.loading import load_model


def no_calibration(lm):
    raise AssertionError("calibration was asked for")


@pytest.mark.parametrize(("settings", "message"), [
    (QuantizeSettings("int3"), "--method must be one of"),
    (QuantizeSettings("int4", group_size=100), "--group-size"),
    (QuantizeSettings("int4", rounding="stochastic"), "--rounding must be gptq or nearest"),
    (QuantizeSettings("int8", refine_steps=2), "--refine-steps applies to int4"),
    (QuantizeSettings("int4", refine_steps=-1), "--refine-steps applies to int4"),
])
def test_refusals_come_before_loading(settings, message, tmp_path) -> None:
    with pytest.raises(LmkError, match=message):
        quantize_pipeline("no-such-model", settings, tmp_path / "out", no_calibration)
    assert not (tmp_path / "out").exists()


def test_int8_needs_no_calibration_and_reloads(smollm_gguf, tmp_path) -> None:
    lm = load_model(smollm_gguf, quantization=None)
    result = quantize_pipeline(lm, QuantizeSettings("int8"), tmp_path / "int8", no_calibration)
    assert result.refined is None and result.path == tmp_path / "int8" and len(result.config.quantized) == 210
    again = load_model(result.path)
    assert all(isinstance(again.model.get_submodule(n), Int8Linear) for n in result.config.quantized)
    ids = lm.tokenizer.encode("The European lobster is a species of clawed lobster")
    with torch.inference_mode():
        assert torch.equal(again.logits(ids), lm.logits(ids))


def test_int4_gptq_then_refined_on_the_calibration_it_asked_for(smollm_gguf, wikitext_lines, tmp_path) -> None:
    asked = []

    def calibration(lm):
        asked.append(lm)
        return calibration_sequences(lm, "\n".join(wikitext_lines[:40]), 2, 64)

    last_layer_only = ("lm_head", "model.layers.[0-9].*", "model.layers.1?.*", "model.layers.2[0-8].*")
    settings = QuantizeSettings("int4", 128, "gptq", refine_steps=1, skip=last_layer_only)
    result = quantize_pipeline(smollm_gguf, settings, tmp_path / "int4", calibration, log=print)
    assert len(asked) == 1 and result.refined is not None and result.refined.steps == 1
    config = json.loads((result.path / "config.json").read_text())["quantization_config"]
    assert config["rounding"] == "gptq" and config["refine_steps"] == 1 and config["group_size"] == 128
    assert len(config["quantized_modules"]) == 7 and all(m.startswith("model.layers.29.") for m in config["quantized_modules"])
    again = load_model(result.path)
    assert all(isinstance(again.model.get_submodule(n), Int4Linear) for n in config["quantized_modules"])
    with pytest.raises(LmkError, match="already exists"):
        quantize_pipeline(smollm_gguf, settings, tmp_path / "int4", calibration)
    assert len(asked) == 1  # refused before loading: no second calibration


def test_an_encoder_is_not_refined_by_default(minilm_dir, tmp_path) -> None:
    result = quantize_pipeline(minilm_dir, QuantizeSettings("int4", rounding="nearest"), tmp_path / "enc", no_calibration)
    assert result.refined is None and result.config.rounding == "nearest" and result.config.refine_steps == 0
