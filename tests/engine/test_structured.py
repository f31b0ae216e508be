"""Structured output on SmolLM2: every constrained output matches its schema, regex, choice or grammar,
in batches that mix constrained and free requests; bad grammars are refused before anything runs."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from lmkernel import LLM, SamplingParams
from lmkernel.engine.structured import StructuredOutputError, StructuredOutputs

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
PROMPTS = [f"Describe person number {i} as JSON." for i in range(6)]


@pytest.fixture(scope="module")
def llm(smollm) -> LLM:
    return LLM(smollm, kv_cache_memory="128MiB", max_num_seqs=8, verbose=False)


def test_exactly_one_constraint_is_named() -> None:
    with pytest.raises(StructuredOutputError, match="exactly one of"):
        StructuredOutputs()
    with pytest.raises(StructuredOutputError, match="exactly one of"):
        StructuredOutputs(regex="a+", choice=["a"])
    with pytest.raises(StructuredOutputError, match="unknown fields shape"):
        StructuredOutputs.from_dict({"shape": "round"})
    with pytest.raises(StructuredOutputError, match="choice"):
        StructuredOutputs(choice=["yes", ""])
    assert SamplingParams(structured_outputs={"regex": "[0-9]+"}).structured_outputs == StructuredOutputs(regex="[0-9]+")


def test_json_schema_outputs_validate_and_free_rows_are_unchanged(llm) -> None:
    """A batch of constrained requests beside an unconstrained one: each JSON output validates against
    the schema (sampled, so the model explores), and the free request writes what it writes alone."""
    free = SamplingParams(temperature=0, max_tokens=24)
    alone = llm.generate(["The capital of France is"], free)[0].outputs[0].token_ids
    constrained = SamplingParams(temperature=0.8, seed=1, max_tokens=80, structured_outputs=StructuredOutputs(json=PERSON))
    outs = llm.generate([*PROMPTS, "The capital of France is"], [constrained] * len(PROMPTS) + [free])
    for out in outs[:-1]:
        o = out.outputs[0]
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), PERSON)
    assert outs[-1].outputs[0].token_ids == alone


def test_regex_choice_and_lark_grammar(llm) -> None:
    params = [
        SamplingParams(temperature=0.7, seed=2, max_tokens=30, structured_outputs={"regex": r"[A-Z][a-z]{2,8} [0-9]{3}"}),
        SamplingParams(temperature=0.7, seed=3, max_tokens=10, structured_outputs={"choice": ["positive", "negative", "neutral"]}),
        SamplingParams(temperature=0.7, seed=4, max_tokens=40,
                       structured_outputs={"grammar": 'start: "(" num " " op " " num ")"\nnum: /[1-9][0-9]?/\nop: "+" | "-" | "*"'}),
    ]
    outs = llm.generate(["Name and number:", "The sentiment of 'great results' is", "An arithmetic expression:"], params)
    regex, choice, lark = (o.outputs[0].text for o in outs)
    assert re.fullmatch(r"[A-Z][a-z]{2,8} [0-9]{3}", regex)
    assert choice in ("positive", "negative", "neutral")
    assert re.fullmatch(r"\([1-9][0-9]? [+*-] [1-9][0-9]?\)", lark)
    assert all(o.outputs[0].finish_reason == "stop" for o in outs)


def test_n_samples_each_follow_the_grammar(llm) -> None:
    out = llm.generate(["Pick one:"], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8,
                                                     structured_outputs={"choice": ["red", "green", "blue"]}))[0]
    assert len(out.outputs) == 3 and {o.text for o in out.outputs} <= {"red", "green", "blue"}


def test_output_cut_by_max_tokens_ends_with_length(llm) -> None:
    out = llm.generate(["A list:"], SamplingParams(temperature=0, max_tokens=5, structured_outputs={
        "json": {"type": "array", "items": {"type": "integer"}, "minItems": 50}}))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5


@pytest.mark.parametrize(("fields", "param"), [
    ({"regex": "([a-z"}, "structured_outputs.regex"),
    ({"grammar": "start: undefined_rule"}, "structured_outputs.grammar"),
    ({"json": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}, "structured_outputs.json"),
    ({"json": "{not json"}, "structured_outputs.json"),
])
def test_invalid_grammars_are_refused_before_running(llm, fields, param) -> None:
    with pytest.raises(StructuredOutputError) as err:
        llm.generate(["x"], SamplingParams(max_tokens=4, structured_outputs=fields))
    assert err.value.param == param
    assert llm.stats()["running"] == 0 and llm.stats()["waiting"] == 0


def test_compiling_has_a_time_limit(llm) -> None:
    """A grammar that does not compile in time is refused (a 400 at the server), never a hung request."""
    schema = {"type": "object", "properties": {f"field_{i}": {"type": "string", "pattern": "[a-z]{2,40}@[a-z]{2,20}"}
                                               for i in range(200)}}
    with pytest.raises(StructuredOutputError, match="longer than"):
        llm.engine.grammars.matcher(StructuredOutputs(json=schema), timeout=0)
