"""`lmk generate` and `lmk chat` (lmkernel/cli/generate.py): a completion streamed to the terminal, a conversation
whose history is the prompt, and bad values refused in one line."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest
from test_cli import LMK, invoke, run

from lmkernel.errors import LmkError


def test_generate_streams_the_greedy_completion():
    from lmkernel import LLM, SamplingParams

    out = run("generate", "smollm2-135m-instruct", "The capital of France is", "--max-tokens", "10", "--temperature", "0", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    expected = LLM("smollm2-135m-instruct", kv_cache_memory="64MiB", verbose=False).generate(
        ["The capital of France is"], SamplingParams(temperature=0, max_tokens=10)
    )[0].outputs[0].text
    assert out.stdout.rstrip("\n") == expected


@pytest.mark.slow  # a real model end to end: `make test` runs it, `make test-fast` does not
def test_generate_with_speculative_decoding_streams_the_same_completion():
    from lmkernel import LLM, SamplingParams

    prompt = "List: red, green, blue, red, green, blue, red, green,"
    out = run("generate", "smollm2-135m-instruct", prompt, "--max-tokens", "24", "--temperature", "0", "--device", "cpu",
              "--speculative-model", "ngram", "--num-speculative-tokens", "3")
    assert out.returncode == 0, out.stderr
    expected = LLM("smollm2-135m-instruct", kv_cache_memory="64MiB", verbose=False).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=24))[0].outputs[0].text
    assert out.stdout.rstrip("\n") == expected
    assert "speculative decoding: prompt lookup" in out.stderr and "proposed tokens accepted" in out.stderr
    bad = invoke("generate", "smollm2-135m-instruct", "x", "--speculative-model", "ngram", "--num-speculative-tokens", "0")
    assert bad.returncode == 1 and "--num-speculative-tokens" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow  # a real model end to end: `make test` runs it, `make test-fast` does not
def test_chat_keeps_history_and_quits():
    out = subprocess.run(
        [*LMK, "chat", "--max-tokens", "12", "--temperature", "0", "--device", "cpu"],
        input="Say hi.\nAnd again?\nexit\n", capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("you> ") == 3 and out.stdout.count("assistant> ") == 2


def test_generate_rejects_bad_values_in_one_line():
    out = invoke("generate", "smollm2-135m-instruct", "x", "--temperature", "-1")
    assert out.returncode == 1 and "temperature" in out.stderr and "Traceback" not in out.stderr


def invoke_with_input(*args: str, stdin: str) -> SimpleNamespace:
    """`lmk ARGS` in this process with `stdin` as its input."""
    from typer.testing import CliRunner

    from lmkernel.cli import app

    result = CliRunner().invoke(app, list(args), input=stdin, env={"COLUMNS": "250"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout, stderr=result.stderr)


STATS = {"kv_blocks_total": 32, "kv_block_size": 16, "kv_cache_tokens": 512, "speculative": "off"}


class FakeEngine:
    """Replies to each request with the next of `replies`, one piece a step."""

    def __init__(self, replies: list[list[str]], refuse: str | None = None):
        self.replies, self.refuse, self.requests, self.pending = list(replies), refuse, [], []

    def add_request(self, request_id, prompt, params):
        if self.refuse:
            raise LmkError(self.refuse)
        self.requests.append((request_id, prompt, params))
        self.pending = list(self.replies.pop(0))

    def has_unfinished_requests(self):
        return bool(self.pending)

    def step(self):
        piece = self.pending.pop(0)
        return [SimpleNamespace(outputs=[SimpleNamespace(delta_text=piece)])]


class FakeTokenizer:
    def __init__(self):
        self.histories = []

    def apply_chat_template(self, history, add_generation_prompt, tokenize):
        assert add_generation_prompt and tokenize
        self.histories.append([dict(m) for m in history])
        return [len(self.histories)] * 3


@pytest.fixture
def fake_llm(monkeypatch):
    """`LLM` replaced by one that records how it was made and streams fixed replies."""
    made = []

    class FakeLLM:
        replies: list[list[str]] = [["Hel", "lo", ", world"]]
        stats_given: dict = STATS
        encoder = False
        refuse: str | None = None

        def __init__(self, model, engine, verbose=True):
            made.append(SimpleNamespace(model=model, engine=engine, verbose=verbose))
            self.engine = None if self.encoder else FakeEngine(self.replies, self.refuse)
            self.tokenizer = FakeTokenizer()
            made[-1].llm = self

        def stats(self):
            return dict(self.stats_given)

    monkeypatch.setattr("lmkernel.engine.llm.LLM", FakeLLM)
    FakeLLM.made = made
    return FakeLLM


def test_generate_streams_each_piece_and_hands_over_its_settings(fake_llm):
    out = invoke("generate", "some-model", "Once", "--max-tokens", "3", "--temperature", "0", "--top-p", "0.5",
                 "--block-size", "32")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "Hello, world\n"
    assert out.stderr == "KV cache: 32 blocks x 16 tokens = 512 tokens\n"
    (made,) = fake_llm.made
    assert (made.model, made.verbose) == ("some-model", False)
    assert made.engine.kv_cache_memory == 512 << 20 and made.engine.block_size == 32 and made.engine.speculative is None
    ((request_id, prompt, params),) = made.llm.engine.requests
    assert (request_id, prompt) == ("cli", "Once")
    assert (params.max_tokens, params.temperature, params.top_p) == (3, 0.0, 0.5)


def test_generate_reports_speculative_acceptance(fake_llm):
    fake_llm.stats_given = {**STATS, "speculative": "prompt lookup x2", "spec_accepted_tokens": 6,
                            "spec_proposed_tokens": 8, "spec_acceptance_rate": 0.75, "spec_tokens_per_check": 2.5}
    out = invoke("generate", "m", "Once", "--speculative-model", "ngram", "--num-speculative-tokens", "2")
    assert out.returncode == 0, out.stderr
    assert fake_llm.made[0].engine.speculative.model == "ngram"
    assert fake_llm.made[0].engine.speculative.num_speculative_tokens == 2
    assert out.stderr.splitlines() == [
        "KV cache: 32 blocks x 16 tokens = 512 tokens; speculative decoding: prompt lookup x2",
        "speculative decoding: 6 of 8 proposed tokens accepted (75%), 2.50 tokens per checking forward"]


@pytest.mark.parametrize("args, message", [
    (["--max-tokens", "0"], "error: SamplingParams.max_tokens must be an integer >= 1 or None; got 0"),
    (["--top-p", "0"], "error: SamplingParams.top_p must be in (0, 1]; got 0.0"),
])
def test_generate_refuses_bad_sampling_before_loading(fake_llm, args, message):
    out = invoke("generate", "m", "Once", *args)
    assert out.returncode == 1 and out.stdout == "" and out.stderr == message + "\n"
    assert fake_llm.made == []


def test_generate_on_an_encoder_or_a_refused_prompt_is_one_line(fake_llm):
    fake_llm.encoder = True
    out = invoke("generate", "all-minilm-l6-v2", "Once")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == "error: all-minilm-l6-v2 is an encoder model; generate and chat need a decoder\n"
    fake_llm.encoder, fake_llm.refuse = False, "the prompt is 9000 tokens; the model's context is 8192"
    out = invoke("generate", "m", "Once")
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1] == "error: the prompt is 9000 tokens; the model's context is 8192"


def test_a_model_that_will_not_load_is_one_line(monkeypatch):
    def refuse(model, engine, verbose=True):
        raise LmkError(f"model '{model}' is neither a known alias nor an existing file or directory")

    monkeypatch.setattr("lmkernel.engine.llm.LLM", refuse)
    for command in (["generate", "nowhere", "x"], ["chat", "nowhere"]):
        out = invoke(*command)
        assert out.returncode == 1 and out.stdout == ""
        assert out.stderr == "error: model 'nowhere' is neither a known alias nor an existing file or directory\n"


def test_chat_sends_the_whole_conversation_each_turn(fake_llm):
    fake_llm.replies = [["Hi", " there"], ["Fine."]]
    out = invoke_with_input("chat", "m", "--system", "Be brief.", "--max-tokens", "5", "--temperature", "0",
                   stdin="Hello\n\n   \nHow are you?\nquit\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "you> assistant> Hi there\nyou> you> you> assistant> Fine.\nyou> "
    llm = fake_llm.made[0].llm
    system = {"role": "system", "content": "Be brief."}
    assert llm.tokenizer.histories == [
        [system, {"role": "user", "content": "Hello"}],
        [system, {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"},
         {"role": "user", "content": "How are you?"}],
    ]
    assert [(p, params.max_tokens, params.temperature) for _, p, params in llm.engine.requests] == [
        ([1, 1, 1], 5, 0.0), ([2, 2, 2], 5, 0.0)]
    assert fake_llm.made[0].model == "m" and fake_llm.made[0].engine.kv_cache_memory == 512 << 20


def test_chat_ends_at_the_end_of_input_and_without_a_system_message(fake_llm):
    out = invoke_with_input("chat", stdin="Hello\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "you> assistant> Hello, world\nyou> \n"
    assert fake_llm.made[0].model == "smollm2-135m-instruct"
    assert fake_llm.made[0].llm.tokenizer.histories == [[{"role": "user", "content": "Hello"}]]


def test_chat_refuses_bad_sampling_in_one_line(fake_llm):
    out = invoke_with_input("chat", "m", "--temperature", "-1", stdin="Hello\n")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr == "error: SamplingParams.temperature must be in [0, 100]; got -1.0\n"
    assert fake_llm.made == []

