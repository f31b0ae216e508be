"""lmkernel's GGUF header reader gives what the `gguf` package's reader gives, much sooner."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from test_gguf_file import MIXED_TYPES
from tiny_gguf import write_llama_gguf

from lmkernel.loader.gguf_reader import GGUFFile


def _same_as_the_gguf_package(path) -> None:
    theirs = gguf.GGUFReader(str(path))
    ours = GGUFFile(path)
    expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata.keys() == expected.keys()
    for key, value in expected.items():
        assert ours.metadata[key] == value and type(ours.metadata[key]) is type(value), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, ref in zip(ours.tensors, theirs.tensors):
        assert (mine.tensor_type, mine.n_elements) == (ref.tensor_type, int(ref.n_elements)), ref.name
        assert mine.data.dtype == ref.data.dtype and mine.data.shape == ref.data.shape, ref.name
        assert np.array_equal(mine.data, ref.data), ref.name


def test_smollm2_file_reads_the_same(smollm_gguf) -> None:
    _same_as_the_gguf_package(smollm_gguf)


def test_every_tensor_type_reads_the_same(tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_gguf import vocabulary

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocabulary()), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    path = write_llama_gguf(tmp_path / "mixed.gguf", LlamaForCausalLM(config), MIXED_TYPES)
    _same_as_the_gguf_package(path)


@pytest.mark.parametrize("cut", [3, 30, 3000, 200_000])  # the last inside the vocabulary
def test_a_cut_header_is_a_value_error(smollm_gguf, tmp_path, cut: int) -> None:
    part = tmp_path / "cut.gguf"
    part.write_bytes(smollm_gguf.read_bytes()[:cut])
    with pytest.raises(ValueError, match="magic|past the end"):
        GGUFFile(part)
