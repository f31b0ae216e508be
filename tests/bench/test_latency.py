"""lmkernel.bench.latency: batch-1 decode latency against the memory-bandwidth floor, and against llama.cpp."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
from tiny_gguf import write_llama_gguf

from lmkernel import LLM, load_model
from lmkernel.bench import latency
from lmkernel.bench.latency import (LatencyResult, compare_llama_cpp, decode_bytes, decode_latency, hf_decode_latency,
                                    measure, prefill_tokens_per_second, read_bandwidth, weight_bytes)
from lmkernel.errors import LmkError
from lmkernel.layers.linear import GGUFEmbedding


@pytest.fixture(scope="module")
def tiny(tiny_llama, tmp_path_factory):
    return load_model(write_llama_gguf(tmp_path_factory.mktemp("lat") / "tiny.gguf", tiny_llama), quantization=None)


class Clock:
    """time.perf_counter, read from a list of readings or advanced by hand."""

    def __init__(self, readings: list[float] | None = None) -> None:
        self.readings, self.now = readings, 0.0

    def perf_counter(self) -> float:
        return self.readings.pop(0) if self.readings is not None else self.now


def _sequence(*values):
    """A stand-in that returns the next of `values` at each call, whatever its arguments."""
    it = iter(values)
    return lambda *args, **kwargs: next(it)


class Model(torch.nn.Module):
    """Embedding 10x4 f32 (160 B) tied to the head; Linear 4->3 with bias f32 (60 B); Linear 4->2 bf16 (16 B); a
    buffer of 5 f16 (10 B); a GGUF embedding table of 6 rows of 34 bytes (204 B)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.gguf_embed = GGUFEmbedding(6, 32, gguf_type=8, row_bytes=34)
        self.proj = torch.nn.Linear(4, 3)
        self.small = torch.nn.Linear(4, 2, bias=False).to(torch.bfloat16)
        self.register_buffer("scales", torch.ones(5, dtype=torch.float16))
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_a_decode_step_reads_every_weight_but_the_embedding_tables_and_a_tied_head_once() -> None:
    assert decode_bytes(Model()) == 160 + 60 + 16 + 10
    assert weight_bytes(Model()) == 160 + 60 + 16 + 10 + 204


def test_bandwidth_is_the_bytes_over_the_best_read(monkeypatch) -> None:
    assert math.isfinite(read_bandwidth(1 << 20, repeats=2)) and read_bandwidth(1 << 20, repeats=2) > 0
    monkeypatch.setattr(latency, "time", Clock([0.0, 0.5, 1.0, 1.25, 2.0, 2.4]))
    assert read_bandwidth(4096, repeats=3) == 4096 / 0.25


def test_decode_latency_times_the_steps_after_the_first_and_averages_the_cache_use(tiny, monkeypatch) -> None:
    """5 prompt tokens, 3 new: 2 timed steps; after the first of them 6 tokens sit in one block of 16 (the
    request has ended after the second)."""
    llm = LLM(tiny, kv_cache_memory="1MiB", enable_prefix_caching=False, verbose=False)
    monkeypatch.setattr(latency, "time", Clock([0.0, 0.002, 1.0, 1.004]))
    ms, used = decode_latency(llm, [10, 11, 12, 13, 14], 3)
    assert ms == pytest.approx(3.0) and used == 6 / 16
    assert decode_latency(llm, [10, 11, 12], 1) == (0.0, None)  # no decode step at all
    monkeypatch.setattr(latency, "time", Clock([5.0, 5.5]))
    assert prefill_tokens_per_second(llm, [10, 11, 12, 13, 14, 15]) == 12.0
    assert not llm.engine.has_unfinished_requests()


def test_transformers_decode_latency_subtracts_the_prefill_run(monkeypatch) -> None:
    clock, calls = Clock(), []

    def generate(input_ids, attention_mask, max_new_tokens, min_new_tokens, do_sample):
        calls.append((input_ids.tolist(), attention_mask.tolist(), max_new_tokens, min_new_tokens, do_sample))
        clock.now += 0.05 + 0.01 * max_new_tokens  # 50 ms of prefill, 10 ms a token

    monkeypatch.setattr(latency, "time", clock)
    assert hf_decode_latency(SimpleNamespace(generate=generate), [5, 6, 7], 4) == pytest.approx(10.0)
    assert calls == [([[5, 6, 7]], [[1, 1, 1]], 5, 5, False), ([[5, 6, 7]], [[1, 1, 1]], 1, 1, False)]


def test_measure_keeps_the_best_speeds_and_the_median_fraction_of_the_neighbouring_bandwidth(monkeypatch) -> None:
    """1 GB of weights. Bandwidth 10, then after each decode 20, 5, 10 GB/s; decodes of 200, 100, 400 ms, each
    against the better of the readings around it: 50/200, 50/100, 100/400."""
    monkeypatch.setattr(latency, "weight_bytes", lambda model: 10**9)
    monkeypatch.setattr(latency, "read_bandwidth", _sequence(10e9, 20e9, 5e9, 10e9))
    monkeypatch.setattr(latency, "decode_latency", _sequence((200.0, 0.5), (100.0, 0.25), (400.0, 0.75)))
    llm = SimpleNamespace(loaded=SimpleNamespace(model=None))
    got = measure(llm, [1, 2], 8, rounds=3)
    assert got == LatencyResult(100.0, 50.0, 20.0, None, 0.75, 0.25)


def test_measure_with_a_peer_reads_the_bandwidth_again_after_it(monkeypatch) -> None:
    """Readings 10 | decode 100 ms | 10 | peer | 40 | decode 100 ms | 5 | peer | 5 (GB/s): the second decode is
    against the 40 read after the peer (25 ms / 100 ms), the first against 10 (100 ms / 100 ms)."""
    monkeypatch.setattr(latency, "weight_bytes", lambda model: 10**9)
    monkeypatch.setattr(latency, "read_bandwidth", _sequence(10e9, 10e9, 40e9, 5e9, 5e9))
    monkeypatch.setattr(latency, "decode_latency", _sequence((100.0, None), (100.0, None)))
    monkeypatch.setattr(latency, "hf_decode_latency", _sequence(300.0, 200.0))
    got = measure(SimpleNamespace(loaded=SimpleNamespace(model=None)), [1, 2], 8, rounds=2, peer=object())
    assert got == LatencyResult(100.0, 25.0, 40.0, 200.0, None, 0.625)


class Peer:
    def __init__(self, log: list, decode: list[float], prefill: list[float]) -> None:
        self.log, self.decode, self.prefill = log, decode, prefill

    def decode_ms(self, prompt: list[int], n: int) -> float:
        self.log.append(("peer decode", n))
        return self.decode.pop(0)

    def prefill_tokens_per_second(self, prompt: list[int]) -> float:
        self.log.append(("peer prefill", len(prompt)))
        return self.prefill.pop(0)


def test_the_llama_cpp_comparison_alternates_and_takes_medians_of_each_rounds_ratio(monkeypatch) -> None:
    """Decode ms ours 10, 20, 40 / peer 15, 20, 20; bandwidth 100, 50, 200 GB/s over 1 GB: floors 10, 20, 5 ms;
    prefill tok/s ours 1000, 3000, 2000 / peer 500, 1000, 4000."""
    log: list = []
    ours_ms, bandwidths, ours_tps = [99.0, 10.0, 20.0, 40.0], [100e9, 50e9, 200e9], [1000.0, 3000.0, 2000.0]

    def ours_decode(llm, prompt, n):
        log.append(("ours decode", n))
        return ours_ms.pop(0), None

    def bandwidth(repeats):
        log.append(("bandwidth", repeats))
        return bandwidths.pop(0)

    def ours_prefill(llm, prompt):
        log.append(("ours prefill", len(prompt)))
        return ours_tps.pop(0)

    monkeypatch.setattr(latency, "PAUSE", 0)
    monkeypatch.setattr(latency, "decode_bytes", lambda model: 10**9)
    monkeypatch.setattr(latency, "decode_latency", ours_decode)
    monkeypatch.setattr(latency, "read_bandwidth", bandwidth)
    monkeypatch.setattr(latency, "prefill_tokens_per_second", ours_prefill)
    peer = Peer(log, [99.0, 15.0, 20.0, 20.0], [500.0, 1000.0, 4000.0])
    llm = SimpleNamespace(engine=SimpleNamespace(loaded=SimpleNamespace(model=None)))
    got = compare_llama_cpp(llm, peer, [1, 2, 3], list(range(7)), new_tokens=16, rounds=3)
    assert log == [("ours decode", 8), ("peer decode", 8)] + [
        ("ours decode", 16), ("peer decode", 16), ("bandwidth", 3), ("ours prefill", 7), ("peer prefill", 7)] * 3
    assert got.decode_ms == (20.0, 20.0) and got.prefill_tps == (2000.0, 1000.0)
    assert got.decode_ratio == 1.0 and got.prefill_ratio == 2.0  # medians of 1.5, 1, 0.5 and of 2, 3, 0.5
    assert got.floor_ms == pytest.approx(10.0)
    assert got.floor_fractions == pytest.approx((1.0, 2 / 3))  # medians of 1, 1, 1/8 and of 2/3, 1, 1/4


def test_llama_cpp_is_compared_on_gguf_files_only(minilm_dir) -> None:
    with pytest.raises(LmkError, match=rf"^{re.escape(str(minilm_dir))}: llama.cpp runs GGUF files; this is a hf_dir$"):
        latency.against_llama_cpp(str(minilm_dir), 8, 4, 16, 1, None)
