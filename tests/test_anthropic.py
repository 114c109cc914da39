"""Anthropic's Messages API on a real loopback server, driven by the official `anthropic` SDK."""

import json
import time

import httpx
import pytest

from test_server import TOOLS as OPENAI_TOOLS

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")

TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
          "input_schema": t["function"]["parameters"]} for t in OPENAI_TOOLS]
CALL = 'Checking.<|tool_call_start|>[get_weather(city="Paris"), get_weather(city="Rome")]<|tool_call_end|>'


@pytest.fixture(scope="module")
def real(serve, chat_model):
    model, tok, _ = chat_model
    base, _ = serve(model, tok, api_key="sekrit")
    return base, anthropic.Anthropic(base_url=base, api_key="sekrit", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer():
    from conftest import reference_dir
    from mlx_lfm2.text.tokenizer import load_tokenizer

    return load_tokenizer(reference_dir())


@pytest.fixture
def scripted(serve, tokenizer):
    """A server whose model writes ``text`` (then the stop token 7, with ``stop=True``)."""
    from conftest import ScriptedModel

    def start(text, stop=True, queue_size=4, max_batch=8):
        ids = tokenizer.encode(text, add_special_tokens=False) + ([7] if stop else [])
        base, engine = serve(ScriptedModel(ids), tokenizer, queue_size=queue_size, max_batch=max_batch)
        return base, anthropic.Anthropic(base_url=base, api_key="x", max_retries=0)

    return start


def ask(client, content="Hello!", **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("extra_body", {"temperature": 0})  # the SDK (2.x) no longer names sampling arguments
    return client.messages.create(model="local", messages=[{"role": "user", "content": content}], **kw)


def test_messages_whole_and_streamed_agree_with_the_openai_route(real, chat_model):
    base, client = real
    tok = chat_model[1]
    r = ask(client, "Count the tokens, please", system="Be brief.", max_tokens=10)
    assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg_")
    assert r.stop_reason in ("end_turn", "max_tokens") and r.content[0].type == "text"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count the tokens, please"}]
    n_prompt = len(tok.apply_chat_template(msgs, tokenize=True))
    assert r.usage.input_tokens + (r.usage.cache_read_input_tokens or 0) == n_prompt
    assert r.usage.output_tokens <= 10
    oa = openai.OpenAI(base_url=base + "/v1", api_key="sekrit", max_retries=0).chat.completions.create(
        model="m", messages=msgs, max_tokens=10, temperature=0)
    assert r.content[0].text == oa.choices[0].message.content  # system given as blocks or a field: one prompt
    blocks = [{"type": "text", "text": "Be brief."}]
    assert ask(client, "Count the tokens, please", system=blocks, max_tokens=10).content[0].text == r.content[0].text

    with client.messages.stream(model="local", max_tokens=10, extra_body={"temperature": 0}, system="Be brief.",
                                messages=[{"role": "user", "content": "Count the tokens, please"}]) as s:
        events = [e.type for e in s]
        final = s.get_final_message()
    assert final.content[0].text == r.content[0].text and final.stop_reason == r.stop_reason
    assert final.usage.output_tokens == r.usage.output_tokens
    assert events[0] == "message_start" and events[-2:] == ["message_delta", "message_stop"]
    counted = client.messages.count_tokens(model="local", system="Be brief.",
                                           messages=[{"role": "user", "content": "Count the tokens, please"}])
    assert counted.input_tokens == n_prompt


def test_tool_use_blocks_whole_and_streamed(scripted):
    base, client = scripted(CALL)
    msgs = [{"role": "user", "content": "Weather in Paris and Rome?"}]
    r = client.messages.create(model="m", max_tokens=64, messages=msgs, tools=TOOLS)
    assert r.stop_reason == "tool_use"
    assert [b.type for b in r.content] == ["text", "tool_use", "tool_use"] and r.content[0].text == "Checking."
    assert [(b.name, b.input) for b in r.content[1:]] == [("get_weather", {"city": "Paris"}),
                                                          ("get_weather", {"city": "Rome"})]
    assert all(b.id.startswith("toolu_") for b in r.content[1:])

    with client.messages.stream(model="m", max_tokens=64, messages=msgs, tools=TOOLS) as s:
        events = [(e.type, getattr(e, "index", None)) for e in s if not e.type.endswith(("text", "input_json"))]
        final = s.get_final_message()
    assert [(b.type, getattr(b, "input", None)) for b in final.content] == [
        ("text", None), ("tool_use", {"city": "Paris"}), ("tool_use", {"city": "Rome"})]
    assert final.content[0].text == "Checking." and final.stop_reason == "tool_use"
    starts = [i for kind, i in events if kind == "content_block_start"]
    stops = [i for kind, i in events if kind == "content_block_stop"]
    assert starts == stops == [0, 1, 2]

    # the results go back as tool_result blocks; the call turn is replayed as LFM2 call text
    follow = client.messages.create(model="m", max_tokens=4, tools=TOOLS, messages=msgs + [
        {"role": "assistant", "content": [b.model_dump() for b in r.content]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": r.content[1].id, "content": '{"temp": 21}'},
            {"type": "tool_result", "tool_use_id": r.content[2].id,
             "content": [{"type": "text", "text": '{"temp": 25}'}]}]}])
    assert follow.role == "assistant"


def test_anthropic_conversation_renders_the_same_prompt_as_its_openai_twin(tokenizer):
    from mlx_lfm2.serve.anthropic import MessagesRequest, template_messages
    from mlx_lfm2.serve.openai_api import ChatRequest, to_template_messages

    ours = MessagesRequest.model_validate({"max_tokens": 5, "system": "Use tools.", "tools": TOOLS, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "cold"},
                                     {"type": "text", "text": "And now?"}]}]})
    twin = ChatRequest.model_validate({"tools": OPENAI_TOOLS, "messages": [
        {"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "toolu_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "cold"}, {"role": "user", "content": "And now?"}]})
    render = lambda msgs, tools: tokenizer.apply_chat_template(msgs, tools=tools)  # noqa: E731
    a = render(template_messages(ours, False), ours.offered_tools)
    assert a == render(to_template_messages(twin, False), twin.tools)
    assert '<|tool_call_start|>[get_weather(city="Oslo")]<|tool_call_end|>Let me look.' in a
    assert "<|tool_response_start|>cold<|tool_response_end|>" in a and '"name": "get_weather"' in a


@pytest.mark.parametrize("choice, script", [
    ({"type": "tool", "name": "get_weather"}, 'city="Oslo")]<|tool_call_end|>'),
    ({"type": "any"}, 'get_weather(city="Oslo")]<|tool_call_end|>'),
])
def test_tool_choice_any_and_named_make_the_reply_a_call(scripted, choice, script):
    base, client = scripted(script)  # the model writes only what follows the forced opening
    msgs = [{"role": "user", "content": "Weather in Oslo?"}]
    r = client.messages.create(model="m", max_tokens=32, messages=msgs, tools=TOOLS, tool_choice=choice)
    assert [(b.type, b.name, b.input) for b in r.content] == [("tool_use", "get_weather", {"city": "Oslo"})]
    assert r.stop_reason == "tool_use"
    with client.messages.stream(model="m", max_tokens=32, messages=msgs, tools=TOOLS, tool_choice=choice) as s:
        final = s.get_final_message()
    assert [(b.type, b.input) for b in final.content] == [("tool_use", {"city": "Oslo"})]


def test_tool_choice_none_hides_the_tools_and_leaves_calls_as_text(scripted):
    base, client = scripted(CALL)
    msgs = [{"role": "user", "content": "Weather?"}]
    bare = client.messages.count_tokens(model="m", messages=msgs).input_tokens
    assert client.messages.count_tokens(model="m", messages=msgs, tools=TOOLS).input_tokens > bare
    assert client.messages.count_tokens(model="m", messages=msgs, tools=TOOLS,
                                        tool_choice={"type": "none"}).input_tokens == bare
    r = client.messages.create(model="m", max_tokens=64, messages=msgs, tools=TOOLS, tool_choice={"type": "none"})
    assert [b.type for b in r.content] == ["text"] and r.stop_reason == "end_turn"


def test_stop_sequences_and_max_tokens_set_the_stop_reason(scripted):
    base, client = scripted(" alpha beta STOP gamma END", stop=False)
    r = ask(client, max_tokens=40, stop_sequences=["END", "STOP"])
    assert r.content[0].text == " alpha beta " and r.stop_reason == "stop_sequence" and r.stop_sequence == "STOP"
    with client.messages.stream(model="m", max_tokens=40, stop_sequences=["END", "STOP"],
                                messages=[{"role": "user", "content": "Hello!"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == " alpha beta " and final.stop_reason == "stop_sequence" and final.stop_sequence == "STOP"
    r = ask(client, max_tokens=2)
    assert r.stop_reason == "max_tokens" and r.usage.output_tokens == 2 and r.stop_sequence is None


BAD = [  # (name, body or raw bytes, headers, status, Anthropic error type)
    ("no key", {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, {}, 401, "authentication_error"),
    ("wrong key", {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, {"x-api-key": "nope"}, 401,
     "authentication_error"),
    ("not json", b"{nope", None, 400, "invalid_request_error"),
    ("no max_tokens", {"messages": [{"role": "user", "content": "x"}]}, None, 400, "invalid_request_error"),
    ("no messages", {"max_tokens": 5, "messages": []}, None, 400, "invalid_request_error"),
    ("unknown role", {"max_tokens": 5, "messages": [{"role": "tool", "content": "x"}]}, None, 400,
     "invalid_request_error"),
    ("temperature", {"max_tokens": 5, "temperature": 1.5, "messages": [{"role": "user", "content": "x"}]}, None,
     400, "invalid_request_error"),
    ("unknown block", {"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "search_result", "source": "x", "content": []}]}]}, None, 400, "invalid_request_error"),
    ("tool_result of a bare string", {"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image", "source": {}}, "x"]}]}]}, None,
     400, "invalid_request_error"),
    ("tool_use from the user", {"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]}, None, 400, "invalid_request_error"),
    ("server tool", {"max_tokens": 5, "tools": [{"type": "web_search_20250305", "name": "web_search"}],
                     "messages": [{"role": "user", "content": "x"}]}, None, 400, "invalid_request_error"),
    ("tool_choice unknown", {"max_tokens": 5, "tools": TOOLS, "tool_choice": {"type": "tool", "name": "nope"},
                             "messages": [{"role": "user", "content": "x"}]}, None, 400, "invalid_request_error"),
    ("any without tools", {"max_tokens": 5, "tool_choice": {"type": "any"},
                           "messages": [{"role": "user", "content": "x"}]}, None, 400, "invalid_request_error"),
    ("too long", {"max_tokens": 5, "messages": [{"role": "user", "content": "word " * 3000}]}, None, 400,
     "invalid_request_error"),
    ("huge body", b"x" * (5 * 1024 * 1024), None, 413, "request_too_large"),
]


def test_malformed_requests_get_anthropic_errors_and_the_server_keeps_serving(real):
    base, client = real
    for name, body, headers, status, kind in BAD:
        headers = {"x-api-key": "sekrit"} if headers is None else headers
        if isinstance(body, bytes):
            r = httpx.post(base + "/v1/messages", content=body, headers={**headers, "content-type": "application/json"},
                           timeout=30)
        else:
            r = httpx.post(base + "/v1/messages", json=body, headers=headers, timeout=30)
        assert r.status_code == status, (name, r.status_code, r.text)
        err = r.json()
        assert err["type"] == "error" and err["error"]["type"] == kind and err["error"]["message"], (name, err)
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=base, api_key="wrong", max_retries=0).messages.create(
            model="m", max_tokens=3, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="m", max_tokens=3, messages=[{"role": "user", "content": "x"}],
                               extra_body={"temperature": 3})
    assert e.value.body["error"]["type"] == "invalid_request_error" and "temperature" in e.value.message
    for method, path, status, kind in [("GET", "/v1/messages", 405, "invalid_request_error"),
                                       ("POST", "/v1/messages/batches", 404, "not_found_error")]:
        r = httpx.request(method, base + path, headers={"x-api-key": "sekrit"})
        assert r.status_code == status and r.json()["error"]["type"] == kind, r.text
    r = httpx.post(base + "/v1/messages", content=b"{}", headers={"x-api-key": "sekrit", "content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["type"] == "error"
    bearer = httpx.post(base + "/v1/messages", headers={"Authorization": "Bearer sekrit"},
                        json={"max_tokens": 3, "messages": [{"role": "user", "content": "still there?"}]})
    assert bearer.status_code == 200 and bearer.json()["content"][0]["type"] == "text"


def test_a_full_queue_answers_rate_limit_error(scripted):
    base, client = scripted(" word" * 100000, stop=False, queue_size=1, max_batch=1)
    body = {"max_tokens": 100000, "stream": True, "messages": [{"role": "user", "content": "long"}]}
    streams = [httpx.stream("POST", base + "/v1/messages", json=body, timeout=30) for _ in range(2)]
    opened = [s.__enter__() for s in streams]  # one running (the batch is full), one queued
    try:
        for _ in range(100):
            if httpx.get(base + "/health").json()["queued"] == 1:
                break
            time.sleep(0.05)
        r = httpx.post(base + "/v1/messages", json=body, timeout=30)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert opened[0].status_code == 200
    finally:
        for s in streams:
            s.__exit__(None, None, None)


def test_bare_call_lists_are_calls_on_both_apis_only_when_tools_are_offered(scripted):
    base, client = scripted('[get_weather(city="Paris")]')
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.messages.create(model="m", max_tokens=32, messages=msgs, tools=TOOLS)
    assert [(b.type, b.name, b.input) for b in r.content] == [("tool_use", "get_weather", {"city": "Paris"})]
    with client.messages.stream(model="m", max_tokens=32, messages=msgs, tools=TOOLS) as s:
        final = s.get_final_message()
    assert [(b.type, b.input) for b in final.content] == [("tool_use", {"city": "Paris"})]
    assert final.stop_reason == "tool_use"
    assert client.messages.create(model="m", max_tokens=32, messages=msgs).content[0].text == \
        '[get_weather(city="Paris")]'  # no tools offered: text

    oa = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    r = oa.chat.completions.create(model="m", messages=msgs, tools=OPENAI_TOOLS, max_tokens=32)
    (call,) = r.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert r.choices[0].finish_reason == "tool_calls" and not r.choices[0].message.content
    chunks = list(oa.chat.completions.create(model="m", messages=msgs, tools=OPENAI_TOOLS, max_tokens=32,
                                             stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == ""
    assert [t.function.name for d in deltas for t in d.tool_calls or []] == ["get_weather"]


LEVEL = {"name": "set_level", "description": "Set the level",
         "input_schema": {"type": "object", "properties": {"level": {"type": "integer", "minimum": 0, "maximum": 9}},
                          "required": ["level"], "additionalProperties": False}}
PICK = {"name": "pick", "input_schema": {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}},
                                         "required": ["color"], "additionalProperties": False}}


def test_forced_tool_use_follows_the_input_schema_and_output_format_gives_json(real):
    """On a random-weight model: the grammar alone makes these parse (tool_choice any/tool,
    output_config.format), whole and streamed."""
    _, client = real
    msgs = [{"role": "user", "content": "Set it."}]
    # (tools whose arguments close quickly: a random model's free strings may not end in time)
    for tools, choice in (([LEVEL, PICK], {"type": "any"}), (TOOLS + [LEVEL], {"type": "tool", "name": "set_level"})):
        r = client.messages.create(model="m", max_tokens=60, messages=msgs, tools=tools, tool_choice=choice,
                                   extra_body={"temperature": 0})
        assert r.stop_reason == "tool_use" and r.content and all(b.type == "tool_use" for b in r.content), r.content
        for b in r.content:
            assert b.input in ({"color": "red"}, {"color": "blue"}) or 0 <= b.input["level"] <= 9
        assert choice["type"] == "any" or {b.name for b in r.content} == {"set_level"}
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    kw = dict(model="m", max_tokens=40, messages=msgs, extra_body={"temperature": 0, "output_config": {
        "format": {"type": "json_schema", "schema": schema}}})
    r = client.messages.create(**kw)
    assert r.stop_reason == "end_turn" and set(json.loads(r.content[0].text)) == {"ok"}
    with client.messages.stream(**kw) as s:
        assert s.get_final_message().content[0].text == r.content[0].text
    bad = httpx.post(client.base_url.__str__().rstrip("/") + "/v1/messages", headers={"x-api-key": "sekrit"}, json={
        "max_tokens": 5, "messages": msgs, "output_format": {"type": "json_schema", "schema": "nope"}})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def claude_code_request(nonce: str, turns: list, max_tokens: int = 64000) -> dict:
    """The shape of Claude Code's requests (recorded from ``claude -p``, 2.1.x): a billing
    header with a per-request nonce as the first system block, a system message inside
    ``messages``, betas in fields the server does not use."""
    return {
        "model": "claude-opus-4-8", "max_tokens": max_tokens, "stream": True,
        "system": [{"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.1.197.{nonce}; cc_entrypoint=sdk-cli;"},
                   {"type": "text", "text": "You are a Claude agent.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "<system-reminder>today</system-reminder>"},
                                                  {"type": "text", "text": turns[0], "cache_control": {"type": "ephemeral"}}]},
                     {"role": "system", "content": "Available agent types: claude, Explore."}, *turns[1:]],
        "tools": TOOLS, "metadata": {"user_id": "{\"device_id\": \"abc\"}"}, "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
    }


def test_claude_code_requests_are_served_and_turn_two_reuses_turn_one(real, tokenizer):
    """System text inside ``messages`` stays a system turn where it stands; the billing
    header is not rendered, so the next turn's prompt extends this one's and is cached."""
    from mlx_lfm2.serve.anthropic import MessagesRequest, template_messages

    req = MessagesRequest.model_validate(claude_code_request("123", ["say hi"]))
    prompt = tokenizer.apply_chat_template(template_messages(req, False), tools=req.offered_tools,
                                           add_generation_prompt=True)
    assert "billing" not in prompt and "cc_version" not in prompt
    assert prompt.index("say hi") < prompt.index("<|im_start|>system\nAvailable agent types")

    base, _ = real
    usages = []
    turns = ["say hi"]
    for nonce in ("123", "9f2"):
        with httpx.stream("POST", base + "/v1/messages?beta=true", json=claude_code_request(nonce, turns, 24),
                          headers={"x-api-key": "sekrit", "anthropic-beta": "claude-code-20250219"}, timeout=60) as r:
            assert r.status_code == 200, r.read()
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        assert events[0]["type"] == "message_start", events[:2]
        start = events[0]["message"]["usage"]
        delta = next(e for e in events if e["type"] == "message_delta")["usage"]
        assert delta["input_tokens"] == start["input_tokens"]  # complete usage in message_delta
        assert delta["cache_read_input_tokens"] == start["cache_read_input_tokens"]
        usages.append(delta)
        reply = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
        turns += [{"role": "assistant", "content": [{"type": "text", "text": reply}]},
                  {"role": "user", "content": "and again"}]
    first = usages[0]["input_tokens"] + usages[0]["cache_read_input_tokens"]
    assert usages[1]["cache_read_input_tokens"] >= 0.95 * first, usages


def test_images_and_documents_become_placeholders_or_their_text(tokenizer):
    from mlx_lfm2.serve.anthropic import MessagesRequest, to_chat_messages

    req = MessagesRequest.model_validate({"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "The notes."}},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "AA=="}},
        {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image", "source": {}}]},
        {"type": "text", "text": "What do they say?"}]}]})
    assert to_chat_messages(req) == [
        {"role": "tool", "tool_call_id": "t", "content": "[image omitted: this model reads text only]"},
        {"role": "user", "content": "[image omitted: this model reads text only]\n\nThe notes.\n\n"
                                    "[document omitted: this model reads text only]\n\nWhat do they say?"}]


@pytest.mark.parametrize("stops, message", [(["s"] * 5, "at most 4 stop sequences"),
                                            (["x" * 1025], "a stop sequence is at most 1024 characters")])
def test_stop_sequences_have_the_openai_routes_bounds_and_each_api_answers_in_its_shape(real, stops, message):
    import openai

    base, client = real
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="m", max_tokens=3, messages=[{"role": "user", "content": "x"}],
                               stop_sequences=stops)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    assert message in e.value.message
    oai = openai.OpenAI(base_url=base + "/v1", api_key="sekrit", max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError) as e:  # the OpenAI route's validation status
        oai.chat.completions.create(model="m", max_tokens=3, messages=[{"role": "user", "content": "x"}], stop=stops)
    assert e.value.body["type"] == "invalid_request_error" and message in e.value.body["message"]
    r = client.messages.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "x"}],
                               stop_sequences=["s"] * 3 + ["x" * 1024])  # at the bounds: served
    assert r.stop_reason in ("max_tokens", "end_turn", "stop_sequence")
