"""lmkernel.bench.peers.load_hf_causal_lm: transformers' model from the same directory or GGUF file, in eval mode; the missing-extra error."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lmkernel.bench.peers import load_hf_causal_lm
from lmkernel.errors import LmkError
from lmkernel.registry import ModelSource


def test_without_transformers_the_error_names_the_dev_extra(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(LmkError) as err:
        load_hf_causal_lm(ModelSource("m", tmp_path, "hf_dir"), torch.float32)
    assert str(err.value) == "the transformers peer is not installed: pip install -e '.[dev]'"


def test_a_directory_loads_in_eval_mode_with_its_weights_in_the_dtype(tiny_llama, tmp_path: Path) -> None:
    tiny_llama.save_pretrained(tmp_path)
    expected = tiny_llama.state_dict()
    for dtype in (torch.float32, torch.bfloat16):
        model = load_hf_causal_lm(ModelSource("tiny", tmp_path, "hf_dir"), dtype)
        assert not model.training and not any(m.training for m in model.modules())
        got = model.state_dict()
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            assert got[name].dtype == dtype and torch.equal(got[name], tensor.to(dtype)), name


def test_a_gguf_file_is_read_from_its_folder_by_name(monkeypatch) -> None:
    import transformers

    asked = []

    def from_pretrained(path, **kwargs):
        asked.append((path, kwargs))
        return torch.nn.Linear(2, 2).train()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    model = load_hf_causal_lm(ModelSource("m", Path("/models/smol/model-q4.gguf"), "gguf"), torch.bfloat16)
    assert asked == [(Path("/models/smol"), {"gguf_file": "model-q4.gguf", "dtype": torch.bfloat16})]
    assert not model.training
