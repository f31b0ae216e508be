"""llama.py on the real SmolLM2 (Llama architecture, grouped KV heads, tied head): its config and
tokenizer as the GGUF states them, log-probabilities equal to transformers' on WikiText-2, and every
decode backend's tokens and log-probs against transformers (one HF model loaded for both)."""

from __future__ import annotations

import pytest
import torch

from lmkernel import LLM, SamplingParams


@pytest.mark.slow  # transformers' model loaded and run on 20 lines: make test runs it, make test-fast not
def test_smollm_logprobs_match_transformers_on_wikitext(smollm, hf_smollm_model, hf_smollm_tokenizer, wikitext_lines):
    """Next-token log-probabilities over the whole vocabulary, 20 WikiText-2 lines, float32."""
    worst = 0.0
    for line in wikitext_lines[:20]:
        ids = smollm.tokenizer.encode(line)[:256]
        assert ids == hf_smollm_tokenizer(line).input_ids[:256]
        ours = torch.log_softmax(smollm.logits(ids), dim=-1)
        with torch.no_grad():
            ref = torch.log_softmax(hf_smollm_model(torch.tensor([ids])).logits[0].float(), dim=-1)
        assert ours.shape == (len(ids), 49152)
        worst = max(worst, (ours - ref).abs().max().item())
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    assert worst <= 1e-3, f"max |log p - log p_ref| = {worst}"


def test_smollm_config_and_tokenizer(smollm):
    c = smollm.config
    assert (c.architecture, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == ("llama", 30, 576, 9, 3)
    assert c.tie_word_embeddings and c.max_position_embeddings == 8192 and c.rope_theta == 100000.0
    assert smollm.num_parameters == 134_515_008
    assert (smollm.tokenizer.bos_token_id, smollm.tokenizer.eos_token_id, smollm.tokenizer.pad_token_id) == (1, 2, 2)


LENGTHS = (3, 18, 40, 97)  # contexts end inside and on the edges of 16-token blocks
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def backend_prompts(smollm, wikitext_lines) -> list[list[int]]:
    ids = smollm.tokenizer.encode(" ".join(wikitext_lines[300:340]))
    return [ids[i * 100 : i * 100 + n] for i, n in enumerate(LENGTHS)]


@pytest.fixture(scope="module")
def backend_reference(hf_smollm_model, backend_prompts) -> list[torch.Tensor]:
    """Per prompt, transformers' greedy continuation's log-probs [NEW_TOKENS, V], one forward per step."""
    out = []
    with torch.inference_mode():
        for prompt in backend_prompts:
            seq, rows = list(prompt), []
            for _ in range(NEW_TOKENS):
                row = torch.log_softmax(hf_smollm_model(torch.tensor([seq])).logits[0, -1].float(), -1)
                rows.append(row)
                seq.append(int(row.argmax()))
            out.append(torch.stack(rows))
    return out


@pytest.mark.slow  # a transformers reference over every decode step: `make test` runs it
@pytest.mark.parametrize("backend", ["fused", "paged-kernel", "torch"])
def test_each_decode_backend_gives_transformers_tokens_and_logprobs(smollm, backend_prompts, backend_reference, backend):
    """Every decode backend against an independent reference: the fused CPU decoder (one compiled call a step), the
    paged kernel under llama.py's forward, and PyTorch SDPA over gathered contexts each decode SmolLM2 (dequantized,
    float32) in a batch of sequences of different lengths; each step's token and log-prob is what transformers'
    LlamaForCausalLM, reading the same GGUF, gives the whole sequence in one forward."""
    llm = LLM(smollm, kv_cache_memory="64MiB", decode_backend=backend, enable_prefix_caching=False, verbose=False)
    assert llm.stats()["decode_backend"] == backend
    outs = llm.generate(backend_prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0))
    for out, expected in zip(outs, backend_reference):
        tokens = list(out.outputs[0].token_ids)
        assert tokens == expected.argmax(-1).tolist()
        got = torch.tensor([p[t].logprob for p, t in zip(out.outputs[0].logprobs, tokens)])
        want = expected.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        assert (got - want).abs().max().item() <= 2e-4
