"""Hugging Face directories: config parsing, sharded weights, and clear errors for bad files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from lmkernel import load_model
from lmkernel.errors import UnsupportedModelError, WeightsError
from lmkernel.loader import hf_config, hf_dir


def _copy_minilm(minilm_dir, dest):
    shutil.copytree(minilm_dir, dest)
    return dest


def test_minilm_config(minilm_dir):
    c = hf_config.parse_config(minilm_dir)
    assert (c.architecture, c.hidden_size, c.num_layers, c.num_heads, c.vocab_size) == ("bert", 384, 6, 12, 30522)
    assert c.pooling == "mean" and c.normalize_embeddings and c.max_seq_length == 256
    assert c.stored_dtype == "float32"
    assert hf_dir.parameter_count(minilm_dir) == 22_713_216


def test_sharded_weights_with_index_load_like_one_file(tmp_path, minilm_dir):
    sharded = _copy_minilm(minilm_dir, tmp_path / "sharded")
    tensors = hf_dir.load_tensors(minilm_dir, torch.float32)
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    (sharded / "model.safetensors").unlink()
    for file, keys in halves.items():
        save_file({k: tensors[k].contiguous() for k in keys}, str(sharded / file))
    index = {"metadata": {}, "weight_map": {k: f for f, ks in halves.items() for k in ks}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert len(hf_dir.weight_files(sharded)) == 2
    texts = ["Sharded checkpoints load the same.", "Operating profit rose."]
    torch.testing.assert_close(load_model(sharded).embed(texts), load_model(minilm_dir).embed(texts), atol=0, rtol=0)


def test_index_naming_a_missing_shard(tmp_path, minilm_dir):
    d = _copy_minilm(minilm_dir, tmp_path / "m")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00009-of-00009.safetensors"}}))
    with pytest.raises(WeightsError, match=r"model-00009-of-00009\.safetensors"):
        load_model(d)


def test_truncated_safetensors_names_file_and_sizes(tmp_path, minilm_dir):
    d = _copy_minilm(minilm_dir, tmp_path / "m")
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError) as err:
        load_model(d)
    message = str(err.value)
    assert str(weights) in message and "truncated" in message and str(len(data) // 2) in message


def test_unsupported_architecture(tmp_path, minilm_dir):
    d = _copy_minilm(minilm_dir, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "t5"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError) as err:
        load_model(d)
    assert str(d / "config.json") in str(err.value) and "'t5'" in str(err.value) and "llama" in str(err.value)


def test_broken_config_json(tmp_path, minilm_dir):
    d = _copy_minilm(minilm_dir, tmp_path / "m")
    (d / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match=r"config\.json: cannot read as JSON"):
        load_model(d)


def test_weights_that_do_not_fit_the_config(tmp_path, minilm_dir):
    d = _copy_minilm(minilm_dir, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config["hidden_size"] = 768
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError) as err:
        load_model(d)
    assert str(d) in str(err.value) and "hidden size 768" in str(err.value)
    assert "word_embeddings.weight' of shape [30522, 384]" in str(err.value)
