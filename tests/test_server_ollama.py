"""Ollama's API on the server's port, driven by the ``ollama`` client package: the same
greedy reply as the OpenAI route, streamed or whole; format json; errors in Ollama's shape."""

import json

import httpx
import pytest

ollama = pytest.importorskip("ollama")


@pytest.fixture(scope="module")
def live(serve, chat_model):
    model, tok, _ = chat_model
    base, _ = serve(model, tok)
    return base


def openai_reply(base, messages, n=8):
    r = httpx.post(base + "/v1/chat/completions", json={"messages": messages, "max_tokens": n, "temperature": 0})
    return r.json()["choices"][0]["message"]["content"], r.json()["usage"]


def test_chat_whole_and_streamed_match_the_openai_route(live):
    client = ollama.Client(host=live)
    messages = [{"role": "user", "content": "Hello there"}]
    want, usage = openai_reply(live, messages)
    whole = client.chat(model="local-lfm2", messages=messages, options={"num_predict": 8, "temperature": 0})
    assert whole.message.content == want and whole.done and whole.done_reason == "length"
    assert whole.eval_count == usage["completion_tokens"] == 8
    assert whole.prompt_eval_count == usage["prompt_tokens"]
    parts = list(client.chat(model="local-lfm2", messages=messages, stream=True,
                             options={"num_predict": 8, "temperature": 0}))
    assert "".join(p.message.content for p in parts) == want
    assert [p.done for p in parts].count(True) == 1 and parts[-1].done and parts[-1].eval_count == 8


def test_generate_streams_ndjson_and_format_json_parses(live):
    client = ollama.Client(host=live)
    want, _ = openai_reply(live, [{"role": "user", "content": "Name a color"}], 6)
    text = "".join(p.response for p in client.generate(model="local-lfm2", prompt="Name a color", stream=True,
                                                        options={"num_predict": 6, "temperature": 0}))
    assert text == want
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    r = client.generate(model="local-lfm2", prompt="JSON please", format=schema,
                        options={"num_predict": 40, "temperature": 0})
    if r.done_reason == "stop":  # a random model may run out of tokens; a finished reply parses
        assert isinstance(json.loads(r.response)["a"], int)


def test_listing_routes_and_errors(live):
    client = ollama.Client(host=live)
    assert [m.model for m in client.list().models] == ["local-lfm2"]
    assert [m.model for m in client.ps().models] == ["local-lfm2"]
    assert client.show("local-lfm2").capabilities == ["completion", "tools"]
    assert httpx.get(live + "/api/version").json()["version"]
    r = httpx.post(live + "/api/chat", json={"messages": [{"role": "user", "content": "x"}], "format": "yaml"})
    assert r.status_code == 400 and r.json() == {"error": "format: 'json' or a JSON schema object"}
    with pytest.raises(ollama.ResponseError) as e:  # the client reads our errors
        client.chat(model="local-lfm2", messages=[{"role": "user", "content": "x"}], options={"temperature": 9})
    assert e.value.status_code == 422 and e.value.error.startswith("temperature:")
    r = httpx.post(live + "/api/chat", json={"messages": "nope"})
    assert r.status_code == 400 and r.json() == {"error": "messages: a list of {role, content}"}
    assert httpx.get(live + "/api/nothing").json()["error"].startswith("GET /api/nothing")


def test_tools_and_tool_history_render_as_the_openai_route_does(live):
    tool = {"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    asked = {"role": "user", "content": "Weather in Paris?"}
    ours = [asked, {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                                   "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]
    theirs = [asked, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_0"}]
    r = ollama.Client(host=live).chat(model="local-lfm2", messages=ours, tools=[tool],
                                      options={"num_predict": 4, "temperature": 0})
    want = httpx.post(live + "/v1/chat/completions", json={"messages": theirs, "tools": [tool], "max_tokens": 4,
                                                           "temperature": 0}).json()
    assert r.prompt_eval_count == want["usage"]["prompt_tokens"]
    assert r.message.content == (want["choices"][0]["message"]["content"] or "")

