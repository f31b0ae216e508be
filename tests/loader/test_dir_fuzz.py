"""Fuzzing Hugging Face model directories (config.json, safetensors headers) and PEFT adapter directories
(adapter_config.json, adapter weights): each seeded mutation must load and run, or end in a clear `LmkError`
naming the file, never another exception or a crash."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
from dir_mutations import mutate_dir
from fuzzing import campaign
from lora_checks import random_llama_adapter

from lmkernel import LLM, SamplingParams, load_model
from lmkernel.errors import LmkError

MUTANTS = int(os.environ.get("LMK_FUZZ_MUTANTS", "40"))
PARAMS = [SamplingParams(temperature=0, max_tokens=2), SamplingParams(temperature=1.0, max_tokens=2, seed=3)]


@pytest.fixture(scope="module")
def hf_model(tiny_llama, minilm_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("hf") / "tiny"
    tiny_llama.save_pretrained(directory)
    shutil.copy(minilm_dir / "tokenizer.json", directory / "tokenizer.json")
    (directory / "tokenizer_config.json").write_text('{"eos_token": "[SEP]", "chat_template": "{{ messages[0].content }}"}')
    return directory


def _campaign(source: Path, tmp_path: Path, run) -> Counter[str]:
    def mutant(seed: int) -> tuple[Path, str]:
        target = tmp_path / f"mutant-{seed}"
        return target, mutate_dir(source, target, seed)

    return campaign(MUTANTS, mutant, run)


@pytest.mark.slow  # a campaign: make test runs it, make test-fast does not
def test_mutated_model_directories_load_and_run_or_are_refused(hf_model: Path, tmp_path: Path) -> None:
    def run(directory: Path) -> None:
        llm = LLM(load_model(directory), kv_cache_memory="4MiB", verbose=False)
        llm.generate([[5, 6, 7]] * 2, PARAMS)

    run(hf_model)
    outcomes = _campaign(hf_model, tmp_path, run)
    assert outcomes["refused"] and outcomes["ran"], outcomes


@pytest.mark.slow
def test_mutated_adapter_directories_load_and_run_or_are_refused(smollm, tmp_path: Path) -> None:
    adapter = random_llama_adapter(tmp_path / "adapter", smollm.config, seed=2)

    def run(directory: Path) -> None:
        llm = LLM(smollm, lora={"a": str(directory)}, kv_cache_memory="16MiB", verbose=False)
        llm.generate([[5, 6, 7]] * 2, [SamplingParams(temperature=0, max_tokens=2, lora="a")] * 2)

    run(adapter)
    outcomes = _campaign(adapter, tmp_path, run)
    assert outcomes["refused"] and outcomes["ran"], outcomes


@pytest.mark.parametrize(("key", "value", "message"), [
    ("num_hidden_layers", 2**31, "num_hidden_layers is 2147483648, but the weight files hold layers 0..1"),  # was a hang
    ("intermediate_size", 2**63, "'intermediate_size' does not describe a model"),  # was a TypeError from torch.empty
    ("hidden_act", [1, 2], "'hidden_act' does not describe a model"),  # was "unhashable type: 'list'"
    ("architectures", [[1, 2]], "'architectures' does not describe a model"),  # was an AttributeError
    ("vocab_size", 7, "do not fit the weight files' embedding table"),
    ("num_key_value_heads", 3, "'num_key_value_heads' does not describe a model"),
    ("max_position_embeddings", 2**40, "'max_position_embeddings' does not describe a model"),
    ("hidden_size", "wide", "config.json: a value does not describe a model"),
])
def test_crafted_config_values_are_refused_before_a_model_is_built(hf_model: Path, tmp_path: Path, key, value, message) -> None:
    import json

    target = tmp_path / "crafted"
    shutil.copytree(hf_model, target)
    config = json.loads((target / "config.json").read_text())
    config[key] = value
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(LmkError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_model(target)


@pytest.mark.parametrize("window", [-5, 0, "wide", 2.5])
def test_a_crafted_sliding_window_is_refused_before_a_model_is_built(hf_model: Path, tmp_path: Path, window) -> None:
    import json

    target = tmp_path / "window"
    shutil.copytree(hf_model, target)
    config = json.loads((target / "config.json").read_text())
    config |= {"sliding_window": window, "use_sliding_window": True}
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(LmkError, match="'sliding_window' does not describe a model|a value does not describe a model"):
        load_model(target)
