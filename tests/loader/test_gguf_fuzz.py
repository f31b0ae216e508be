"""Fuzzing the GGUF path: seeded structural mutations of a small Llama GGUF (metadata values, array counts,
tensor ranks, dimensions, types and offsets; header and block bytes) are loaded and run; every one must end in
a clear `LmkError` or a finished generation, never another exception, a crash or a hang. Crashes found are kept
as named regression cases below."""

from __future__ import annotations

import gc
import math
import os
import struct
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as T
from fuzzing import campaign
from gguf_mutations import header_fields, write_mutant
from tiny_gguf import write_llama_gguf

from lmkernel import LLM, SamplingParams, load_model
from lmkernel.errors import LmkError

MUTANTS = int(os.environ.get("LMK_FUZZ_MUTANTS", "80"))  # make test: ~30 s; BENCHMARKS.md records longer campaigns


@pytest.fixture(scope="module")
def source(tiny_llama, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two layers in the types users' files mix: Q8_0, Q5_0, Q4_K, Q6_K, F16 and F32 (norms)."""
    types = {"token_embd.weight": T.Q8_0}
    for i in range(2):
        types |= {f"blk.{i}.attn_q.weight": T.Q4_K, f"blk.{i}.attn_k.weight": T.Q5_0, f"blk.{i}.attn_v.weight": T.Q6_K,
                  f"blk.{i}.attn_output.weight": T.F16, f"blk.{i}.ffn_gate.weight": T.Q4_K,
                  f"blk.{i}.ffn_up.weight": T.Q8_0, f"blk.{i}.ffn_down.weight": T.Q6_K}
    return write_llama_gguf(tmp_path_factory.mktemp("fuzz") / "source.gguf", tiny_llama, types)


def run(path: Path) -> None:
    """Load and generate, greedy and sampled (an LmkError is the clear refusal; anything else escapes)."""
    loaded = load_model(path, packed_cache=None)
    llm = LLM(loaded, kv_cache_memory="4MiB", verbose=False)
    outs = llm.generate([[5, 6, 7, 8]] * 2, [SamplingParams(temperature=0, max_tokens=3),
                                             SamplingParams(temperature=1.0, max_tokens=3, seed=1)])
    assert all(len(o.outputs[0].token_ids) >= 1 for o in outs)


def test_the_unmutated_file_runs(source: Path) -> None:
    run(source)


@pytest.mark.slow  # a campaign: make test runs it, make test-fast does not
def test_mutated_files_end_in_a_clear_error_or_a_run(source: Path, tmp_path: Path) -> None:
    def mutant(seed: int) -> tuple[Path, str]:
        path = tmp_path / f"mutant-{seed}.gguf"
        return path, write_mutant(source, path, seed)

    outcomes = campaign(MUTANTS, mutant, run)
    assert outcomes["refused"] > MUTANTS // 4 and outcomes["ran"] > 0, outcomes  # the mutations do reach both ends


def _set(source: Path, target: Path, changes: dict[str, float | int]) -> Path:
    data = bytearray(source.read_bytes())
    fields = {f.what: f for f in header_fields(bytes(data))[0]}
    for field, value in changes.items():
        struct.pack_into(fields[field].fmt, data, fields[field].pos, value)
    target.write_bytes(bytes(data))
    return target


@pytest.mark.parametrize(("changes", "message"), [
    # the "weight: expected size 360 in dimension 1, got 2560": a reshaped weight of the same bytes
    ({"blk.0.attn_q.weight dim 0": 512, "blk.0.attn_q.weight dim 1": 128}, "attn_q.weight' has shape"),
    ({"llama.attention.head_count_kv": 0}, "head_count_kv"),  # the "shape '[9, 0, 2, 360]' is invalid"
    ({"llama.attention.head_count": 3}, "head_count_kv"),
    ({"llama.embedding_length": 255}, "has shape"),
    ({"llama.block_count": 3}, "is missing"),
    ({"llama.block_count": 1}, "names no layer"),
    ({"blk.1.ffn_up.weight offset": 0}, "overlaps"),
    ({"blk.1.ffn_up.weight offset": 1 << 40}, "past the end"),
    ({"blk.0.attn_v.weight type": 77}, "GGML type 77"),
    ({"blk.0.attn_v.weight rank": 9}, "dimensions"),
    ({"blk.0.ffn_down.weight dim 0": 0}, "every dimension"),
    ({"llama.context_length": 0}, "context_length"),
    ({"llama.attention.layer_norm_rms_epsilon": math.nan}, "layer_norm_rms_epsilon"),
    ({"tokenizer.ggml.bos_token_id": 1 << 30}, "bos_token_id"),
    ({"tensor_count": 1 << 40}, "not a readable GGUF file"),
])
def test_crafted_fields_are_refused_naming_what_is_wrong(source: Path, tmp_path: Path, changes: dict, message: str) -> None:
    path = _set(source, tmp_path / "crafted.gguf", changes)
    with pytest.raises(LmkError, match=message):
        load_model(path, packed_cache=None)


CORPUS = Path(__file__).resolve().parent / "corpus" / "gguf_headers"


@pytest.mark.slow
def test_the_coverage_guided_corpus_replays_cleanly(source: Path, tmp_path: Path) -> None:
    """Headers the atheris campaign (`tests/loader/fuzz_gguf.py`) kept for new coverage, each followed by this
    file's data region: every one loads or is refused clearly."""
    from gguf_mutations import header_fields

    data = source.read_bytes()
    region = data[-(-header_fields(data)[1] // 32) * 32 :]
    headers = sorted(CORPUS.iterdir())
    assert len(headers) > 50
    for i, header in enumerate(headers):
        path = tmp_path / f"corpus-{i}.gguf"
        raw = header.read_bytes()
        path.write_bytes(raw + b"\0" * (-len(raw) % 32) + region)
        try:
            load_model(path, packed_cache=None)
        except LmkError:
            pass
        if i % 16 == 15:  # a full collection costs ~1 s here: free the loaded models in batches
            gc.collect()
        path.unlink()
