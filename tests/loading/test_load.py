"""load.py's own pieces: dtype and device names, and `describe` reading headers only."""

from __future__ import annotations

import pytest
import torch

from lmkernel import LmkError
from lmkernel.loading import describe, resolve_dtype
from lmkernel.loading.load import resolve_device
from lmkernel.registry import resolve


def test_describe_reads_headers_only(smollm_gguf, minilm_dir):
    smol = describe(resolve(smollm_gguf))
    assert smol["architecture"].startswith("llama") and "Q4_1" in smol["stored dtype"]
    assert smol["vocabulary size"] == 49152 and smol["context length"] == 8192 and smol["chat template"] == "yes"
    assert smol["parameters"].startswith("134,515,008")
    mini = describe(resolve(minilm_dir))
    assert mini["architecture"].startswith("bert") and mini["stored dtype"] == "float32"
    assert mini["chat template"] == "no" and mini["context length"] == 512


def test_resolve_dtype_names_and_torch_dtypes():
    assert [resolve_dtype(n) for n in ("float32", "bfloat16", "float16", "torch.float16")] == [
        torch.float32, torch.bfloat16, torch.float16, torch.float16]
    assert resolve_dtype(torch.bfloat16) == torch.bfloat16 and resolve_dtype("auto") == torch.float32
    with pytest.raises(LmkError, match=r"dtype torch\.float64 is not supported; expected one of "
                                       r"\['float32', 'bfloat16', 'float16', 'auto'\]"):
        resolve_dtype(torch.float64)
    with pytest.raises(LmkError, match=r"dtype 'int8' is not supported"):
        resolve_dtype("int8")


def test_resolve_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(LmkError, match=r"device 'nonsense' is not a valid device; expected 'auto', 'cpu' or 'cuda\[:N\]'"):
        resolve_device("nonsense")
    with pytest.raises(LmkError, match=r"device 'meta' is not supported"):
        resolve_device("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_resolve_device_cuda_without_cuda():
    with pytest.raises(LmkError, match=r"device 'cuda:1' was asked for, but no CUDA device is available"):
        resolve_device("cuda:1")
