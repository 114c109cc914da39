"""Forced calls, budgets and lenient schemas over HTTP, through both APIs with their real
client packages, the random model sampling at temperature 1 (noise wherever the grammar
allows it), streamed and not."""

import contextlib
import json
import threading
import time

import httpx
import jsonschema
import pytest

from conftest import ScriptedModel, free_port
from test_structured import PING, WEATHER

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

NOTE = {"type": "function", "function": {"name": "note", "parameters": {
    "type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}}}
TOOLS = [WEATHER, PING, NOTE]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MSGS = [{"role": "user", "content": "Do something."}]


@contextlib.contextmanager
def serving(model, tok):
    import uvicorn

    from mlx_lfm2.serve.app import create_app
    from mlx_lfm2.serve.scheduler import Scheduler

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(Scheduler(model, tok, "tiny")), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(500):
        if srv.started:
            break
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def served(chat_model):
    model, tok, _ = chat_model
    with serving(model, tok) as base:
        yield (base, openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0),
               anthropic.Anthropic(base_url=base, api_key="x", max_retries=0))


def _check_call(name: str, arguments: dict) -> None:
    jsonschema.validate(arguments, SCHEMAS[name])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_openai_forced_call_without_parallel_calls_is_exactly_one(served, choice):
    _, client, _ = served
    for seed in range(4):
        kw = dict(model="m", messages=MSGS, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False,
                  temperature=1.0, seed=seed, max_tokens=48)
        c = client.chat.completions.create(**kw).choices[0]
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1, c.message
        call = c.message.tool_calls[0].function
        _check_call(call.name, json.loads(call.arguments))
        chunks = [x for x in client.chat.completions.create(stream=True, **kw) if x.choices]
        streamed = [t for x in chunks for t in (x.choices[0].delta.tool_calls or [])]
        assert len(streamed) == 1 and chunks[-1].choices[0].finish_reason == "tool_calls"
        assert (streamed[0].function.name, streamed[0].function.arguments) == (call.name, call.arguments)


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "note"}])
def test_anthropic_forced_call_without_parallel_use_is_exactly_one(served, choice):
    """Including a string argument without maxLength under max_tokens 40: it closes in time."""
    _, _, client = served
    tools = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in TOOLS]
    for _ in range(4):
        kw = dict(model="m", max_tokens=40, messages=MSGS, tools=tools, extra_body={"temperature": 1.0},
                  tool_choice={**choice, "disable_parallel_tool_use": True})  # unseeded: each round draws anew
        r = client.messages.create(**kw)
        uses = [b for b in r.content if b.type == "tool_use"]
        assert r.stop_reason == "tool_use" and len(uses) == 1, r.content
        _check_call(uses[0].name, uses[0].input)
        with client.messages.stream(**kw) as s:
            final = s.get_final_message()
        assert [b.type for b in final.content if b.type == "tool_use"] == ["tool_use"]
        assert final.stop_reason == "tool_use"


def test_parallel_calls_when_allowed_stay_within_the_bound(served):
    from mlx_lfm2.text.tool_grammar import MAX_CALLS

    _, client, _ = served
    for seed in range(3):
        c = client.chat.completions.create(model="m", messages=MSGS, tools=[PING], tool_choice="required",
                                           temperature=1.0, seed=seed, max_tokens=64).choices[0]
        assert 1 <= len(c.message.tool_calls) <= MAX_CALLS and c.finish_reason == "tool_calls"


def test_lenient_schema_says_what_it_skipped_and_whether_the_reply_validates(served):
    base, client, _ = served
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 3}, "maxItems": 4,
              "uniqueItems": True}
    rf = {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}
    for seed in range(3):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=MSGS, max_tokens=24, seed=seed,
                                                               temperature=1.0, response_format=rf)
        assert "uniqueItems" in raw.headers["x-schema-warnings"]
        choice = raw.parse().choices[0]
        extra = choice.model_extra
        assert any("uniqueItems" in w for w in extra["response_format_warnings"])
        value = json.loads(choice.message.content)
        assert extra["response_format_valid"] == (len(set(value)) == len(value)), value
        assert bool(extra.get("response_format_errors")) != extra["response_format_valid"]
    with httpx.stream("POST", base + "/v1/chat/completions", json={
            "messages": MSGS, "max_tokens": 24, "stream": True, "response_format": rf}) as r:
        assert "uniqueItems" in r.headers["x-schema-warnings"]
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "response_format_valid" in events[-1]["choices"][0]


@pytest.mark.parametrize("tool, message", [
    ({"name": "f", "parameters": {"type": "object", "properties": {"a": {"enum": []}}, "required": ["a"]}},
     "empty enum admits no value"),
    ({"name": "f", "parameters": {"type": "object", "properties": {"a": {}}, "required": "a"}},
     "required must be a list"),
    ({"name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": 7}}}}, r"\$ref must be a string"),
])
def test_malformed_or_unsatisfiable_forced_tools_are_400s_in_both_apis(served, tool, message):
    import re

    base, _, _ = served
    r = httpx.post(base + "/v1/chat/completions", json={
        "messages": MSGS, "tools": [{"type": "function", "function": tool}], "tool_choice": "required"})
    assert r.status_code == 400 and re.search(message, r.json()["error"]["message"]), r.text
    r = httpx.post(base + "/v1/messages", json={
        "model": "m", "max_tokens": 8, "messages": MSGS, "tool_choice": {"type": "any"},
        "tools": [{"name": tool["name"], "input_schema": tool["parameters"]}]})
    assert r.status_code == 400 and re.search(message, r.json()["error"]["message"]), r.text


def test_a_reply_cut_by_max_tokens_keeps_the_calls_it_finished(tok):
    """A model that writes a call, then starts another it cannot finish: both APIs return the
    finished call, and say the reply was cut."""
    ids = tok.encode('<|tool_call_start|>[ping(), get_weather(city="Oslo and more', add_special_tokens=False)
    model = ScriptedModel(ids + [tok.encode(" and", add_special_tokens=False)[0]])
    with serving(model, tok) as base:
        o = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        kw = dict(model="m", messages=MSGS, tools=[PING, WEATHER], max_tokens=len(ids) + 3)
        c = o.chat.completions.create(**kw).choices[0]
        assert c.finish_reason == "length" and [t.function.name for t in c.message.tool_calls] == ["ping"]
        assert not c.message.content
        chunks = [x for x in o.chat.completions.create(stream=True, **kw) if x.choices]
        assert [t.function.name for x in chunks for t in (x.choices[0].delta.tool_calls or [])] == ["ping"]
        assert chunks[-1].choices[0].finish_reason == "length"
        assert "".join(x.choices[0].delta.content or "" for x in chunks) == ""
        a = anthropic.Anthropic(base_url=base, api_key="x", max_retries=0)
        r = a.messages.create(model="m", max_tokens=len(ids) + 3, messages=MSGS,
                              tools=[{"name": "ping", "input_schema": {"type": "object", "properties": {}}},
                                     {"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}])
        assert r.stop_reason == "max_tokens" and [b.name for b in r.content if b.type == "tool_use"] == ["ping"]


@pytest.fixture(scope="module")
def tok(chat_model):
    return chat_model[1]
