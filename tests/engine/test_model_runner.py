"""The model runner: the decode backend picked once at start, a step laid out as one varlen batch (slots,
single-token decodes as a kernel batch or as groups, LoRA routing per token in the metadata), and the
three backends giving the same tokens."""

from __future__ import annotations

import pytest
import torch

from lmkernel import LLM, EngineConfig, SamplingParams
from lmkernel.config import CacheConfig, EngineConfigError
from lmkernel.engine.attention_backends import DECODE_BACKENDS, FusedBackend, choose_backend
from lmkernel.layers.attention import DecodeBatch, GroupedDecode
from lmkernel.layers.lora import LoraRouting
from lmkernel.memory.kv_cache import allocate_kv_cache
from lmkernel.models.interface import CausalLM

BACKENDS = tuple(DECODE_BACKENDS)


@pytest.fixture(scope="module")
def llms(smollm) -> dict[str, LLM]:
    return {b: LLM(smollm, kv_cache_memory="32MiB", decode_backend=b, verbose=False) for b in BACKENDS}


def test_the_backend_is_chosen_once_and_reported(smollm, llms, capsys):
    for backend, llm in llms.items():
        assert llm.stats()["decode_backend"] == llm.engine.runner.decode_backend == backend
        assert isinstance(llm.engine.runner.backend, FusedBackend) == (backend == "fused")
    auto = LLM(smollm, kv_cache_memory="8MiB")
    assert auto.stats()["decode_backend"] == "fused"  # a float32 Llama on CPU: the fastest there is
    assert "decode backend fused" in capsys.readouterr().out  # the startup line says which


class _NoFusedStep(torch.nn.Module):
    """A decoder that offers no fused step (as GPT-2): only its own forward."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config

    def forward(self, input_ids, positions, meta, kv_caches=None):
        raise NotImplementedError

    def compute_logits(self, hidden, lora=None):
        raise NotImplementedError

    def fused_decode(self):
        return None


def test_a_backend_that_cannot_run_is_refused_with_the_reason(smollm):
    model = _NoFusedStep(smollm.config)
    assert isinstance(model, CausalLM)
    float_cache = allocate_kv_cache(smollm.config, CacheConfig(memory_bytes=4 << 20), torch.float32, torch.device("cpu"))
    cpu = torch.device("cpu")
    assert choose_backend(model, float_cache, cpu, "auto").name == "paged-kernel"
    assert choose_backend(model, float_cache, cpu, "torch").name == "torch"
    with pytest.raises(EngineConfigError, match="--decode-backend fused: _NoFusedStep offers no fused decode step"):
        choose_backend(model, float_cache, cpu, "fused")
    half_cache = allocate_kv_cache(smollm.config, CacheConfig(memory_bytes=4 << 20), torch.float16, torch.device("cpu"))
    assert choose_backend(model, half_cache, cpu, "auto").name == "torch"
    with pytest.raises(EngineConfigError, match="--decode-backend paged-kernel: the compiled CPU kernels need"):
        choose_backend(model, half_cache, cpu, "paged-kernel")
    with pytest.raises(EngineConfigError, match="--decode-backend"):
        EngineConfig(decode_backend="cuda-graphs")


def test_every_backend_gives_the_same_tokens(llms, wikitext_lines):
    tok = llms["torch"].tokenizer
    ids = tok.encode(" ".join(wikitext_lines[:60]))
    prompts = [ids[:9], ids[40:75], ids[100:103], ids[200:290]]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1)
    outs = {b: llm.generate(prompts, params, use_tqdm=False) for b, llm in llms.items()}
    for backend in ("fused", "paged-kernel"):
        for a, b in zip(outs[backend], outs["torch"]):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids, backend
            for x, y, t in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, a.outputs[0].token_ids):
                assert abs(x[t].logprob - y[t].logprob) <= 1e-4


def _schedule(llm: LLM, prompts: list[list[int]]):
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    return engine


@pytest.mark.parametrize("backend", ["paged-kernel", "torch"])
def test_layout_of_a_prefill_then_a_decode_step(llms, backend):
    llm = llms[backend]
    engine = _schedule(llm, [[5] * 5, list(range(100, 120))])
    try:
        plan = engine.scheduler.schedule()
        ids, positions, meta = engine.runner.layout(plan)
        bs = engine.pool.block_size
        assert meta.cu_seqlens == (0, 5, 25) and meta.causal and meta.lora is None
        assert ids.tolist() == [5] * 5 + list(range(100, 120))
        assert positions.tolist() == list(range(5)) + list(range(20))
        tables = [c.block_tables[0] for c in plan.chunks]
        expected = [tables[0][p // bs] * bs + p % bs for p in range(5)] + [tables[1][p // bs] * bs + p % bs for p in range(20)]
        assert meta.paged.slot_mapping.tolist() == expected
        assert meta.paged.decode is None
        engine.scheduler.update(plan, engine.runner.execute(plan).sampled)
        plan = engine.scheduler.schedule()  # both now add one token each
        _, positions, meta = engine.runner.layout(plan)
        assert positions.tolist() == [5, 20] and meta.paged.seq_lens == (6, 21)
        if backend == "torch":
            assert isinstance(meta.paged.decode, GroupedDecode) and sorted(meta.paged.decode.seqs) == [0, 1]
        else:
            assert isinstance(meta.paged.decode, DecodeBatch) and meta.paged.decode.lens.tolist() == [6, 21]
    finally:
        for i in range(2):
            engine.abort_request(f"r{i}")
        engine.step()
    assert llm.stats()["kv_blocks_free"] == llm.stats()["kv_blocks_total"]


def test_lora_routing_travels_with_the_metadata(smollm, tmp_path):
    from lora_checks import random_llama_adapter

    adapter = random_llama_adapter(tmp_path / "a", smollm.config, seed=1)
    llm = LLM(smollm, kv_cache_memory="16MiB", lora={"a": adapter}, verbose=False)
    seen: list[LoraRouting | None] = []
    model = llm.engine.runner.model
    hook = model.register_forward_pre_hook(lambda _m, args: seen.append(args[2].lora))
    try:
        prompts = [[7] * 6, [9] * 4, [11] * 3]
        lora_params = [SamplingParams(temperature=0, max_tokens=1, lora=name) for name in ("a", None, "a")]
        llm.generate(prompts, lora_params, use_tqdm=False)
        llm.generate([[7] * 6], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    finally:
        hook.remove()
    # One prefill step of the three prompts: rows 0-5 and 10-12 use adapter slot 0, rows 6-9 the base.
    routing = seen[0]
    assert len(routing.groups) == 1 and routing.groups[0][0] == llm.engine.adapters.slot("a")
    assert routing.groups[0][1].tolist() == [0, 1, 2, 3, 4, 5, 10, 11, 12]
    assert seen[-1] is None  # a base-only step carries no routing, and no layer holds any between steps
