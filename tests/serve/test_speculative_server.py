"""`lmk serve --speculative-model ngram`, black-box with the official `openai` client: the same greedy text as
plain decoding, streamed or not, and the speculative counters on /metrics."""

from __future__ import annotations

import openai
import pytest
from server_process import Server, start_server

pytestmark = pytest.mark.slow  # a real server: `make test` runs it, `make test-fast` does not

MODEL = "smollm2-135m-instruct"
PROMPT = "Copy the list: alpha, beta, gamma, delta, epsilon, zeta.\nCopy: alpha, beta,"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    s = start_server(tmp_path_factory.mktemp("serve"), MODEL, "--kv-cache-memory", "128MiB", "--device", "cpu",
                     "--speculative-model", "ngram", "--num-speculative-tokens", "3")
    yield s
    assert s.stop() == 0, s.log.read_text()


def test_speculating_server_answers_what_plain_decoding_answers(server: Server) -> None:
    from lmkernel import LLM, SamplingParams

    expected = LLM(MODEL, kv_cache_memory="64MiB", device="cpu", verbose=False).generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].outputs[0].text
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert whole.choices[0].text == expected and whole.usage.completion_tokens == 40
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == expected
    assert server.metric("lmkernel_spec_decode_num_drafts_total") > 0
    assert server.metric("lmkernel_spec_decode_num_accepted_tokens_total") > 0
    assert "speculative decoding: prompt lookup" in server.log.read_text()
