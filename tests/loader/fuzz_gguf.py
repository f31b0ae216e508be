"""Coverage-guided fuzzing of the GGUF path with atheris (libFuzzer): the input is a GGUF header (magic, counts,
metadata, tensor table), followed in the file by the data region of a valid two-layer model, so the tensor
offsets keep pointing into real blocks while everything the header says is the fuzzer's. Each input goes
through the reader, the config and tokenizer built from the metadata, the tensor checks and the load into a
model with its weights kept in their blocks; an `LmkError` is a clear refusal, any other exception a crash.

    python tests/loader/fuzz_gguf.py CORPUS_DIR -max_total_time=600 -max_len=16384

The seed corpus is the valid header (written to CORPUS_DIR on first run). pip install atheris first.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["lmkernel"]):
    from lmkernel.errors import LmkError
    from lmkernel.loading import load_model

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from gguf_mutations import header_fields  # noqa: E402

_WORK = Path(tempfile.mkdtemp(prefix="lmk-fuzz-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
_SOURCE = _WORK / "source.gguf"


def _source() -> tuple[bytes, bytes]:
    """A valid file's header and its aligned data region."""
    import torch
    from gguf import GGMLQuantizationType as T
    from tiny_gguf import vocabulary, write_llama_gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocabulary()), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    types = {f"blk.{i}.{n}.weight": t for i in range(2) for n, t in
             (("attn_q", T.Q4_K), ("attn_k", T.Q5_0), ("attn_v", T.Q6_K), ("ffn_up", T.Q8_0), ("ffn_down", T.Q6_K))}
    write_llama_gguf(_SOURCE, LlamaForCausalLM(config).eval(), types)
    data = _SOURCE.read_bytes()
    end = header_fields(data)[1]
    start = -(-end // 32) * 32
    return data[:end], data[start:]


HEADER, DATA = _source()


def test_one(header: bytes) -> None:
    path = _WORK / "input.gguf"
    path.write_bytes(header + b"\0" * (-len(header) % 32) + DATA)
    try:
        load_model(path, packed_cache=None)
    except LmkError:
        pass


def main() -> None:
    corpus = Path(sys.argv[1]) if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else None
    if corpus is not None:
        corpus.mkdir(parents=True, exist_ok=True)
        if not any(corpus.iterdir()):
            (corpus / "valid-header").write_bytes(HEADER)
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
