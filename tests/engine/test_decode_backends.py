"""Every decode backend against an independent reference: the fused CPU decoder (one compiled call a step), the
paged kernel under llama.py's forward, and PyTorch SDPA over gathered contexts each decode SmolLM2 (dequantized,
float32) in a batch of sequences of different lengths, and each step's token and log-prob is what transformers'
LlamaForCausalLM, reading the same GGUF, gives the whole sequence in one forward."""

from __future__ import annotations

import pytest
import torch

from lmkernel import LLM, SamplingParams

pytestmark = pytest.mark.slow  # a transformers reference over every decode step: `make test` runs it

LENGTHS = (3, 18, 40, 97)  # contexts end inside and on the edges of 16-token blocks
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def prompts(smollm, wikitext_lines) -> list[list[int]]:
    ids = smollm.tokenizer.encode(" ".join(wikitext_lines[300:340]))
    return [ids[i * 100 : i * 100 + n] for i, n in enumerate(LENGTHS)]


@pytest.fixture(scope="module")
def reference(hf_smollm_model, prompts) -> list[torch.Tensor]:
    """Per prompt, transformers' greedy continuation's log-probs [NEW_TOKENS, V], one forward per step."""
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            seq, rows = list(prompt), []
            for _ in range(NEW_TOKENS):
                row = torch.log_softmax(hf_smollm_model(torch.tensor([seq])).logits[0, -1].float(), -1)
                rows.append(row)
                seq.append(int(row.argmax()))
            out.append(torch.stack(rows))
    return out


@pytest.mark.parametrize("backend", ["fused", "paged-kernel", "torch"])
def test_each_decode_backend_gives_transformers_tokens_and_logprobs(smollm, prompts, reference, backend):
    llm = LLM(smollm, kv_cache_memory="64MiB", decode_backend=backend, enable_prefix_caching=False, verbose=False)
    assert llm.stats()["decode_backend"] == backend
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0))
    for out, expected in zip(outs, reference):
        tokens = list(out.outputs[0].token_ids)
        assert tokens == expected.argmax(-1).tolist()
        got = torch.tensor([p[t].logprob for p, t in zip(out.outputs[0].logprobs, tokens)])
        want = expected.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        assert (got - want).abs().max().item() <= 2e-4
