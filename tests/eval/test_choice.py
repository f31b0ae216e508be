"""Multiple-choice questions: how a JSONL file is read (with clear errors) and how tokens are split."""

from __future__ import annotations

import json

import pytest

from lmkernel import LLM, LmkError
from lmkernel.eval.choice import multiple_choice, read_questions, split_tokens


def write(tmp_path, rows) -> object:
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_questions_from_fields_and_fixed_choices(tmp_path) -> None:
    path = write(tmp_path, [{"q": "2+2=", "opts": ["3", "4"], "a": 1}, {"q": "Sky:", "opts": ["blue", "green"], "a": "blue"}])
    qs = read_questions(path, "Q: {q}", "a", None, "opts")
    assert [(q.prompt, q.answer) for q in qs] == [("Q: 2+2=", 1), ("Q: Sky:", 0)]
    fixed = read_questions(write(tmp_path, [{"q": "2+2=", "a": "4"}]), "{q}", "a", ["3", "4"], None)
    assert fixed[0].choices == ["3", "4"] and fixed[0].answer == 1


@pytest.mark.parametrize(("rows", "template", "message"), [
    ([{"q": "x", "a": "no"}], "{q}", "q.jsonl:1: field 'a' must be one of the choices"),
    ([{"q": "x", "a": 0}], "{missing}", "q.jsonl:1: the template needs field 'missing'"),
    ([], "{q}", "no questions"),
])
def test_bad_files_name_line_and_field(tmp_path, rows, template, message) -> None:
    with pytest.raises(LmkError, match=message):
        read_questions(write(tmp_path, rows), template, "a", ["yes"], None)


def test_split_and_score_as_the_harness_does(smollm) -> None:
    llm = LLM(smollm, kv_cache_memory="64MiB", verbose=False)
    head, tail = split_tokens(llm, "The sky is ", "blue")  # the trailing space moves to the continuation
    assert head == llm.tokenizer.encode("The sky is", add_special_tokens=False)
    assert head + tail == llm.tokenizer.encode("The sky is blue", add_special_tokens=False)
    from lmkernel.eval.choice import Question

    result = multiple_choice(llm, [Question("The capital of France is", ["Paris", "banana"], 0)])
    assert result.predictions == [0] and result.accuracy == 1.0 and result.loglikelihoods[0][0] > result.loglikelihoods[0][1]
