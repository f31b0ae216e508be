"""The adapter kinds beside LoRA on disk: what lmkernel writes reads back the same, and a damaged or
foreign directory is refused naming the file and the field or tensor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lmkernel.errors import AdapterError
from lmkernel.loader.adapter import read_adapter
from lmkernel.loader.peft_kinds import PeftAdapter, PeftFields, read_any_adapter, write_peft_adapter


def _ia3(tmp_path, **changes):
    modules = {"model.layers.0.self_attn.k_proj": {"ia3_l": torch.rand(8, 1)},
               "model.layers.0.mlp.down_proj": {"ia3_l": torch.rand(1, 32)}}
    fields = PeftFields(task_type="CAUSAL_LM", target_modules=("k_proj", "down_proj"), feedforward_modules=("down_proj",))
    adapter = PeftAdapter("IA3", fields, modules, hf_architecture="LlamaForCausalLM")
    return write_peft_adapter(tmp_path / "ia3", adapter, **changes)


def test_ia3_prompt_and_bottleneck_adapters_read_back_as_written(tmp_path):
    back = read_any_adapter(_ia3(tmp_path))
    assert back.kind == "IA3" and back.config.feedforward("model.layers.0.mlp.down_proj")
    assert back.modules["model.layers.0.self_attn.k_proj"]["ia3_l"].shape == (8, 1)
    prompt = PeftAdapter("PROMPT_TUNING", PeftFields(task_type="SEQ_CLS", num_virtual_tokens=4,
                                                     modules_to_save=("classifier",)),
                         prompt=torch.randn(4, 16), saved={"classifier.weight": torch.randn(3, 16)})
    back = read_any_adapter(write_peft_adapter(tmp_path / "prompt", prompt))
    assert back.prompt.shape == (4, 16) and set(back.saved) == {"classifier.weight"}
    parts = {"adapter_down.weight": torch.randn(4, 16), "adapter_down.bias": torch.zeros(4),
             "adapter_up.weight": torch.zeros(16, 4), "adapter_up.bias": torch.zeros(16)}
    bottleneck = PeftAdapter("BOTTLENECK", PeftFields(target_modules=("o_proj",), adapter_size=4),
                             {"model.layers.0.self_attn.o_proj": parts})
    back = read_any_adapter(write_peft_adapter(tmp_path / "bn", bottleneck))
    assert back.config.adapter_size == 4 and back.config.activation == "gelu"


def test_damaged_directories_are_refused_with_the_file_and_field(tmp_path):
    directory = _ia3(tmp_path)
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "VERA"}))
    with pytest.raises(AdapterError, match="adapter_config.json: field 'peft_type' is 'VERA'"):
        read_any_adapter(directory)
    (directory / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["v_proj"]}))
    with pytest.raises(AdapterError, match="does not target"):
        read_any_adapter(directory)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file({"base_model.model.model.layers.0.self_attn.k_proj.ia3_l": torch.rand(1, 8)},
              str(directory / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"ia3_l' has shape \(1, 8\); expected \[out, 1\]"):
        read_any_adapter(directory)
    # The per-request LoRA door names what the kind needs instead.
    with pytest.raises(AdapterError, match="IA3 adapter keeps the model's shapes: it is served merged"):
        read_adapter(directory)
