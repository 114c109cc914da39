"""Schema keywords of the wrong JSON type in a forced call or a response format, and an
Anthropic tool_result whose content is neither a string nor a list: a 400 in each API's own
error shape, never a 500 (text/constraints.py ``check_schema``, serve/anthropic.py ``_text``)."""

import re

import httpx
import pytest

USER = [{"role": "user", "content": "hi"}]
P = {"type": "object", "properties": {"a": {"type": "string"}}}


def prop(**kw):
    return {"type": "object", "properties": {"a": kw}}


MALFORMED = [  # (schema, the keyword each error names)
    ({**P, "$defs": 5}, "$defs"), ({**P, "$defs": []}, "$defs"), ({**P, "required": "a"}, "required"),
    ({**P, "required": [5]}, "required"), (prop(enum=5), "enum"), (prop(enum="x"), "enum"),
    (prop(type="array", minItems="2"), "minItems"), (prop(type="array", minItems=-1), "minItems"),
    (prop(**{"$ref": 5}), "$ref"), (prop(anyOf={}), "anyOf"), (prop(anyOf=[5]), "anyOf"),
    ({"type": "object", "properties": []}, "properties"), ({"type": "object", "properties": {"a": 5}}, "properties"),
    ({"type": 5}, "type"), ({"type": ["string", 5]}, "type"),
    ({"type": "object", "additionalProperties": 5}, "additionalProperties"),
    (prop(type="string", minLength="x"), "minLength"),
]


def openai_error(r):
    return r.json()["error"]["message"]


def anthropic_error(r):
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
    return body["error"]["message"]


def ollama_error(r):
    return r.json()["error"]


def shapes(schema):
    fn = {"name": "f", "description": "d", "parameters": schema}
    yield "/v1/chat/completions", {"model": "m", "messages": USER, "max_tokens": 3,
                                   "tools": [{"type": "function", "function": fn}],
                                   "tool_choice": {"type": "function", "function": {"name": "f"}}}, openai_error
    yield "/v1/chat/completions", {"model": "m", "messages": USER, "max_tokens": 3, "response_format":
                                   {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}, openai_error
    yield "/v1/messages", {"model": "m", "messages": USER, "max_tokens": 3, "tools": [{"name": "f", "input_schema": schema}],
                           "tool_choice": {"type": "tool", "name": "f"}}, anthropic_error
    yield "/v1/responses", {"model": "m", "input": "hi", "max_output_tokens": 3,
                            "tools": [{"type": "function", "name": "f", "parameters": schema}],
                            "tool_choice": {"type": "function", "name": "f"}}, openai_error
    yield "/api/chat", {"model": "m", "messages": USER, "stream": False, "format": schema}, ollama_error


@pytest.fixture(scope="module")
def base(serve, chat_model):
    model, tok, _ = chat_model
    return serve(model, tok)[0]


@pytest.mark.parametrize("schema, keyword", MALFORMED, ids=[str(i) for i in range(len(MALFORMED))])
def test_a_schema_keyword_of_the_wrong_type_is_a_400_in_each_api(base, schema, keyword):
    for path, body, message in shapes(schema):
        r = httpx.post(base + path, json=body, timeout=60)
        assert r.status_code == 400, (path, body, r.text)
        said = message(r).lower()
        assert keyword.lower() in said or re.search("schema must be an object or (a )?boolean", said), (path, r.text)


@pytest.mark.parametrize("content", [5, True, {"a": 1}])
@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
def test_a_tool_result_neither_string_nor_list_is_a_400(base, path, content):
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": content}]}]
    r = httpx.post(base + path, json={"model": "m", "messages": msgs, "max_tokens": 3,
                                      "tools": [{"name": "f", "input_schema": P}]}, timeout=60)
    assert r.status_code == 400, r.text
    assert "content is a string or a list of content blocks" in anthropic_error(r)
