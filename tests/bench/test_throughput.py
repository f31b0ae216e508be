"""lmkernel.bench.throughput: offline throughput of lmkernel's continuous batching and of transformers' static batches."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_gguf import write_llama_gguf

from lmkernel import LLM, load_model
from lmkernel.bench import throughput
from lmkernel.bench.throughput import ThroughputResult, run_hf_generate, run_lmkernel
from lmkernel.bench.workload import Workload

WORK = Workload(prompts=[[10, 11, 12, 13], [20, 21, 22, 23, 24], [30, 31, 32, 33, 34, 35]], output_lens=[2, 3, 1])


@pytest.fixture(scope="module")
def tiny(tiny_llama, tmp_path_factory):
    return load_model(write_llama_gguf(tmp_path_factory.mktemp("tp") / "tiny.gguf", tiny_llama), quantization=None)


def _clock(monkeypatch: pytest.MonkeyPatch, *readings: float) -> None:
    monkeypatch.setattr(throughput, "time", SimpleNamespace(perf_counter=iter(readings).__next__))


def test_tokens_per_second_is_output_tokens_over_seconds() -> None:
    assert ThroughputResult("x", 2.5, 6).tokens_per_second == 2.4
    assert ThroughputResult("x", 0.125, 1000, 0.5).tokens_per_second == 8000


def test_lmkernel_generates_every_output_length_exactly_and_reports_the_cache_use(tiny, monkeypatch) -> None:
    """Step 1 prefills all three (4, 5 and 6 tokens) and the third ends; its first tokens out, 4 + 5 tokens sit in
    2 blocks of 16. Step 2: 5 + 6 computed, the first ends; 6 in 1 block for the second. Step 3 ends it. Stored
    over allocated: (9 + 6) / (32 + 16)."""
    llm = LLM(tiny, kv_cache_memory="1MiB", enable_prefix_caching=False, verbose=False)
    finished: dict[str, int] = {}
    step = llm.engine.step

    def counting_step():
        outputs = step()
        finished.update({o.request_id: len(o.outputs[0].token_ids) for o in outputs if o.finished})
        return outputs

    monkeypatch.setattr(llm.engine, "step", counting_step)
    _clock(monkeypatch, 10.0, 12.5)
    result = run_lmkernel(llm, WORK)
    assert finished == {"bench-0": 2, "bench-1": 3, "bench-2": 1}
    assert result == ThroughputResult("lmkernel", 2.5, 6, 15 / 48)
    assert not llm.engine.has_unfinished_requests()


def test_transformers_runs_left_padded_static_batches_to_their_longest_output(tiny_llama, monkeypatch) -> None:
    calls, outputs = [], []
    generate = tiny_llama.generate

    def recording_generate(**kwargs):
        calls.append(kwargs)
        outputs.append(generate(**kwargs))
        return outputs[-1]

    monkeypatch.setattr(tiny_llama, "generate", recording_generate)
    _clock(monkeypatch, 1.0, 1.75)
    result = run_hf_generate(tiny_llama, 2, WORK, batch_size=2)
    assert result == ThroughputResult("transformers generate (static batch 2)", 0.75, 6)
    assert [c["input_ids"].tolist() for c in calls] == [[[2, 10, 11, 12, 13], [20, 21, 22, 23, 24]], [[30, 31, 32, 33, 34, 35]]]
    assert [c["attention_mask"].tolist() for c in calls] == [[[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], [[1] * 6]]
    assert [(c["max_new_tokens"], c["min_new_tokens"], c["do_sample"], c["pad_token_id"]) for c in calls] == [
        (3, 3, False, 2), (1, 1, False, 2)]
    assert [tuple(o.shape) for o in outputs] == [(2, 8), (1, 7)]
    with torch.inference_mode():  # the padded prompt continues as it does alone
        alone = generate(input_ids=torch.tensor([WORK.prompts[0]]), max_new_tokens=3, min_new_tokens=3, do_sample=False,
                         pad_token_id=2)
    assert outputs[0][0, 5:].tolist() == alone[0, 4:].tolist()
