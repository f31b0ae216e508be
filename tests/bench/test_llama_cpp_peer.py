"""lmkernel.bench.llama_cpp_peer against a stand-in `llama_cpp`: settings, greedy tokens from the last logits row, timings, load script, missing library."""

from __future__ import annotations

import ctypes
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from lmkernel.bench import llama_cpp_peer
from lmkernel.bench.llama_cpp_peer import LlamaCppPeer, load_script
from lmkernel.errors import LmkError

VOCAB = 11


class Clock:
    """A perf_counter that moves only when the fake model evaluates (2 ms a call and 0.5 ms a token)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fake_llama_cpp(clock: Clock) -> types.ModuleType:
    """A `llama_cpp` whose Llama records what it is asked; after tokens [.., t] the last logits row peaks at
    (3t + 1) % VOCAB and every earlier row at 0, so only the last row gives the greedy token."""
    lib = types.ModuleType("llama_cpp")
    lib.made, lib.asked_rows = [], []

    class Llama:
        def __init__(self, **kwargs) -> None:
            self.kwargs, self.calls, self.ctx, self.rows = kwargs, [], object(), None
            lib.made.append(self)

        def n_vocab(self) -> int:
            return VOCAB

        def reset(self) -> None:
            self.calls.append("reset")

        def eval(self, tokens: list[int]) -> None:
            self.calls.append(list(tokens))
            clock.now += 0.002 + 0.0005 * len(tokens)
            self.rows = np.zeros((len(tokens), VOCAB), dtype=np.float32)
            self.rows[:, 0] = 5.0
            self.rows[-1, 0] = 0.0
            self.rows[-1, (3 * tokens[-1] + 1) % VOCAB] = 9.0

        def tokenize(self, text: bytes) -> list[int]:
            return list(text[:4])

        def close(self) -> None:
            self.calls.append("close")

    def llama_get_logits_ith(ctx, i):
        model = lib.made[-1]
        assert ctx is model.ctx
        lib.asked_rows.append(i)
        return model.rows[i].ctypes.data_as(ctypes.POINTER(ctypes.c_float))

    lib.Llama = Llama
    lib.llama_get_logits_ith = llama_get_logits_ith
    lib.llama_print_system_info = lambda: b"AVX = 1 | AVX512 = 1 | AMX_INT8 = 0 | \n"
    return lib


@pytest.fixture
def fake(monkeypatch):
    clock = Clock()
    lib = fake_llama_cpp(clock)
    monkeypatch.setitem(sys.modules, "llama_cpp", lib)
    monkeypatch.setattr(llama_cpp_peer, "time", types.SimpleNamespace(perf_counter=clock))
    return lib


def test_a_missing_llama_cpp_python_says_what_to_install(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(LmkError) as err:
        LlamaCppPeer(tmp_path / "m.gguf", 2)
    assert str(err.value) == ("the llama.cpp peer is not installed: CMAKE_ARGS=-DGGML_NATIVE=ON pip install -e '.[bench]' "
                              "(builds llama-cpp-python from source, several minutes)")


def test_the_peer_runs_every_thread_a_1024_token_context_and_512_token_batches(fake, tmp_path: Path) -> None:
    peer = LlamaCppPeer(tmp_path / "m.gguf", 3)
    assert fake.made[0].kwargs == {"model_path": str(tmp_path / "m.gguf"), "n_threads": 3, "n_threads_batch": 3,
                                   "n_ctx": 1024, "n_batch": 512, "verbose": False}
    assert peer.vocab == VOCAB
    assert peer.build() == "AVX = 1 | AVX512 = 1 | AMX_INT8 = 0 |"
    fake.llama_print_system_info = lambda: " NEON = 1 "
    assert peer.build() == "NEON = 1"
    peer.close()
    assert fake.made[0].calls == ["close"]


def test_decode_feeds_back_the_greedy_token_of_the_last_row_and_times_only_the_new_tokens(fake, tmp_path: Path) -> None:
    peer = LlamaCppPeer(tmp_path / "m.gguf", 2)
    ms = peer.decode_ms([4, 7, 2], new_tokens=3)
    # after 2 the greedy token is 7, then 22 % 11 = 0, then 1, then 4 (read, not fed back)
    assert fake.made[0].calls == ["reset", [4, 7, 2], [7], [0], [1]]
    assert set(fake.asked_rows) == {-1} and len(fake.asked_rows) == 4
    assert ms == pytest.approx(2.5)  # each one-token step: 2 ms + 0.5 ms; the prompt's 3.5 ms left out


def test_prefill_times_one_call_from_an_empty_context(fake, tmp_path: Path) -> None:
    peer = LlamaCppPeer(tmp_path / "m.gguf", 2)
    peer.decode_ms([1, 2], 1)
    tps = peer.prefill_tokens_per_second(list(range(8)))
    assert fake.made[0].calls[-2:] == ["reset", list(range(8))]
    assert tps == pytest.approx(8 / 0.006)  # 2 ms + 8 x 0.5 ms


def test_the_load_script_loads_the_file_with_the_same_settings_and_prints_seconds_and_memory(
        fake, tmp_path: Path, capsys) -> None:
    path = tmp_path / "it's a \"model\".gguf"
    exec(compile(load_script(path, 5), "<load_script>", "exec"), {})
    model = fake.made[0]
    assert model.kwargs == {"model_path": str(path), "n_threads": 5, "n_threads_batch": 5, "n_ctx": 1024,
                            "n_batch": 512, "verbose": False}
    assert model.calls == [list(b"The ")]
    printed = json.loads(capsys.readouterr().out)
    assert sorted(printed) == ["resident", "seconds"]
    assert printed["seconds"] >= 0 and isinstance(printed["resident"], int)
