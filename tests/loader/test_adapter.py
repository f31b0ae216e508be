"""The PEFT adapter format: what we write peft reads (config keys, tensor names), targets match as peft
matches them, and every bad input is one clear error naming the file and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmkernel.config import ModelConfig
from lmkernel.errors import AdapterError
from lmkernel.loader.adapter import (
    CONFIG_FILE,
    SIDECAR_FILE,
    WEIGHTS_FILE,
    AdapterConfig,
    LoraAdapter,
    hf_names,
    match_adapter,
    read_adapter,
    write_adapter,
)

LLAMA = ModelConfig("llama", 100, 8, 16, 1, 2, 2, 4, 64, hf_architecture="LlamaForCausalLM")
BERT = ModelConfig("bert", 100, 8, 16, 1, 2, 2, 4, 64, hf_architecture="BertModel")
LINEARS = {"model.layers.0.self_attn.q_proj": (8, 8), "model.layers.0.self_attn.v_proj": (8, 8),
           "model.layers.0.mlp.down_proj": (16, 8), "lm_head": (8, 100)}


def _adapter(tmp_path: Path, **config: object) -> Path:
    cfg = AdapterConfig(**{"r": 2, "lora_alpha": 4.0, "target_modules": ("q_proj", "v_proj"), "task_type": "CAUSAL_LM",
                           "base_model_name_or_path": "smollm2-135m-instruct", **config})
    g = torch.Generator().manual_seed(0)
    lora = {n: (torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g))
            for n in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")}
    return write_adapter(tmp_path / "adapter", LoraAdapter(cfg, lora, {"lm_head.weight": torch.ones(100, 8)},
                                                            "LlamaForCausalLM", {0: "a"}))


def test_written_adapter_reads_back_and_peft_reads_its_config(tmp_path):
    from peft import LoraConfig

    path = _adapter(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, SIDECAR_FILE])
    back = read_adapter(path)
    assert back.config.r == 2 and back.config.lora_alpha == 4.0 and back.config.target_modules == ("q_proj", "v_proj")
    assert set(back.lora) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}
    assert back.hf_architecture == "LlamaForCausalLM" and back.id2label == {0: "a"}
    assert torch.equal(back.saved["lm_head.weight"], torch.ones(100, 8))
    keys = set(load_file(path / WEIGHTS_FILE))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.lm_head.weight" in keys
    written = json.loads((path / CONFIG_FILE).read_text())
    peft_cfg = LoraConfig.from_pretrained(path)
    assert set(written) == set(LoraConfig(r=2).to_dict())  # every key peft writes, no other
    assert (peft_cfg.r, peft_cfg.lora_alpha, peft_cfg.task_type) == (2, 4.0, "CAUSAL_LM")
    assert set(peft_cfg.target_modules) == {"q_proj", "v_proj"} and written["peft_type"] == "LORA"
    assert not list(tmp_path.glob(".adapter*"))  # no temporary directory left behind
    with pytest.raises(Exception, match="already exists"):
        _adapter(tmp_path)


@pytest.mark.parametrize("config", [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": r".*\.(q|v)_proj"},
    {"target_modules": ["self_attn.q_proj", "down_proj"], "exclude_modules": ["down_proj"]},
    {"target_modules": "all-linear", "task_type": "CAUSAL_LM"},
    {"target_modules": ["q_proj", "lm_head"], "modules_to_save": ["lm_head"]},
])
def test_targets_match_as_peft_matches_them(config):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    ours = AdapterConfig.from_json({"peft_type": "LORA", "r": 2, **config}, Path("adapter_config.json"))
    theirs = LoraConfig(r=2, **config)
    for name in LINEARS:
        if config["target_modules"] == "all-linear":  # peft expands it against the model: all but the output layer
            assert ours.targets(name) == (name != "lm_head")
        else:
            assert ours.targets(name) == bool(check_target_module_exists(theirs, name)), name


def test_bare_bert_names_drop_our_prefix():
    names = ["bert.encoder.layer.0.attention.self.query", "classifier"]
    assert hf_names(names, BERT, "BertModel") == {names[0]: "encoder.layer.0.attention.self.query", "classifier": "classifier"}
    assert hf_names(names, BERT, "BertForSequenceClassification") == {n: n for n in names}


def _edit_config(path: Path, **changes: object) -> None:
    raw = json.loads((path / CONFIG_FILE).read_text())
    raw.update(changes)
    (path / CONFIG_FILE).write_text(json.dumps(raw))


@pytest.mark.parametrize(("changes", "field"), [
    ({"peft_type": "IA3"}, "peft_type"),
    ({"r": 0}, "'r'"),
    ({"use_dora": True}, "use_dora"),
    ({"bias": "all"}, "bias"),
    ({"target_modules": []}, "target_modules"),
    ({"target_modules": "q_proj(("}, "target_modules"),
    ({"lora_dropout": 2}, "lora_dropout"),
    ({"r": 4}, "'r'"),  # the tensors have rank 2
    ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights"),  # needs a changed base
])
def test_bad_config_fields_are_named(tmp_path, changes, field):
    path = _adapter(tmp_path)
    _edit_config(path, **changes)
    with pytest.raises(AdapterError, match=field) as err:
        read_adapter(path)
    assert str(path) in str(err.value) and "Traceback" not in str(err.value)


def test_bad_files_and_tensors_are_named(tmp_path):
    with pytest.raises(AdapterError, match=f"no {CONFIG_FILE}"):
        read_adapter(tmp_path / "missing")
    path = _adapter(tmp_path)
    (path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(AdapterError, match=f"{CONFIG_FILE}: cannot read as JSON"):
        read_adapter(path)
    path = _adapter(tmp_path / "b")
    tensors = load_file(path / WEIGHTS_FILE)
    del tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, str(path / WEIGHTS_FILE))
    with pytest.raises(AdapterError, match=r"v_proj\.lora_B\.weight' is missing") as err:
        read_adapter(path)
    assert WEIGHTS_FILE in str(err.value)
    save_file({"model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 8)}, str(path / WEIGHTS_FILE))
    with pytest.raises(AdapterError, match="does not start with 'base_model.model.'"):
        read_adapter(path)
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(AdapterError, match=f"no {WEIGHTS_FILE}"):
        read_adapter(path)
    (path / WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(Exception, match=WEIGHTS_FILE):
        read_adapter(path)


def test_adapter_that_does_not_fit_the_model_is_named(tmp_path):
    adapter = read_adapter(_adapter(tmp_path))
    assert [t.name for t in match_adapter(adapter, LINEARS, LLAMA)] == ["model.layers.0.self_attn.q_proj",
                                                                       "model.layers.0.self_attn.v_proj"]
    assert match_adapter(adapter, LINEARS, LLAMA)[0].scaling == 2.0
    no_v = {k: v for k, v in LINEARS.items() if "v_proj" not in k}
    with pytest.raises(AdapterError, match=r"v_proj.lora_A.weight' is for module .*no linear layer") as err:
        match_adapter(adapter, no_v, LLAMA)
    assert WEIGHTS_FILE in str(err.value)
    wider = {**LINEARS, "model.layers.0.self_attn.q_proj": (16, 8)}
    with pytest.raises(AdapterError, match=r"q_proj': lora_A \(2, 8\) .* 16 inputs and 8 outputs"):
        match_adapter(adapter, wider, LLAMA)
    with pytest.raises(AdapterError, match="'target_modules' .* matches no linear layer") as err:
        match_adapter(adapter, {"lm_head": (8, 100)}, LLAMA)
    assert CONFIG_FILE in str(err.value)
    narrower = LoraAdapter(AdapterConfig(r=2, lora_alpha=4.0, target_modules=("q_proj",)), adapter.lora, path=adapter.path)
    with pytest.raises(AdapterError, match=r"v_proj', which field 'target_modules' .* does not target"):
        match_adapter(narrower, LINEARS, LLAMA)


def test_unreadable_adapter_paths_are_adapter_errors(tmp_path) -> None:
    """A path the filesystem refuses (a name too long) is a clear AdapterError, never an OSError."""
    with pytest.raises(AdapterError, match="cannot read it as an adapter directory"):
        read_adapter(tmp_path / ("x" * 300))
