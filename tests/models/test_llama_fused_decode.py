"""The whole-decoder kernel for decode steps (`FusedDecode`) against llama.py's layer-by-layer forward,
in the engine: SmolLM2 (grouped KV heads, no biases) and a Qwen2 (Q/K/V biases)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from model_checks import load_dir, perturb_vectors

from lmkernel import LLM, SamplingParams
from lmkernel.engine.attention_backends import FusedBackend, PagedKernelBackend
from lmkernel.layers import cpu_kernels
from lmkernel.models.llama import FusedDecode


def _generate_both_ways(llm: LLM, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> tuple[list, list, int]:
    """Outputs with the fused decode step, the same with the paged-kernel backend (the model's forward), and how
    many steps the fused step ran."""
    runner = llm.engine.runner
    fused = runner.backend
    assert isinstance(fused, FusedBackend) and isinstance(fused.fused, FusedDecode), \
        "a float32 Llama on CPU should decode through the fused kernel"
    calls = 0
    forward = fused.forward

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return forward(*args, **kwargs)

    try:
        fused.forward = counted  # type: ignore[method-assign]
        with_fused = llm.generate(prompts, params)
        runner.backend = PagedKernelBackend(runner.kv_cache, runner.device)
        layer_by_layer = llm.generate(prompts, params)
    finally:
        runner.backend = fused
        del fused.forward
    return with_fused, layer_by_layer, calls


def _assert_same(a_outputs: list, b_outputs: list, tolerance: float = 1e-4) -> None:
    for a, b in zip(a_outputs, b_outputs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y, t in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, a.outputs[0].token_ids):
            assert abs(x[t].logprob - y[t].logprob) <= tolerance


def test_fused_decode_equals_the_layer_by_layer_forward(smollm, wikitext_lines):
    ids = smollm.tokenizer.encode(" ".join(wikitext_lines[:200]))
    llm = LLM(smollm, kv_cache_memory="64MiB", enable_prefix_caching=False, verbose=False)
    # Seventeen prompts of different lengths and output budgets: steps of 17 decodes (beyond the kernel:
    # the layer-by-layer forward runs), then 16 down to 1 as requests finish; contexts cross block edges.
    lengths = [3, 17, 40, 95, 160] + [5 + 7 * i for i in range(12)]
    budgets = [4, 8, 12, 16, 20] + [2 + (i % 5) for i in range(12)]
    prompts = [ids[i * 10 : i * 10 + n] for i, n in enumerate(lengths)]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=1) for n in budgets]
    with_fused, plain, calls = _generate_both_ways(llm, prompts, params)
    _assert_same(with_fused, plain)
    assert [len(o.outputs[0].token_ids) for o in with_fused] == budgets
    # Decode steps: one with 17 sequences (fused declines), then 18 with 16 or fewer.
    assert calls == 18
    assert llm.stats()["kv_blocks_free"] == llm.stats()["kv_blocks_total"]


@pytest.fixture()
def qwen2(tmp_path) -> torch.nn.Module:
    """A small random Qwen2 (Q/K/V biases, two query heads per KV head) loaded by llama.py."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(3)
    config = Qwen2Config(
        vocab_size=1000, hidden_size=64, intermediate_size=136, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )
    perturb_vectors(Qwen2ForCausalLM(config), 0.3).save_pretrained(tmp_path, safe_serialization=True)
    model = load_dir(tmp_path)
    assert model.config.attention_bias
    return model


@pytest.mark.parametrize("weights", ["float32", "int8", "int4"])
def test_fused_decode_with_qkv_bias_and_grouped_heads(qwen2, smollm, weights):
    from lmkernel.compress.quantize import quantize_model

    if weights != "float32":  # int4 in groups of 32: down_proj's 136 inputs are padded to 160
        quantize_model(qwen2, weights, group_size=32 if weights == "int4" else None)
    loaded = dataclasses.replace(smollm, config=qwen2.config, model=qwen2)  # SmolLM2's tokenizer: ids < 1000 decode
    llm = LLM(loaded, kv_cache_memory=8 << 20, block_size=4, verbose=False)
    prompts = [[5, 17, 300, 999, 42, 7, 7, 8], [1, 2, 3], list(range(100, 130))]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    with_fused, plain, calls = _generate_both_ways(llm, prompts, params)
    _assert_same(with_fused, plain)
    assert calls == 11  # every decode step


def test_fused_decode_runs_the_gguf_in_its_own_blocks(smollm_gguf, smollm, wikitext_lines):
    """SmolLM2 as shipped (the default on CPU): Q4_1 projections and the Q8_0 head in their blocks. The two
    paths quantize the same activations unless a value lands within float rounding of an 8-bit step
    (their SiLU differs in the last bit, which can move a block's scale), so their log-probs agree to a
    few hundredths, not bit for bit; a wrong weight or bias would move them by whole units."""
    from lmkernel import load_model
    from lmkernel.layers.linear import GGUFLinear

    kept = load_model(smollm_gguf)
    assert isinstance(kept.model.model.layers[0].mlp.up_proj, GGUFLinear)
    llm = LLM(kept, kv_cache_memory="32MiB", verbose=False)
    ids = smollm.tokenizer.encode(" ".join(wikitext_lines[:50]))
    prompts = [ids[:20], ids[30:100]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    with_fused, plain, calls = _generate_both_ways(llm, prompts, params)
    _assert_same(with_fused, plain, tolerance=0.1)
    assert calls == 7


def test_fused_decode_of_many_sequences_on_gguf_blocks(smollm_gguf, smollm, wikitext_lines):
    """Steps of up to 20 sequences on blocks run fused (8 and more: each weight read once for all, on AMX
    tiles where granted), and give what the layer-by-layer forward gives (tolerance: see above)."""
    from lmkernel import load_model

    kept = load_model(smollm_gguf)
    llm = LLM(kept, kv_cache_memory="64MiB", enable_prefix_caching=False, verbose=False)
    assert llm.engine.runner.backend.fused.max_sequences == 64
    ids = smollm.tokenizer.encode(" ".join(wikitext_lines[:200]))
    prompts = [ids[i * 7 : i * 7 + 5 + 3 * i] for i in range(20)]
    params = [SamplingParams(temperature=0, max_tokens=4 + i % 5, ignore_eos=True, logprobs=1) for i in range(20)]
    with_fused, plain, calls = _generate_both_ways(llm, prompts, params)
    _assert_same(with_fused, plain, tolerance=0.1)
    assert calls == 7  # every decode step (4 to 8 tokens, the first from the prefill): 20 sequences, then fewer


def test_fused_decode_is_declined_where_it_does_not_apply(qwen2):
    from lmkernel.layers.linear import DynamicInt8Linear

    assert cpu_kernels.llama_decode_available() and qwen2.fused_decode() is not None
    qwen2.train()
    assert qwen2.fused_decode() is None  # training: autograd needs the layer-by-layer forward
    qwen2.eval()
    assert qwen2.to(torch.bfloat16).fused_decode() is None
    qwen2.float()
    mlp = qwen2.model.layers[1].mlp
    mlp.up_proj = DynamicInt8Linear.from_float(mlp.up_proj)
    assert qwen2.fused_decode() is None  # a kind of layer the kernel does not run
