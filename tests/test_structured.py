"""Constrained decoding. A random-weight model is noise, so every reply that parses and
validates is the constraint's doing: each case samples at temperature 1 over several seeds."""

import json
import re
from pathlib import Path

import jsonschema
import mlx.core as mx
import numpy as np
import pytest

from conftest import ScriptedModel
from mlx_lfm2 import parse_tool_calls, stream_generate
from mlx_lfm2.text.constraints import ConstraintError, make_constraint
from mlx_lfm2.text.tool_grammar import tool_call_grammar

TRICKY = json.loads((Path(__file__).parent / "fixtures" / "tricky_schemas.json").read_text(encoding="utf-8"))
SEEDS = (0, 1, 2)
CHAT = [{"role": "user", "content": "Reply in JSON."}]


def sample(chat_model, max_tokens=160, seed=0, prompt=CHAT, **constraint):
    model, tok, _ = chat_model
    rs = list(stream_generate(model, tok, prompt, max_tokens=max_tokens, temperature=1.0, seed=seed, **constraint))
    return "".join(r.text for r in rs), rs[-1]


@pytest.fixture(scope="module")
def tok(chat_model):
    return chat_model[1]  # the real tokenizer; sharing it shares llguidance's view of it (~1 s to build)


@pytest.mark.parametrize("name", sorted(TRICKY))
def test_every_random_reply_validates_against_the_schema(chat_model, name):
    schema = TRICKY[name]
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    for seed in SEEDS:
        text, last = sample(chat_model, seed=seed, json_schema=schema)
        assert last.finish_reason == "stop", (seed, text)  # the value closed, then the stop token
        validator.validate(json.loads(text))


def test_unconstrained_random_replies_are_not_json(chat_model):
    """The control: without the constraint the same model and seeds write noise."""
    for seed in SEEDS:
        text, _ = sample(chat_model, max_tokens=24, seed=seed)
        with pytest.raises(ValueError):
            json.loads(text)


def test_regex_and_lark_grammar(chat_model):
    pattern = r"[A-Z]{3}-[0-9]{2,4}( \(café\))?"
    for seed in SEEDS:
        text, last = sample(chat_model, seed=seed, regex=pattern)
        assert re.fullmatch(pattern, text) and last.finish_reason == "stop", text
    grammar = 'start: "The answer is " ANSWER "."\nANSWER: "yes" | "no" | /[0-9]{1,3}/'
    for seed in SEEDS:
        text, _ = sample(chat_model, seed=seed, grammar=grammar)
        assert re.fullmatch(r"The answer is (yes|no|[0-9]{1,3})\.", text), text


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "required": ["city"],
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}, "hourly": {"type": "boolean"},
                   "note": {"type": ["string", "null"], "maxLength": 4},
                   "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                   "at": {"type": "object", "required": ["lat"], "additionalProperties": False,
                          "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                         "lon": {"type": "integer", "minimum": 0, "maximum": 9}}}}}}}
PING = {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("name", [None, "get_weather"])
def test_forced_tool_calls_parse_and_match_their_schemas(chat_model, name):
    tools = [WEATHER, PING]
    grammar = tool_call_grammar(tools, name)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for seed in SEEDS:
        text, last = sample(chat_model, max_tokens=200, seed=seed, grammar=grammar)
        parsed = parse_tool_calls(text)
        assert last.finish_reason == "stop" and parsed.calls and not parsed.errors, text
        assert parsed.content == ""
        for call in parsed.calls:
            assert name is None or call["name"] == name
            jsonschema.validate(call["arguments"], schemas[call["name"]])


@pytest.mark.parametrize("name", [None, "get_weather"])
def test_opened_tool_grammar_continues_the_forced_opening(tok, name):
    """The server writes the opening into the prompt; the grammar covers the rest, so the
    opening plus any text the grammar accepts is a call that parses."""
    from mlx_lfm2.text.tool_grammar import forced_tool_opening

    grammar = tool_call_grammar([WEATHER, PING], name, opened=True)
    rest = ('city="Oslo", days=3)]' if name else 'ping(), get_weather(city="Oslo", hourly=True)]') + "<|tool_call_end|>"
    c = make_constraint(tok, grammar=grammar)
    for t in tok.encode(rest, add_special_tokens=False):
        assert c.allowed(65536)[t], tok.decode([t])
        c.advance([t])
    assert c.done
    calls = parse_tool_calls(forced_tool_opening(name) + rest).calls
    assert calls[-1] == {"name": "get_weather", "arguments": {"city": "Oslo", **({"days": 3} if name else {"hourly": True})}}


def test_tool_grammar_rejects_what_the_call_syntax_cannot_carry():
    with pytest.raises(ConstraintError, match="'first-name' is not a Python name"):
        tool_call_grammar([{"name": "f", "parameters": {"properties": {"first-name": {"type": "string"}}}}])
    with pytest.raises(ConstraintError, match="'nope', which is not one of the tools"):
        tool_call_grammar([PING], "nope")


def test_value_that_cannot_close_in_time_ends_with_length(chat_model):
    schema = {"type": "object", "required": ["essay"], "properties": {"essay": {"type": "string", "minLength": 400}}}
    text, last = sample(chat_model, max_tokens=12, json_schema=schema)
    assert last.finish_reason == "length" and last.generation_tokens == 12
    assert text.startswith('{"essay": "')


@pytest.mark.parametrize("kwargs, message", [
    (dict(json_schema={"type": "array", "uniqueItems": True}), "uniqueItems"),
    (dict(json_schema={"type": "strin"}), "Invalid type: strin"),
    (dict(json_schema={"type": "integer", "minimum": 5, "maximum": 3}), "minimum"),
    (dict(json_schema='{"type": '), "not valid JSON"),
    (dict(json_schema={"$ref": "#/$defs/missing"}), "missing"),
    (dict(regex="([a-z]"), "unclosed group"),
    (dict(grammar="start: undefined_rule"), "undefined_rule"),
    (dict(json_schema={"type": "object"}, regex="a"), "one constraint"),
])
def test_bad_constraints_are_clear_value_errors(chat_model, kwargs, message):
    model, tok, _ = chat_model
    with pytest.raises(ConstraintError, match=message) as e:
        list(stream_generate(model, tok, "x", max_tokens=4, **kwargs))
    assert isinstance(e.value, ValueError)


def test_lenient_schema_ignores_unsupported_keywords(chat_model):
    schema = {"type": "array", "items": {"enum": [1, 2]}, "maxItems": 2, "uniqueItems": True,
              "x-guidance": {"lenient": True}}
    text, last = sample(chat_model, json_schema=schema)
    assert last.finish_reason == "stop" and set(json.loads(text)) <= {1, 2}


def test_padding_rows_past_the_tokenizer_are_masked(tok):
    """The embedding has more rows (65536) than the tokenizer has tokens (64400): a model that
    prefers a padding row must still write what the regex allows."""
    c = make_constraint(tok, regex="[ab]+")
    assert not c.allowed(65536)[tok.vocab_size:].any()
    model = ScriptedModel([65000], vocab=65536)
    rs = list(stream_generate(model, tok, [1, 2], max_tokens=6, regex="[ab]+"))
    assert all(r.token is None or r.token < tok.vocab_size for r in rs)
    assert re.fullmatch("[ab]+", "".join(r.text for r in rs))


def test_constraint_keeps_the_models_choice_when_it_is_allowed(tok):
    """Greedy picks the scripted token whenever the grammar allows it, and stops once the
    grammar closes, even though the script would go on."""
    ids = tok.encode('{"a": 1}', add_special_tokens=False)
    model = ScriptedModel(ids + ids)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}
    rs = list(stream_generate(model, tok, [1, 2, 3], max_tokens=20, json_schema=schema))
    assert "".join(r.text for r in rs) == '{"a": 1}'
    assert rs[-1].finish_reason == "stop" and rs[-1].token in tok.eos_token_ids
    assert rs[-1].generation_tokens == len(ids) + 1


def test_mask_is_built_while_the_forward_runs(tok, monkeypatch):
    """The processor queues the read of the new token, then the step's forward, and only then
    advances the matcher and computes the mask (the device never waits on the matcher)."""
    events = []
    logits = mx.zeros((1, 65536))
    c = make_constraint(tok, regex="[ab]+", prompt_tokens=2)
    real_async_eval, real_allowed, real_advance = mx.async_eval, c.allowed, c.advance
    monkeypatch.setattr(mx, "async_eval", lambda *a: (
        events.append("forward" if any(x is logits for x in a) else "read"), real_async_eval(*a))[1])
    monkeypatch.setattr(c, "allowed", lambda v: (events.append("mask"), real_allowed(v))[1])
    monkeypatch.setattr(c, "advance", lambda t: (events.append("advance"), real_advance(t))[1])
    a = tok.encode("a", add_special_tokens=False)
    out = c(mx.array([1, 2] + a), logits)
    assert events == ["read", "forward", "advance", "mask"] and c.tokens == a
    allowed = set(np.flatnonzero(np.array(out[0] > -np.inf)).tolist())
    assert tok.eos_token_ids <= allowed  # "a" already matches
    assert all(set(tok.decode([t])) <= {"a", "b"} for t in allowed - tok.eos_token_ids)


@pytest.mark.slow  # a subprocess
def test_chat_cli_json_schema_replies_validate(checkpoint, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    import sys

    from conftest import ROOT, tiny_config

    schema = {"type": "object", "additionalProperties": False, "required": ["ok", "n"],
              "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    (tmp_path / "bad.json").write_text(json.dumps({"type": "array", "uniqueItems": True}))
    folder = checkpoint(tiny_config("tiny-moe"), tokenizer=True)
    args = [str(ROOT / "chat.py"), "--model", str(folder), "--temperature", "1", "--seed", "3", "--no-markdown"]
    env = {"TERM": "xterm", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    child = pexpect.spawn(sys.executable, args + ["--json-schema", "schema.json"], encoding="utf-8",
                          timeout=60, dimensions=(50, 150), cwd=str(tmp_path), env=env)
    try:
        child.expect(">>> ")
        for _ in range(2):
            child.sendline("Give me a record.")
            child.expect(r"prompt tokens @")
            shown = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", child.before)  # the live view redraws
            reply = re.findall(r"\{[^\r\n]*\}", shown)[-1]
            jsonschema.validate(json.loads(reply), schema)
            child.expect(">>> ")
    finally:
        child.close(force=True)
    bad = pexpect.run(sys.executable, args=args + ["--json-schema", "bad.json"], cwd=str(tmp_path), env=env,
                      encoding="utf-8", timeout=60, withexitstatus=True)
    assert bad[1] != 0 and "bad.json is not a usable JSON schema" in bad[0] and "uniqueItems" in bad[0]


def test_constraint_follows_history_forward_and_back(tok):
    """As speculative decoding calls it: several new ids at once are consumed; drafts replaced
    by other ids are rolled back; an id the grammar refuses is skipped. Each mask equals that
    of a fresh constraint fed only the ids that stand."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    logits = mx.zeros((1, 65536))
    c = make_constraint(tok, json_schema=schema, prompt_tokens=1)

    def check(generated, valid):
        out = c(mx.array([0] + generated), logits)
        fresh = make_constraint(tok, json_schema=schema)
        assert fresh.advance(valid) == len(valid)
        assert c.tokens == valid and (np.array(out[0] > -np.inf) == fresh.allowed(65536)).all()

    head = enc('{"a": ')
    check(head + enc("12"), head + enc("12"))
    check(head + enc("7"), head + enc("7"))  # a different id in the same place
    check(head, head)  # taken back
    check(head + enc("7") + enc("x") + enc("1"), head + enc("7"))  # refused, and what follows it


def test_finished_value_skips_the_stop_token(tok):
    c = make_constraint(tok, regex="ab", prompt_tokens=0)
    c(mx.array(tok.encode("ab", add_special_tokens=False)), mx.zeros((1, 65536)))
    assert c.done
    out = c(mx.array(tok.encode("ab", add_special_tokens=False) + [7]), mx.zeros((1, 65536)))
    assert set(np.flatnonzero(np.array(out[0] > -np.inf)).tolist()) == set(tok.eos_token_ids)


# --- The server: response_format and forced tool calls over HTTP, with the random model


@pytest.fixture(scope="module")
def served(chat_model):
    import threading
    import time

    import uvicorn

    openai = pytest.importorskip("openai")
    from mlx_lfm2.serve.app import create_app
    from mlx_lfm2.serve.scheduler import Scheduler
    from conftest import free_port

    model, tok, _ = chat_model
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(Scheduler(model, tok, "tiny")), host="127.0.0.1", port=port,
                                        log_level="warning"))
    threading.Thread(target=srv.run, daemon=True).start()
    while not srv.started:
        time.sleep(0.02)
    base = f"http://127.0.0.1:{port}"
    yield base, openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    srv.should_exit = True


def strict(schema):
    return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}


def test_server_response_format_replies_validate_streamed_or_not(served):
    _, client = served
    schema = TRICKY["nested"]
    msgs = [{"role": "user", "content": "Who is it?"}]
    for seed in SEEDS:
        kw = dict(model="m", messages=msgs, temperature=1.0, seed=seed, max_tokens=160, response_format=strict(schema))
        r = client.chat.completions.create(**kw)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        chunks = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices]
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    for seed in SEEDS:  # any object: the random model may not close its keys in time
        r = client.chat.completions.create(model="m", messages=msgs, temperature=1.0, seed=seed, max_tokens=64,
                                           response_format={"type": "json_object"})
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert text.startswith("{") and (finish == "length" or isinstance(json.loads(text), dict)), text


def test_server_completions_take_response_format_too(served):
    _, client = served
    schema = TRICKY["patterns"]
    for stream in (False, True):
        r = client.completions.create(model="m", prompt="Code:", temperature=1.0, seed=1, max_tokens=64,
                                      stream=stream, extra_body={"response_format": strict(schema)})
        text = "".join(c.choices[0].text for c in r) if stream else r.choices[0].text
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_server_forced_tool_calls_always_parse(served, choice):
    _, client = served
    params = WEATHER["function"]["parameters"]
    for seed in SEEDS:
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Weather?"}],
                                           tools=[WEATHER, PING], tool_choice=choice, temperature=1.0, seed=seed,
                                           max_tokens=200)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.tool_calls, c.message.content
        for call in c.message.tool_calls:
            assert choice == "required" or call.function.name == "get_weather"
            if call.function.name == "get_weather":
                jsonschema.validate(json.loads(call.function.arguments), params)


def test_server_rejects_bad_schemas_with_a_400_naming_the_problem(served):
    import httpx

    base, client = served
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 8}
    bad = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "uniqueItems": True}
    for stream in (False, True):
        r = httpx.post(base + "/v1/chat/completions", json={**body, "stream": stream, "response_format": strict(bad)})
        err = r.json()["error"]
        assert r.status_code == 400 and "uniqueItems" in err["message"] and err["param"] == "response_format"
    r = httpx.post(base + "/v1/chat/completions", json={**body, "response_format": strict({"type": "intger"})})
    assert r.status_code == 400 and "intger" in r.json()["error"]["message"]
    r = httpx.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 8, "response_format": strict(
        {"type": "string", "pattern": "(unclosed"})})
    assert r.status_code == 400 and "unclosed group" in r.json()["error"]["message"]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"a-b": {}}}}}]
    r = httpx.post(base + "/v1/chat/completions", json={**body, "tools": tools, "tool_choice": "required"})
    assert r.status_code == 400 and "'a-b' is not a Python name" in r.json()["error"]["message"]
    # Without strict, what cannot be enforced is skipped (best effort), not refused.
    lenient = {"type": "json_schema", "json_schema": {"name": "r", "schema": {**bad, "maxItems": 3}}}
    r = client.chat.completions.create(model="m", messages=body["messages"], max_tokens=40, response_format=lenient)
    assert all(isinstance(v, int) for v in json.loads(r.choices[0].message.content))
    # A value that cannot close within max_tokens ends with "length".
    long = strict({"type": "object", "required": ["s"], "properties": {"s": {"type": "string", "minLength": 999}}})
    r = client.chat.completions.create(model="m", messages=body["messages"], max_tokens=8, response_format=long)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8


def test_tool_grammar_follows_refs_and_recursion(tok):
    """$defs (recursive here) become rules; each tool's refs point into its own $defs."""
    node = {"type": "object", "required": ["v"], "properties": {
        "v": {"type": "integer", "minimum": 0, "maximum": 9},
        "kids": {"type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/node"}}}}
    tree = {"name": "tree", "parameters": {"$defs": {"node": node}, "type": "object", "required": ["root"],
                                           "properties": {"root": {"$ref": "#/$defs/node"}}}}
    other = {"name": "flag", "parameters": {"$defs": {"node": {"type": "boolean"}}, "type": "object",
                                            "required": ["on"], "properties": {"on": {"$ref": "#/$defs/node"}}}}
    c = make_constraint(tok, grammar=tool_call_grammar([tree, other]))
    text = '<|tool_call_start|>[tree(root={"v": 1, "kids": [{"v": 2}, {"v": 3, "kids": []}]}), flag(on=True)]<|tool_call_end|>'
    ids = tok.encode(text, add_special_tokens=False)
    assert c.advance(ids) == len(ids) and c.done
    assert [x["name"] for x in parse_tool_calls(text).calls] == ["tree", "flag"]
    bad = make_constraint(tok, grammar=tool_call_grammar([tree, other]))
    wrong = tok.encode('<|tool_call_start|>[flag(on={"v": 1', add_special_tokens=False)
    assert bad.advance(wrong) < len(wrong)


def test_constraints_hold_per_row_in_a_batch(chat_model):
    """BatchGenerator runs each row's processors on its own row: two schemas and one free row
    decode together, each constrained row validates."""
    from mlx_lfm2.engine.batch import BatchGenerator
    from mlx_lfm2.engine.sample import make_sampler

    model, tok, _ = chat_model
    schemas = [TRICKY["patterns"], TRICKY["bounded_numbers"], None]
    gen = BatchGenerator(model, max_batch=3)
    uids = {}
    for i, schema in enumerate(schemas):
        ids = tok.apply_chat_template([{"role": "user", "content": f"Row {i}"}], tokenize=True)
        procs = [make_constraint(tok, json_schema=schema, prompt_tokens=len(ids))] if schema else []
        uid = gen.insert(ids, max_tokens=120, sampler=make_sampler(1.0, seed=i), logits_processors=procs,
                         stop_tokens=tok.eos_token_ids)
        uids[uid] = (schema, [], None)
    while len(gen):
        for t in gen.step():
            schema, out, _ = uids[t.uid]
            if t.finish_reason != "stop":
                out.append(t.token)
            uids[t.uid] = (schema, out, t.finish_reason)
    for schema, out, finish in uids.values():
        if schema is not None:
            assert finish == "stop"
            jsonschema.validate(json.loads(tok.decode(out)), schema)
