"""QuantizationConfig's config.json form, and build_quantized giving a fresh model the checkpoint's layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmkernel.errors import LmkError
from lmkernel.layers.linear import DynamicInt8Linear, Int4Linear, Int8Linear
from lmkernel.layers.quantized import DEFAULT_SKIP, QuantizationConfig, build_quantized


def test_to_json_writes_every_field_under_peft_style_keys() -> None:
    config = QuantizationConfig("int8", None, skip=("lm_head",), quantized=["a.b"], rounding="nearest")
    assert config.to_json() == {"quant_method": "lmkernel", "method": "int8", "group_size": None, "rounding": "nearest",
                                "refine_steps": 0, "modules_not_converted": ["lm_head"], "quantized_modules": ["a.b"]}


def test_from_json_fills_defaults_for_keys_an_older_file_leaves_out() -> None:
    config = QuantizationConfig.from_json({"quant_method": "lmkernel", "method": "int8-dynamic"}, "config.json")
    assert config == QuantizationConfig("int8-dynamic", None, (), [], "nearest", 0)
    assert QuantizationConfig("int4").skip == DEFAULT_SKIP == ("lm_head", "*.decoder", "classifier", "*.pooler.dense")


@pytest.mark.parametrize("data", [
    {"quant_method": "lmkernel", "method": "int2"},
    {"quant_method": "awq", "method": "int4"},
    {"method": "int8"},
])
def test_a_config_lmkernel_did_not_write_is_named(data: dict) -> None:
    with pytest.raises(LmkError) as err:
        QuantizationConfig.from_json(data, "m/config.json")
    assert str(err.value) == (f"m/config.json: quantization_config {data} is not one lmkernel wrote (expected "
                              "quant_method 'lmkernel' and method in ('int8', 'int4', 'int8-dynamic'))")


@pytest.mark.parametrize("steps", [-1, 1.5, None, True])
def test_refine_steps_must_be_a_whole_number_at_least_zero(steps: object) -> None:
    data = {"quant_method": "lmkernel", "method": "int4", "refine_steps": steps}
    with pytest.raises(LmkError, match=rf"^m: quantization_config.refine_steps must be a whole number >= 0; got {steps!r}$"):
        QuantizationConfig.from_json(data, "m")


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 32, bias=True)
        self.down = nn.Linear(32, 64, bias=False, dtype=torch.bfloat16)
        self.norm = nn.LayerNorm(64)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.lm_head = nn.Linear(64, 10)


@pytest.mark.parametrize(("method", "group", "kind"), [
    ("int8", None, Int8Linear), ("int8-dynamic", None, DynamicInt8Linear), ("int4", 32, Int4Linear),
])
def test_named_linears_become_the_methods_layers_of_the_same_shape(method: str, group: int | None, kind: type) -> None:
    model = _Model()
    names = ["layers.0.up", "layers.1.down", "lm_head"]
    build_quantized(model, QuantizationConfig(method, group, quantized=names))
    for name, (i, o, bias, dtype) in zip(names, [(64, 32, True, torch.float32), (32, 64, False, torch.bfloat16),
                                                  (64, 10, True, torch.float32)]):
        layer = model.get_submodule(name)
        assert type(layer) is kind
        assert (layer.in_features, layer.out_features, layer.bias is not None) == (i, o, bias)
        scale = layer.weight_scale if kind is not Int4Linear else layer.scales
        assert scale.dtype == dtype
    # the others stay as they were
    assert type(model.layers[0].down) is nn.Linear and type(model.layers[1].up) is nn.Linear


def test_int8_keeps_its_group_size_int4_defaults_to_128_dynamic_has_none() -> None:
    model = _Model()
    build_quantized(model, QuantizationConfig("int8", 32, quantized=["layers.0.up"]))
    assert model.layers[0].up.group_size == 32 and model.layers[0].up.weight_scale.shape == (32, 2)
    build_quantized(model, QuantizationConfig("int8-dynamic", 32, quantized=["layers.1.up"]))
    assert model.layers[1].up.group_size is None and model.layers[1].up.weight_scale.shape == (32,)
    build_quantized(model, QuantizationConfig("int4", None, quantized=["lm_head"]))
    assert model.lm_head.group_size == 128 and model.lm_head.scales.shape == (10, 1)


def test_the_state_dict_then_holds_the_quantized_checkpoints_keys() -> None:
    model = _Model()
    build_quantized(model, QuantizationConfig("int8", None, quantized=["layers.0.up", "lm_head"]))
    sd = model.state_dict()
    assert sd["layers.0.up.weight"].dtype == torch.int8 and sd["layers.0.up.weight"].shape == (32, 64)
    assert sd["layers.0.up.weight_scale"].shape == (32,) and sd["lm_head.bias"].shape == (10,)


def test_a_top_level_module_name_is_replaced_on_the_model_itself() -> None:
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(8, 4))
    build_quantized(model, QuantizationConfig("int8", None, quantized=["proj"]))
    assert type(model.proj) is Int8Linear


def test_a_missing_or_non_linear_module_is_named() -> None:
    with pytest.raises(LmkError, match=r"^quantization_config names module 'layers.5.up', which this architecture "
                                       r"does not have$"):
        build_quantized(_Model(), QuantizationConfig("int8", quantized=["layers.5.up"]))
    with pytest.raises(LmkError, match=r"^quantization_config names module 'layers.0.norm', which is not a linear layer$"):
        build_quantized(_Model(), QuantizationConfig("int8", quantized=["layers.0.norm"]))
