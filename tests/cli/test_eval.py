"""`lmk eval perplexity|embeddings|retrieval|classify|choice` (lmkernel/cli/eval.py): what each hands to the
evaluation library, the result line and the --json line it prints, and bad values refused before a model loads."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from test_cli import invoke


@pytest.mark.slow  # a real model end to end: `make test` runs it, `make test-fast` does not
def test_zero_shot_phrasebank_from_the_command_line(phrasebank_valid, tmp_path) -> None:
    data = tmp_path / "valid.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in phrasebank_valid) + "\n")
    out = subprocess.run([sys.executable, "-m", "lmkernel.cli", "eval", "classify", "smollm2-135m-instruct",
                          "--data", str(data), "--limit", "8", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"SmolLM2 zero-shot on 8 PhraseBank sentences: {result}")
    assert set(result) == {"accuracy", "macro_f1"}
    assert (result["accuracy"] * 8).is_integer() and 0.0 <= result["macro_f1"] <= 1.0


@pytest.fixture
def loads(monkeypatch):
    """`load_model` replaced: each call is recorded and gets a stand-in model named after what was asked for."""
    calls = []

    def load(model, **kwargs):
        calls.append((model, kwargs))
        return SimpleNamespace(name=model, config=SimpleNamespace(prompts={}))

    monkeypatch.setattr("lmkernel.loading.load_model", load)
    return calls


def _record(monkeypatch, target: str, result):
    """Replace `target` with a recorder of its arguments that returns `result`."""
    calls = []
    monkeypatch.setattr(target, lambda *args: calls.append(args) or result)
    return calls


def _text(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_perplexity_hands_over_its_options_and_prints_the_result(monkeypatch, loads, tmp_path):
    from lmkernel.eval.perplexity import PerplexityResult

    calls = _record(monkeypatch, "lmkernel.eval.perplexity.perplexity", PerplexityResult(12.345678, 99, 2.5134))
    data = _text(tmp_path, "wiki.txt", "Some text to score.\n")
    out = invoke("eval", "perplexity", "m", "--data", str(data), "--max-tokens", "100", "--window", "64",
                 "--dtype", "bfloat16", "--device", "cpu", "--quantization", "dequantize", "--json")
    assert out.returncode == 0, out.stderr
    assert loads == [("m", {"dtype": "bfloat16", "device": "cpu", "quantization": None})]
    (lm, text, max_tokens, window), = calls
    assert (lm.name, text, max_tokens, window) == ("m", "Some text to score.\n", 100, 64)
    assert out.stdout.splitlines() == ["perplexity 12.3457 over 99 tokens", '{"perplexity": 12.345678, "tokens": 99}']


def test_perplexity_defaults_and_no_json(monkeypatch, loads, tmp_path):
    from lmkernel.eval.perplexity import PerplexityResult

    calls = _record(monkeypatch, "lmkernel.eval.perplexity.perplexity", PerplexityResult(3.0, 7, 1.0986))
    out = invoke("eval", "perplexity", "m", "--data", str(_text(tmp_path, "t.txt", "abc")))
    assert out.returncode == 0, out.stderr
    assert loads == [("m", {"dtype": "float32", "device": "auto", "quantization": "auto"})]
    assert calls[0][2:] == (None, None)
    assert out.stdout == "perplexity 3.0000 over 7 tokens\n"


@pytest.mark.parametrize("args, message", [
    (["--max-tokens", "1"], "--max-tokens must be at least 2; got 1"),
    (["--quantization", "int4"], "--quantization must be auto, keep or dequantize; got 'int4'"),
])
def test_perplexity_refuses_bad_values_before_loading(loads, tmp_path, args, message):
    out = invoke("eval", "perplexity", "m", "--data", str(_text(tmp_path, "t.txt", "abc")), *args)
    assert out.returncode == 1 and out.stdout == "" and out.stderr == f"error: {message}\n"
    assert loads == []


@pytest.mark.parametrize("command", [["perplexity"], ["retrieval"], ["embeddings", "--reference", "r"]])
def test_an_empty_or_missing_data_file_is_named(loads, tmp_path, command):
    empty = _text(tmp_path, "empty.txt", " \n\n")
    out = invoke("eval", command[0], "m", *command[1:], "--data", str(empty))
    assert out.returncode == 1 and out.stderr == f"error: --data {empty}: the file is empty\n"
    missing = tmp_path / "missing.txt"
    out = invoke("eval", command[0], "m", *command[1:], "--data", str(missing))
    assert out.returncode == 1 and out.stderr.startswith(f"error: --data {missing}: cannot read it as UTF-8 text")
    assert loads == []


def test_embeddings_compares_the_model_to_the_float32_reference(monkeypatch, loads, tmp_path):
    from lmkernel.eval.embeddings import FidelityResult

    calls = _record(monkeypatch, "lmkernel.eval.embeddings.embedding_fidelity", FidelityResult(0.9876543, 0.9123456, 3))
    data = _text(tmp_path, "s.txt", "first sentence\n\n  \nsecond one\nthird\n")
    out = invoke("eval", "embeddings", "m", "--reference", "ref", "--data", str(data), "--dtype", "bfloat16", "--json")
    assert out.returncode == 0, out.stderr
    assert loads == [("m", {"dtype": "bfloat16"}), ("ref", {})]
    (model, reference, texts), = calls
    assert (model.name, reference.name, texts) == ("m", "ref", ["first sentence", "second one", "third"])
    assert out.stdout.splitlines() == ["3 sentences: mean cosine 0.987654, min 0.912346",
                                       '{"mean_cosine": 0.9876543, "min_cosine": 0.9123456}']


def _paragraph(n: int) -> str:
    """Three sentences, 42 words: one retrieval query (the first sentence) and its document (the rest)."""
    return f"Paragraph {n} opens here. Then " + " ".join(["word"] * 33) + ". It closes with this sentence."


@pytest.mark.parametrize("prompts, flags, expected", [
    ({"query": "search_query: ", "document": "search_document: "}, [], ("query", "document")),
    ({"query": "search_query: ", "document": "search_document: "}, ["--no-prompts"], (None, None)),
    ({"query": "q: "}, [], ("query", None)),
    ({}, [], (None, None)),
])
def test_retrieval_builds_the_task_and_uses_the_models_prompts(monkeypatch, tmp_path, prompts, flags, expected):
    from lmkernel.eval.retrieval import RetrievalResult

    lm = SimpleNamespace(config=SimpleNamespace(prompts=prompts))
    loaded = []
    monkeypatch.setattr("lmkernel.loading.load_model", lambda model, **kw: loaded.append((model, kw)) or lm)
    calls = _record(monkeypatch, "lmkernel.eval.retrieval.evaluate_retrieval", RetrievalResult(0.5, 1.0, 0.75, 2, 2))
    data = _text(tmp_path, "wiki.txt", "\n".join([" = Heading = ", _paragraph(1), "too short. two. three.",
                                                   _paragraph(2), _paragraph(3)]) + "\n")
    out = invoke("eval", "retrieval", "m", "--data", str(data), "--limit", "2", *flags, "--json")
    assert out.returncode == 0, out.stderr
    assert loaded == [("m", {"dtype": "float32"})]
    (model, task, query_prompt, document_prompt), = calls
    assert model is lm and (query_prompt, document_prompt) == expected
    assert task.queries == ["Paragraph 1 opens here.", "Paragraph 2 opens here."]
    assert task.documents == ["Then " + " ".join(["word"] * 33) + ". It closes with this sentence."] * 2
    assert out.stdout.splitlines() == [
        "2 queries over 2 documents: recall@1 0.5000, recall@10 1.0000, MRR@10 0.7500",
        '{"recall_at_1": 0.5, "recall_at_10": 1.0, "mrr_at_10": 0.75, "queries": 2}']


JSONL = "".join(json.dumps(r) + "\n" for r in (
    {"text": "Profits rose.", "label": "positive"}, {"text": "Sales fell.", "label": "negative"},
    {"text": "Nothing changed.", "label": "neutral"}))


def test_classify_limits_noises_and_prints_accuracy_and_f1(monkeypatch, loads, tmp_path):
    from lmkernel.eval.classify import ClassifyResult, Example

    noised = [Example("Proifts rose.", "positive"), Example("Slaes fell.", "negative")]
    typos = _record(monkeypatch, "lmkernel.eval.classify.with_typos", noised)
    calls = _record(monkeypatch, "lmkernel.eval.classify.classify",
                    ClassifyResult(0.5, 1 / 3, 2, ["negative", "positive"], ["positive", "positive"]))
    out = invoke("eval", "classify", "m", "--data", str(_text(tmp_path, "d.jsonl", JSONL)), "--limit", "2",
                 "--noise", "0.1", "--noise-seed", "7", "--device", "cpu", "--json")
    assert out.returncode == 0, out.stderr
    assert typos == [([Example("Profits rose.", "positive"), Example("Sales fell.", "negative")], 0.1, 7)]
    assert loads == [("m", {"dtype": "float32", "device": "cpu"})]
    (lm, examples), = calls
    assert lm.name == "m" and examples == noised
    assert out.stdout.splitlines() == ["2 examples, labels negative, positive: accuracy 0.5000, macro-F1 0.3333",
                                       '{"accuracy": 0.5, "macro_f1": 0.3333333333333333}']


def test_classify_without_noise_reads_every_example(monkeypatch, loads, tmp_path):
    from lmkernel.eval.classify import ClassifyResult, Example

    monkeypatch.setattr("lmkernel.eval.classify.with_typos", lambda *a: pytest.fail("noised without --noise"))
    calls = _record(monkeypatch, "lmkernel.eval.classify.classify",
                    ClassifyResult(1.0, 1.0, 3, ["negative", "neutral", "positive"], []))
    out = invoke("eval", "classify", "m", "--data", str(_text(tmp_path, "d.jsonl", JSONL)))
    assert out.returncode == 0, out.stderr
    assert [e.label for e in calls[0][1]] == ["positive", "negative", "neutral"]
    assert calls[0][1][0] == Example("Profits rose.", "positive")
    assert out.stdout == "3 examples, labels negative, neutral, positive: accuracy 1.0000, macro-F1 1.0000\n"


@pytest.mark.parametrize("args, message", [
    (["--limit", "0"], "--limit must be at least 1; got 0"),
    (["--noise", "1"], "--noise must be a rate in [0, 1); got 1.0"),
    (["--noise", "-0.5"], "--noise must be a rate in [0, 1); got -0.5"),
])
def test_classify_refuses_bad_values_before_loading(loads, tmp_path, args, message):
    out = invoke("eval", "classify", "m", "--data", str(_text(tmp_path, "d.jsonl", JSONL)), *args)
    assert out.returncode == 1 and out.stdout == "" and out.stderr == f"error: {message}\n"
    assert loads == []


@pytest.fixture
def llms(monkeypatch):
    made = []
    monkeypatch.setattr("lmkernel.engine.llm.LLM", lambda model, **kw: made.append((model, kw)) or SimpleNamespace(name=model))
    return made


QUESTIONS = "".join(json.dumps(r) + "\n" for r in (
    {"q": "2+2=4", "answer": "yes", "options": ["no", "yes", "maybe"]}, {"q": "1+1=3", "answer": 0, "options": ["no", "yes"]}))


def test_choice_reads_the_questions_and_prints_accuracy_with_loglikelihoods(monkeypatch, llms, tmp_path):
    from lmkernel.eval.choice import ChoiceResult, Question

    calls = _record(monkeypatch, "lmkernel.eval.choice.multiple_choice", ChoiceResult(1.0, 1, [[-2.5, -0.25]], [1]))
    out = invoke("eval", "choice", "m", "--data", str(_text(tmp_path, "q.jsonl", QUESTIONS)), "--template",
                 "Claim: {q}\\nTrue?", "--choices", " no , yes", "--limit", "1", "--quantization", "keep", "--json")
    assert out.returncode == 0, out.stderr
    assert llms == [("m", {"kv_cache_memory": "256MiB", "verbose": False, "quantization": "keep"})]
    (llm, questions), = calls
    assert llm.name == "m" and questions == [Question("Claim: 2+2=4\nTrue?", ["no", "yes"], 1)]
    assert out.stdout.splitlines() == ["1 questions: accuracy 1.0000",
                                       '{"accuracy": 1.0, "questions": 1, "loglikelihoods": [[-2.5, -0.25]]}']


def test_choice_takes_each_lines_own_choices(monkeypatch, llms, tmp_path):
    from lmkernel.eval.choice import ChoiceResult, Question

    calls = _record(monkeypatch, "lmkernel.eval.choice.multiple_choice", ChoiceResult(0.5, 2, [[0, 0, 0], [0, 0]], [0, 1]))
    out = invoke("eval", "choice", "m", "--data", str(_text(tmp_path, "q.jsonl", QUESTIONS)), "--template", "{q}",
                 "--choices-field", "options")
    assert out.returncode == 0, out.stderr
    assert llms[0][1]["quantization"] == "auto"
    assert calls[0][1] == [Question("2+2=4", ["no", "yes", "maybe"], 1), Question("1+1=3", ["no", "yes"], 0)]
    assert out.stdout == "2 questions: accuracy 0.5000\n"


@pytest.mark.parametrize("args, message", [
    (["--choices", "no,yes", "--limit", "0"], "--limit must be at least 1; got 0"),
    ([], "give exactly one of --choices and --choices-field"),
    (["--choices", "no,yes", "--choices-field", "options"], "give exactly one of --choices and --choices-field"),
    (["--choices", "no,yes", "--quantization", "q4"], "--quantization must be auto, keep or dequantize; got 'q4'"),
])
def test_choice_refuses_bad_values_before_loading(llms, tmp_path, args, message):
    out = invoke("eval", "choice", "m", "--data", str(_text(tmp_path, "q.jsonl", QUESTIONS)), "--template", "{q}", *args)
    assert out.returncode == 1 and out.stdout == "" and out.stderr == f"error: {message}\n"
    assert llms == []


def test_choice_names_the_line_the_template_cannot_fill(llms, tmp_path):
    data = _text(tmp_path, "q.jsonl", QUESTIONS)
    out = invoke("eval", "choice", "m", "--data", str(data), "--template", "{question}", "--choices", "no,yes")
    assert out.returncode == 1 and llms == []
    assert out.stderr == f"error: {data}:1: the template needs field 'question', which the line lacks\n"
