"""A chat request's tools without a model: which tools and choices are servable (and the field a refusal names),
the plan a request gets (tools as checked, choice, parser, the grammar of a forced call), and the conversation
as chat templates read it."""

from __future__ import annotations

import json

import pytest

from lmkernel.serve.protocol import APIError, ChatMessage
from lmkernel.serve.tools import ToolPlan, plan_tools, template_messages

HERMES = "{% if tools %}<tool_call>{% endif %}"  # a template that renders tools the Hermes way
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def refusal(tools, choice=None, template=HERMES, parser=None) -> APIError:
    with pytest.raises(APIError) as err:
        plan_tools(tools, choice, template, parser)
    assert err.value.status == 400
    return err.value


def refused_messages(messages: list[ChatMessage]) -> APIError:
    with pytest.raises(APIError) as err:
        template_messages(messages)
    assert err.value.status == 400
    return err.value


def hermes_call_grammar(name: str, arguments: dict, several: bool) -> str:
    schema = {"type": "object", "properties": {"name": {"const": name}, "arguments": arguments},
              "required": ["name", "arguments"], "additionalProperties": False}
    more = "+" if several else ""
    return f'start: call{more}\ncall: <tool_call> "\\n" %json {json.dumps(schema)} "\\n" </tool_call> "\\n"?\n'


# -- which tools are servable ----------------------------------------------------------------------


@pytest.mark.parametrize("tool", [["function"], {"type": "retrieval", "function": {"name": "f"}},
                                  {"type": "function", "function": "f"}, {"type": "function"}])
def test_a_tool_that_is_not_a_function_object_is_refused_naming_its_index(tool):
    error = refusal([TIME, tool])
    assert error.param == "tools[1]"
    assert error.message == 'tools[1] must be {"type": "function", "function": {"name": ..., "parameters": ...}}'


@pytest.mark.parametrize("name", ["", "no spaces", "x" * 65, 7, None, "caf\u00e9"])
def test_a_function_name_outside_64_letters_digits_underscores_and_dashes_is_refused(name):
    error = refusal([{"type": "function", "function": {"name": name}}])
    assert error.param == "tools[0].function.name"
    assert error.message == "tools[0].function.name must be 1-64 letters, digits, '_' or '-'"


def test_a_name_of_64_letters_digits_underscores_and_dashes_is_served():
    name = "A-z_09" + "x" * 58
    plan = plan_tools([{"type": "function", "function": {"name": name}}], None, HERMES, None)
    assert [t["function"]["name"] for t in plan.tools] == [name]


def test_parameters_that_are_not_an_object_are_refused():
    error = refusal([TIME, {"type": "function", "function": {"name": "f", "parameters": ["city"]}}])
    assert error.param == "tools[1].function.parameters"
    assert error.message == "tools[1].function.parameters must be a JSON schema (an object)"


def test_checked_tools_keep_only_the_function_and_its_set_fields():
    tool = {"type": "function", "strict": True, "function": {"name": "f", "description": "does f", "parameters": None}}
    plan = plan_tools([tool, WEATHER], None, HERMES, None)
    assert plan.tools == [{"type": "function", "function": {"name": "f", "description": "does f"}}, WEATHER]


def test_the_same_function_twice_is_refused_naming_it():
    error = refusal([TIME, WEATHER, {"type": "function", "function": {"name": "get_weather"}}])
    assert (error.param, error.message) == ("tools", "tools name the function 'get_weather' twice")


# -- tool_choice -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("choice", "expected"), [(None, "auto"), ("auto", "auto"), ("none", "none"),
                                                  ("required", "required"),
                                                  ({"type": "function", "function": {"name": "get_time"}}, "get_time")])
def test_tool_choice_becomes_the_plans_choice(choice, expected):
    assert plan_tools([WEATHER, TIME], choice, HERMES, None).choice == expected


def test_an_unknown_tool_choice_word_is_refused():
    error = refusal([WEATHER], "sometimes")
    assert error.param == "tool_choice"
    assert error.message == "tool_choice must be none, auto, required or a named function; got 'sometimes'"


@pytest.mark.parametrize("choice", [{"type": "function"}, {"type": "function", "function": None},
                                    {"type": "function", "function": {"name": 3}},
                                    {"type": "tool", "function": {"name": "get_weather"}}, {}])
def test_a_tool_choice_object_without_a_function_name_is_refused(choice):
    error = refusal([WEATHER], choice)
    assert error.param == "tool_choice"
    assert error.message == 'tool_choice must be {"type": "function", "function": {"name": ...}}'


def test_a_tool_choice_naming_a_function_not_offered_is_refused_listing_the_offered():
    error = refusal([WEATHER, TIME], {"type": "function", "function": {"name": "book_flight"}})
    assert error.param == "tool_choice"
    assert error.message == "tool_choice names 'book_flight', which is not among the tools (get_weather, get_time)"


@pytest.mark.parametrize("tools", [None, []])
@pytest.mark.parametrize("choice", [None, "none", "auto"])
def test_without_tools_there_is_no_plan(tools, choice):
    assert plan_tools(tools, choice, HERMES, None) is None


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_call_asked_for_without_tools_is_refused(choice):
    error = refusal([], choice)
    assert (error.param, error.message) == ("tool_choice", "tool_choice asks for a call, but the request has no tools")


# -- the parser and the grammar --------------------------------------------------------------------


def test_a_template_that_renders_no_tools_is_refused_unless_a_parser_is_named():
    error = refusal([WEATHER], template="{{ messages }}")
    assert error.param == "tools"
    assert error.message == ("this model's chat template does not render tools, so it cannot be offered any; serve a "
                             "model whose template does, or start lmk serve with --tool-call-parser (hermes, llama3_json)")
    assert plan_tools([WEATHER], None, "{{ messages }}", "llama3_json").parser == "llama3_json"
    assert plan_tools([WEATHER], None, "{% if tools %}<|python_tag|>{% endif %}", "hermes").parser == "hermes"


@pytest.mark.parametrize("choice", ["auto", "none", None])
def test_a_call_not_forced_has_no_grammar(choice):
    plan = plan_tools([WEATHER], choice, HERMES, None)
    assert plan == ToolPlan([WEATHER], choice or "auto", "hermes", None)
    assert plan.parses is (choice != "none")


def test_a_named_function_is_forced_alone_and_once():
    plan = plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}, HERMES, None)
    assert plan.grammar == hermes_call_grammar("get_time", {"type": "object", "properties": {}}, several=False)
    assert plan.parses


def test_required_forces_one_or_more_calls_to_any_tool_unless_parallel_calls_are_off():
    weather = WEATHER["function"]["parameters"]
    plan = plan_tools([WEATHER], "required", HERMES, None)
    assert plan.grammar == hermes_call_grammar("get_weather", weather, several=True)
    assert plan_tools([WEATHER], "required", HERMES, None, parallel=True).grammar == plan.grammar
    assert plan_tools([WEATHER], "required", HERMES, None, parallel=False).grammar == hermes_call_grammar(
        "get_weather", weather, several=False)
    both = plan_tools([WEATHER, TIME], "required", HERMES, None).grammar
    assert '"const": "get_weather"' in both and '"const": "get_time"' in both


def test_the_grammar_is_the_parsers_own():
    plan = plan_tools([TIME], "required", HERMES, "llama3_json")
    schema = {"type": "object",
              "properties": {"name": {"const": "get_time"}, "parameters": {"type": "object", "properties": {}}},
              "required": ["name", "parameters"], "additionalProperties": False}
    assert plan.grammar == f'start: call ("; " call)*\ncall: %json {json.dumps(schema)}\n'


# -- the conversation as templates read it ---------------------------------------------------------


def test_messages_become_role_and_text_content():
    messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content=[
        {"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]), ChatMessage(role="assistant", content=None)]
    assert template_messages(messages) == [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": ""}]


def test_an_assistants_calls_keep_their_ids_and_arguments_as_objects():
    calls = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
             {"id": "c2", "function": {"name": "get_time", "arguments": {"tz": "UTC"}}},
             {"function": {"name": "get_time"}}]
    (message,) = template_messages([ChatMessage(role="assistant", content="Let me see.", tool_calls=calls)])
    assert message == {"role": "assistant", "content": "Let me see.", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": {"tz": "UTC"}}},
        {"id": None, "type": "function", "function": {"name": "get_time", "arguments": {}}}]}


def test_a_tool_result_carries_its_call_id_and_the_name_only_when_given():
    out = template_messages([ChatMessage(role="tool", content="22 C", tool_call_id="c1", name="get_weather"),
                             ChatMessage(role="tool", content="12:00", tool_call_id="c2"),
                             ChatMessage(role="user", content="thanks", name="ann")])
    assert out == [{"role": "tool", "content": "22 C", "tool_call_id": "c1", "name": "get_weather"},
                   {"role": "tool", "content": "12:00", "tool_call_id": "c2"}, {"role": "user", "content": "thanks"}]


def test_calls_on_a_message_not_from_the_assistant_are_refused():
    call = {"id": "c1", "function": {"name": "f", "arguments": "{}"}}
    error = refused_messages([ChatMessage(role="assistant", content="ok"), ChatMessage(role="user", tool_calls=[call])])
    assert (error.param, error.message) == ("messages[1].tool_calls",
                                            "messages[1].tool_calls: only assistant messages carry tool calls")


@pytest.mark.parametrize("call", [{"id": "c2"}, {"function": "f"}, {"function": {"arguments": "{}"}},
                                  {"function": {"name": 5, "arguments": "{}"}}])
def test_a_call_without_a_function_name_is_refused_naming_it(call):
    good = {"id": "c1", "function": {"name": "f", "arguments": "{}"}}
    error = refused_messages([ChatMessage(role="user", content="hi"), ChatMessage(role="assistant", tool_calls=[good, call])])
    assert (error.param, error.message) == ("messages[1].tool_calls[1]",
                                            "messages[1].tool_calls[1] must have function.name and function.arguments")


def test_arguments_that_are_not_json_are_refused_naming_them():
    calls = [{"function": {"name": "f", "arguments": "{}"}}, {"function": {"name": "f", "arguments": "{x"}}]
    error = refused_messages([ChatMessage(role="assistant", tool_calls=calls)])
    assert (error.param, error.message) == ("messages[0].tool_calls[1].function.arguments",
                                            "messages[0].tool_calls[1].function.arguments is not valid JSON")
