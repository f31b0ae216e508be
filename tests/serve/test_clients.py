"""Real clients, unmodified, against a real `lmk serve` of Qwen2.5-Coder-0.5B-Instruct: instructor (tools and
JSON-schema modes), langchain-openai (tools, structured output) and lm-evaluation-harness's local-completions
model with the server's own tokenizer, whose accuracy and log-likelihoods must equal `lmk eval choice`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import instructor
import openai
import pytest
from pydantic import BaseModel, Field
from server_process import Server

pytestmark = pytest.mark.slow  # a real server and real clients: `make test` runs it, `make test-fast` does not

MODEL = "qwen2.5-coder-0.5b-instruct"
LABELS = ["positive", "negative", "neutral"]


class Person(BaseModel):
    name: str = Field(description="the person's full name")
    age: int = Field(description="the person's age in years")


@pytest.fixture(scope="module")
def server(qwen_server: Server) -> Server:
    return qwen_server


SENTENCE = "Extract the person: Maria Lopez turned 34 last week."


@pytest.mark.parametrize("mode", [instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA])
def test_instructor_extracts_a_pydantic_model(server: Server, mode: instructor.Mode) -> None:
    client = instructor.from_openai(openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0), mode=mode)
    person = client.chat.completions.create(model=MODEL, response_model=Person, max_retries=0, temperature=0,
                                            max_tokens=100, messages=[{"role": "user", "content": SENTENCE}])
    assert person.name == "Maria Lopez" and person.age == 34


def test_langchain_binds_tools_and_returns_structured_output(server: Server) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return "sunny"

    chat = ChatOpenAI(base_url=server.base_url, api_key="unused", model=MODEL, temperature=0, max_tokens=100, max_retries=0)
    reply = chat.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Oslo?")
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == [("get_weather", {"city": "Oslo"})]
    person = chat.with_structured_output(Person).invoke(SENTENCE)
    assert isinstance(person, Person) and person.name == "Maria Lopez" and person.age == 34


def test_lm_eval_local_completions_equals_lmk_eval_choice(server: Server, phrasebank_valid, tmp_path: Path) -> None:
    """20 Financial PhraseBank sentences as a local multiple-choice task: lm-eval through the server (its
    remote tokenizer: /tokenize, /detokenize, /tokenizer_info) and `lmk eval choice` in process score every
    choice with the same log-likelihood."""
    data = tmp_path / "fpb50.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in phrasebank_valid[:20]))  # 60 requests, one at a time
    (tmp_path / "fpb50.yaml").write_text(
        "task: fpb50\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Sentence: {{text}}\\nSentiment:"\n'
        f"doc_to_choice: {json.dumps(LABELS)}\n"
        f'doc_to_target: "{{{{{LABELS}.index(label)}}}}"\n'
        "metric_list:\n  - metric: acc\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    args = f"base_url={server.base_url}/completions,model={MODEL},tokenizer_backend=remote,num_concurrent=1,max_retries=1"
    run = subprocess.run([str(Path(sys.executable).parent / "lm_eval"), "--model", "local-completions", "--model_args", args,
                          "--tasks", "fpb50", "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out"),
                          "--log_samples"], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["fpb50"]
    samples = sorted((json.loads(x) for x in next((tmp_path / "out").rglob("samples_fpb50_*.jsonl")).read_text().splitlines()),
                     key=lambda s: s["doc_id"])
    theirs = [[float(r[0][0]) for r in s["resps"]] for s in samples]

    ours = subprocess.run([str(Path(sys.executable).parent / "lmk"), "eval", "choice", MODEL, "--data", str(data),
                           "--template", "Sentence: {text}\\nSentiment:", "--choices", ",".join(LABELS),
                           "--answer-field", "label", "--json"], capture_output=True, text=True, timeout=900)
    assert ours.returncode == 0, ours.stderr[-3000:]
    mine = json.loads(ours.stdout.splitlines()[-1])
    assert len(theirs) == len(mine["loglikelihoods"]) == 20
    assert max(abs(a - b) for x, y in zip(theirs, mine["loglikelihoods"]) for a, b in zip(x, y)) < 1e-4
    assert results["acc,none"] == mine["accuracy"]
