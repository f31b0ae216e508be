"""adapter_config.json's fields beyond tests/loader/test_adapter.py: defaults, per-module rank and alpha as peft
looks them up, exclusion and modules_to_save in target matching, and the errors naming each bad field."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmkernel.errors import AdapterError
from lmkernel.loader.adapter_config import PEFT_FORMAT_VERSION, AdapterConfig, is_target

PATH = Path("run/adapter_config.json")
NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.10.self_attn.q_proj",
         "model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj", "lm_head", "score", "classifier",
         "bert.encoder.layer.0.attention.self.query", "cls.predictions.decoder", "classifier.dense", "model.classifier"]


def _read(**fields: object) -> AdapterConfig:
    return AdapterConfig.from_json({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], **fields}, PATH)


def test_defaults_of_a_minimal_file() -> None:
    config = _read()
    assert config == AdapterConfig(r=4, lora_alpha=8.0, target_modules=("q_proj",))
    assert (config.lora_dropout, config.modules_to_save, config.exclude_modules, config.use_rslora,
            config.fan_in_fan_out, config.inference_mode, config.base_model_name_or_path) == \
        (0.0, (), None, False, False, True, None)
    assert type(config.lora_alpha) is float


def test_fields_are_read_as_written() -> None:
    config = _read(lora_alpha=16, lora_dropout=0.1, task_type="SEQ_CLS", modules_to_save=["classifier"],
                   base_model_name_or_path="HuggingFaceTB/SmolLM2-135M", use_rslora=True, fan_in_fan_out=True,
                   exclude_modules=[], rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3.5},
                   inference_mode=False, init_lora_weights="gaussian", bias="none", use_dora=False)
    assert config == AdapterConfig(r=4, lora_alpha=16.0, target_modules=("q_proj",), lora_dropout=0.1,
                                   task_type="SEQ_CLS", modules_to_save=("classifier",),
                                   base_model_name_or_path="HuggingFaceTB/SmolLM2-135M", use_rslora=True,
                                   fan_in_fan_out=True, exclude_modules=None, rank_pattern={"down_proj": 2},
                                   alpha_pattern={"q_proj": 3.5}, inference_mode=False)


def test_to_json_round_trips_through_from_json() -> None:
    config = AdapterConfig(r=8, lora_alpha=16.0, target_modules=r".*\.(q|v)_proj", lora_dropout=0.05,
                           task_type="CAUSAL_LM", modules_to_save=("lm_head",), exclude_modules=("down_proj",),
                           rank_pattern={"v_proj": 4}, alpha_pattern={"v_proj": 8.0}, use_rslora=True)
    written = config.to_json()
    assert (written["peft_type"], written["peft_version"], written["bias"], written["use_dora"]) == \
        ("LORA", PEFT_FORMAT_VERSION, "none", False)
    assert written["target_modules"] == r".*\.(q|v)_proj" and written["exclude_modules"] == ["down_proj"]
    assert written["modules_to_save"] == ["lm_head"]
    assert AdapterConfig.from_json(written, PATH) == config
    assert AdapterConfig(r=1, lora_alpha=1.0, target_modules=("a",)).to_json()["modules_to_save"] is None


def test_rank_and_alpha_patterns_match_as_peft_looks_them_up() -> None:
    """peft's get_pattern_key: the first pattern that matches the name's tail after a dot, else the default."""
    ranks = {"down_proj": 2, r"layers\.1\d\.self_attn\.q_proj": 16, "k_proj": 3}
    alphas = {"q_proj": 5.0, "mlp.up_proj": 7.0}
    config = _read(r=8, lora_alpha=32, rank_pattern=ranks, alpha_pattern=alphas)
    expected = {  # name: (rank, alpha)
        "model.layers.0.self_attn.q_proj": (8, 5.0), "model.layers.0.self_attn.k_proj": (3, 32.0),
        "model.layers.10.self_attn.q_proj": (16, 5.0), "model.layers.1.mlp.down_proj": (2, 32.0),
        "model.layers.1.mlp.up_proj": (8, 7.0), "model.layers.1.mlp.gate_up_proj": (8, 32.0),
        "model.layers.1.mlp.xdown_proj": (8, 32.0), "down_proj": (2, 32.0), "lm_head": (8, 32.0),
    }
    assert {name: (config.rank(name), config.alpha(name)) for name in expected} == expected
    first = _read(r=8, rank_pattern={"proj": 1, "q_proj": 2, r".*q_proj": 3})
    assert first.rank("a.q_proj") == 2 and first.rank("aq_proj") == 3  # the first that matches wins


@pytest.mark.parametrize(("targets", "exclude", "saved", "picked"), [
    (("q_proj", "query", "down_proj"), r".*layers\.1\..*", (),
     {"model.layers.0.self_attn.q_proj", "model.layers.10.self_attn.q_proj",
      "bert.encoder.layer.0.attention.self.query"}),
    (("q_proj", "k_proj"), ("model.layers.0.self_attn.k_proj",), (),
     {"model.layers.0.self_attn.q_proj", "model.layers.10.self_attn.q_proj"}),
    ("all-linear", ("down_proj",), ("classifier",),
     {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.10.self_attn.q_proj",
      "model.layers.1.mlp.up_proj", "bert.encoder.layer.0.attention.self.query"}),
    (r".*(proj|dense)", None, ("classifier",),
     {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.10.self_attn.q_proj",
      "model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"}),
])
def test_exclusion_and_saved_modules(targets, exclude, saved, picked: set[str]) -> None:
    """Excluded names (a regex over the whole name, or names matched at the end) and everything inside a module
    peft saves whole are never targets; all-linear leaves out the output layers. (Target matching itself is
    compared with peft's in tests/loader/test_adapter.py.)"""
    assert {name for name in NAMES if is_target(name, targets, saved, exclude)} == picked
    if isinstance(exclude, tuple) or saved:
        config = _read(target_modules=targets if isinstance(targets, str) else list(targets),
                       exclude_modules=exclude if isinstance(exclude, str) or exclude is None else list(exclude),
                       modules_to_save=list(saved))
        assert {name for name in NAMES if config.targets(name)} == picked


def test_targets_match_whole_names_or_dotted_suffixes_only() -> None:
    assert is_target("model.layers.0.self_attn.q_proj", ("self_attn.q_proj",))
    assert not is_target("model.layers.0.self_attn.xq_proj", ("q_proj",))
    assert is_target("q_proj", ("q_proj",))
    assert not is_target("model.q_proj.lora", ("q_proj",))
    assert not is_target("model.layers.0.q_proj", r"q_proj")  # a regex matches the whole name
    assert is_target("lm_head_extra", "all-linear") and not is_target("model.lm_head", "all-linear")


@pytest.mark.parametrize(("fields", "message"), [
    ({"peft_type": None}, "field 'peft_type' is None; expected 'LORA' (lmkernel reads LoRA adapters only)"),
    ({"r": True}, "field 'r' is True; expected a positive integer"),
    ({"r": 2.0}, "field 'r' is 2.0; expected a positive integer"),
    ({"lora_alpha": "16"}, "field 'lora_alpha' is '16'; expected a number"),
    ({"lora_alpha": False}, "field 'lora_alpha' is False; expected a number"),
    ({"lora_dropout": 1.0}, "field 'lora_dropout' is 1.0; expected a number in [0, 1)"),
    ({"lora_dropout": -0.1}, "field 'lora_dropout' is -0.1; expected a number in [0, 1)"),
    ({"modules_to_save": "lm_head"}, "field 'modules_to_save' is 'lm_head'; expected null or a list of module names"),
    ({"modules_to_save": [""]}, "field 'modules_to_save' is ['']; expected null or a list of module names"),
    ({"rank_pattern": {"q_proj": "4"}}, "field 'rank_pattern' is {'q_proj': '4'}; expected an object of module "
                                        "patterns to numbers"),
    ({"alpha_pattern": [1]}, "field 'alpha_pattern' is [1]; expected an object of module patterns to numbers"),
    ({"target_modules": None}, "field 'target_modules' is None; expected a list of module names or a regular expression"),
    ({"target_modules": ["q_proj", 3]}, "field 'target_modules' is ['q_proj', 3]; expected a list of module names or a "
                                        "regular expression"),
    ({"exclude_modules": ""}, "field 'exclude_modules' is ''; expected a list of module names or a regular expression"),
    ({"exclude_modules": "(("}, "field 'exclude_modules' is not a valid regular expression (missing ), unterminated "
                                "subpattern at position 1)"),
    ({"bias": "lora_only"}, "field 'bias' is 'lora_only'; expected 'none' (lmkernel does not train or load biases of "
                            "LoRA layers)"),
    ({"init_lora_weights": "olora"}, "field 'init_lora_weights' is 'olora'; expected an adapter on the unchanged base"),
    ({"init_lora_weights": "corda"}, "field 'init_lora_weights' is 'corda'"),
    ({"init_lora_weights": "loftq"}, "field 'init_lora_weights' is 'loftq'"),
    ({"layers_to_transform": [0, 1]}, "field 'layers_to_transform' is [0, 1]; lmkernel supports plain LoRA only, "
                                      "without it"),
    ({"use_rslora": True, "lora_bias": True}, "field 'lora_bias' is True; lmkernel supports plain LoRA only"),
    ({"target_parameters": ["experts.w"]}, "field 'target_parameters'"),
])
def test_bad_fields_are_named_with_the_file(fields: dict, message: str) -> None:
    with pytest.raises(AdapterError) as err:
        _read(**fields)
    assert str(err.value).startswith(f"{PATH}: {message}")


@pytest.mark.parametrize("falsy", [{"use_dora": False}, {"layers_to_transform": None}, {"trainable_token_indices": []},
                                   {"init_lora_weights": True}, {"init_lora_weights": "gaussian"}, {"exclude_modules": None}])
def test_unsupported_features_left_off_are_accepted(falsy: dict) -> None:
    assert _read(**falsy).r == 4
