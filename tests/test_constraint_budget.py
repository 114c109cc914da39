"""Constrained replies that always close: a budget-aware mask, bounded calls and numbers,
grammar limits, malformed and unsatisfiable schemas. The random model samples at
temperature 1, so every reply that ends valid is the constraint's doing."""

import json
import re
import warnings
from pathlib import Path

import jsonschema
import pytest

from mlx_lfm2 import parse_tool_calls, stream_generate
from mlx_lfm2.text.constraints import MAX_FRACTION_DIGITS, ConstraintError, make_constraint
from mlx_lfm2.text.tool_grammar import MAX_GRAMMAR_CHARS, forced_tool_opening, tool_call_grammar
from test_structured import PING, WEATHER

TRICKY = json.loads((Path(__file__).parent / "fixtures" / "tricky_schemas.json").read_text(encoding="utf-8"))
CHAT = [{"role": "user", "content": "Reply."}]
NOTE = {"type": "function", "function": {"name": "note", "parameters": {
    "type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}}}


def sample(chat_model, max_tokens, seed, **constraint):
    model, tok, _ = chat_model
    rs = list(stream_generate(model, tok, CHAT, max_tokens=max_tokens, temperature=1.0, seed=seed, **constraint))
    return "".join(r.text for r in rs), rs[-1]


def shortest(tok, **constraint) -> int:
    """The tokens the constraint's own completion of an empty reply takes (stop token included)."""
    return len(make_constraint(tok, **constraint).plan)


CASES = {**{name: {"json_schema": s} for name, s in TRICKY.items()},
         "regex": {"regex": r"[A-Z]{3}-[0-9]{2,4}( \(café\))?"},
         "forced_any": {"grammar": tool_call_grammar([WEATHER, PING, NOTE])},
         "forced_named": {"grammar": tool_call_grammar([WEATHER, NOTE], "note")}}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_budget_just_past_the_shortest_completion_still_ends_valid(chat_model, name):
    """max_tokens = the shortest completion + 3: noise everywhere the grammar allows it, and
    still every reply closes, stops, and validates (or parses as calls)."""
    tok = chat_model[1]
    budget = shortest(tok, **CASES[name]) + 3
    for seed in range(4):
        text, last = sample(chat_model, budget, seed, **CASES[name])
        assert last.finish_reason == "stop" and last.generation_tokens <= budget, (seed, text)
        if name in TRICKY:
            jsonschema.Draft202012Validator(TRICKY[name], format_checker=jsonschema.FormatChecker()).validate(json.loads(text))
        elif name == "regex":
            assert re.fullmatch(CASES[name]["regex"], text), text
        else:
            parsed = parse_tool_calls(text)
            assert parsed.calls and not parsed.errors and parsed.content == "", text


def test_an_unbounded_string_in_a_forced_call_closes_within_max_tokens(chat_model):
    """A string argument without maxLength: the random model would write it to max_tokens."""
    grammar = tool_call_grammar([NOTE], "note")
    for seed in range(4):
        text, last = sample(chat_model, 24, seed, grammar=grammar)
        calls = parse_tool_calls(text).calls
        assert last.finish_reason == "stop" and [c["name"] for c in calls] == ["note"], text


def test_without_parallel_calls_a_forced_block_holds_exactly_one_call(chat_model):
    grammar = tool_call_grammar([WEATHER, PING, NOTE], max_calls=1)
    for seed in range(5):
        text, last = sample(chat_model, 80, seed, grammar=grammar)
        parsed = parse_tool_calls(text)
        assert len(parsed.calls) == 1 and not parsed.errors and last.finish_reason == "stop", text


def test_parallel_calls_are_bounded(tok):
    """At most ``max_calls`` calls: the grammar refuses the separator before a third."""
    c = make_constraint(tok, grammar=tool_call_grammar([PING], max_calls=2))
    ids = tok.encode("<|tool_call_start|>[ping(), ping()", add_special_tokens=False)
    assert c.advance(ids) == len(ids)
    comma = tok.encode(",", add_special_tokens=False)
    assert not c.allowed(65536)[comma[0]]
    assert c.advance(tok.encode("]<|tool_call_end|>", add_special_tokens=False)) and c.done


@pytest.fixture(scope="module")
def tok(chat_model):
    return chat_model[1]


NUMBERS = {"type": "object", "required": ["a", "b", "c", "d"], "additionalProperties": False, "properties": {
    "a": {"type": "number", "minimum": 0, "maximum": 100000}, "b": {"type": "number", "maximum": 10},
    "c": {"type": "integer"}, "d": {"type": "array", "maxItems": 3, "items": {"type": "number"}}}}


def _digits_bounded(value) -> None:
    for v in value if isinstance(value, list) else [value]:
        assert abs(v) < 1e15, v
        if isinstance(v, float):
            assert len(repr(v).split(".")[1].split("e")[0]) <= MAX_FRACTION_DIGITS or "e-" in repr(v), v


def test_numbers_have_bounded_digits_and_keep_their_bounds(chat_model):
    for seed in range(4):
        text, last = sample(chat_model, 120, seed, json_schema=NUMBERS)
        value = json.loads(text)
        jsonschema.validate(value, NUMBERS)
        for v in value.values():
            _digits_bounded(v)
        for number in re.findall(r"-?[0-9][0-9.eE+-]*", text):  # as written, not as parsed
            whole, _, fraction = number.lstrip("-").partition(".")
            assert len(whole) <= 15 and len(fraction) <= MAX_FRACTION_DIGITS and "e" not in number.lower(), text


def _longest_accepted(tok, constraint, text: str) -> str:
    """How much of ``text``, fed one character at a time, the constraint takes."""
    for i, ch in enumerate(text):
        ids = tok.encode(ch, add_special_tokens=False)
        if constraint.advance(ids) < len(ids):
            return text[:i]
    return text


@pytest.mark.parametrize("schema", [{"type": "object"}, {}, {"type": "array"},
                                    {"type": "object", "properties": {"k": {"type": "number"}}}])
def test_numbers_in_values_a_schema_leaves_open_are_bounded_too(tok, schema):
    """``{"type": "object"}`` (json_object mode) and other open values: any JSON, bounded numbers."""
    for text, cut in [('{"z": 1234567890123456789', '{"z": 123456789012345'),
                      ('{"z": [0.12345678901', '{"z": [0.123456'), ('{"z": 1e99', '{"z": 1')]:
        if schema.get("type") == "array" or not schema:
            text, cut = text.replace('{"z": ', "["), cut.replace('{"z": ', "[")
        assert _longest_accepted(tok, make_constraint(tok, json_schema=schema), text) == cut


def test_tool_call_numbers_have_bounded_digits(chat_model):
    tool = {"name": "move", "parameters": {"type": "object", "required": ["x", "y"], "properties": {
        "x": {"type": "number", "maximum": 5}, "y": {}}}}
    for seed in range(4):
        text, _ = sample(chat_model, 80, seed, grammar=tool_call_grammar([tool], max_calls=1))
        (call,) = parse_tool_calls(text).calls
        assert call["arguments"]["x"] <= 5 and call["arguments"]["x"] > -1e15, text
        for number in re.findall(r"(?<![A-Za-z_\"])-?[0-9][0-9.]*", text.split("(", 1)[1]):
            whole, _, fraction = number.lstrip("-").partition(".")
            assert len(whole) <= 15 and len(fraction) <= MAX_FRACTION_DIGITS, text


BAD_TOOLS = [
    ({"name": "f", "parameters": "x"}, "tool f: parameters must be an object"),
    ({"name": "f", "parameters": {"$defs": [], "properties": {}}}, r"tool f: \$defs must be an object"),
    ({"name": "f", "parameters": {"properties": {"a": {}}, "required": "a"}}, "tool f: required must be a list"),
    ({"name": "f", "parameters": {"properties": {"a": {}}, "required": ["b"]}}, "required parameter 'b'"),
    ({"name": "f", "parameters": {"properties": {"a": {}}, "required": [{}]}}, "required must list parameter names"),
    ({"name": "f", "parameters": {"properties": {"a": {"type": {"x": 1}}}}}, "type must be a string or a list"),
    ({"name": "f", "parameters": {"properties": {"a": {"enum": "xy"}}}}, "tool f: enum must be a list"),
    ({"name": "f", "parameters": {"properties": {"a": {"type": "array", "items": {}, "minItems": "2"}}}},
     "minItems must be a non-negative integer"),
    ({"name": "f", "parameters": {"properties": {"a": {"$ref": 3}}}}, r"tool f: \$ref must be a string"),
    ({"name": "f", "parameters": {"properties": {"a": {"anyOf": {"type": "string"}}}}}, "tool f: anyOf must be a list"),
    ({"name": "f", "parameters": {"properties": {"a": {"type": "strng"}}}}, "unknown type 'strng'"),
    ({"name": "f", "parameters": {"properties": {"a": 5}}}, "a schema must be an object or a boolean"),
    ({"name": "f", "parameters": {"properties": {"a": {"enum": []}}, "required": ["a"]}}, "empty enum admits no value"),
    ({"name": "f", "parameters": {"properties": {"a": {"type": "array", "items": {}, "minItems": 3, "maxItems": 1}}}},
     "maxItems 1 is under minItems 3"),
]


@pytest.mark.parametrize("tool, message", BAD_TOOLS)
def test_malformed_tool_schemas_are_constraint_errors(tool, message):
    with pytest.raises(ConstraintError, match=message):
        tool_call_grammar([tool], "f", opened=True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(json_schema={"allOf": [{"type": "string"}, {"type": "integer"}]}), "Unsatisfiable"),
    (dict(json_schema={"type": "object", "required": ["a"], "properties": {"a": {"enum": []}}}), "Unsatisfiable"),
    (dict(json_schema=False), "admits no value"),
    (dict(grammar='start: "a" x\nx: "b" x'), "admits no output"),
    (dict(grammar=tool_call_grammar([{"name": "f", "parameters": {"properties": {"a": {"type": "string", "minLength": 3,
                                                                                       "maxLength": 1}},
                                                                  "required": ["a"]}}])), "f"),
])
def test_what_admits_no_output_is_a_constraint_error_naming_why(tok, kwargs, message):
    with pytest.raises(ConstraintError, match=message):
        make_constraint(tok, **kwargs)


def _nested(depth: int) -> dict:
    """Types as lists, nested: each level an object, a list, a string, a number or null."""
    if depth == 0:
        return {"type": ["string", "number", "null"], "maxLength": 4}
    return {"type": ["object", "array", "string", "number", "null"], "maxLength": 3,
            "properties": {"a": _nested(depth - 1)}, "items": {"type": "integer"}}


def test_nested_type_lists_compile_to_a_small_grammar(tok):
    """A few hundred bytes of schema stay a few KB of grammar (each type of a list gets only
    its own keywords, not the whole subtree again)."""
    tool = {"name": "f", "parameters": {"type": "object", "properties": {"x": _nested(8)}}}
    assert len(json.dumps(tool)) < 2000
    grammar = tool_call_grammar([tool])
    assert len(grammar) < 20_000
    assert make_constraint(tok, grammar=grammar).plan
    assert make_constraint(tok, json_schema=_nested(8)).plan


def test_a_grammar_over_the_size_limit_is_refused(tok):
    tool = {"name": "f", "parameters": {"type": "object", "properties": {
        f"p{i}": {"type": "object", "properties": {f"q{j}": {"enum": [f"v{i}_{j}_{k}" for k in range(20)]}
                                                    for j in range(30)}} for i in range(30)}}}
    with pytest.raises(ConstraintError, match=f"over {MAX_GRAMMAR_CHARS} characters"):
        tool_call_grammar([tool])


def test_a_json_schema_over_the_limits_is_refused(tok):
    deep = {"type": "string"}
    for _ in range(40):
        deep = {"type": "array", "items": deep}
    with pytest.raises(ConstraintError, match="nested more than"):
        make_constraint(tok, json_schema=deep)
    with pytest.raises(ConstraintError, match="over the limit"):
        make_constraint(tok, json_schema={"enum": ["x" * 1000] * 200})


def test_lenient_schemas_report_what_they_skip(tok):
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True, "x-guidance": {"lenient": True}}
    assert any("uniqueItems" in w for w in make_constraint(tok, json_schema=schema).warnings)
    assert make_constraint(tok, json_schema={"type": "integer"}).warnings == []


def test_opened_forced_call_under_a_budget_parses_with_its_opening(chat_model):
    grammar = tool_call_grammar([WEATHER, NOTE], opened=True, max_calls=1)
    tok = chat_model[1]
    budget = shortest(tok, grammar=grammar) + 2
    for seed in range(4):
        text, last = sample(chat_model, budget, seed, grammar=grammar)
        calls = parse_tool_calls(forced_tool_opening() + text).calls
        assert len(calls) == 1 and last.finish_reason == "stop", text


def test_parse_tool_calls_warns_nothing_on_backslashes():
    text = '<|tool_call_start|>[grep(pattern="a\\d+\\.txt", path="C:\\\\Users")]<|tool_call_end|>'
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (call,) = parse_tool_calls(text).calls
    assert call["arguments"] == {"pattern": "a\\d+\\.txt", "path": "C:\\Users"}


@pytest.mark.parametrize("cut", ['get_weather(city="Oslo"), ping(), get_weather(ci', 'ping(), get_weather(city="a)b"), n'])
def test_a_block_cut_short_keeps_its_finished_calls(cut):
    from mlx_lfm2.text.tool_stream import ToolCallStream

    text = "Sure. <|tool_call_start|>[" + cut
    finished = parse_tool_calls(text)
    assert [c["name"] for c in finished.calls] == (["get_weather", "ping"] if cut[0] == "g" else ["ping", "get_weather"])
    assert finished.content == "Sure. " and finished.errors == ["unterminated tool call"]
    s = ToolCallStream()
    shown = "".join(s.feed(text[i:i + 5]) for i in range(0, len(text), 5)) + s.finish()
    assert shown == "Sure. " and s.calls == finished.calls and s.errors == ["unterminated tool call"]
