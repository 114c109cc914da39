"""The tool-call parser on hostile model text: errors in ParsedOutput.errors, never exceptions."""

import json
import time

import pytest

from mlx_lfm2.text.tool_stream import ToolCallStream
from mlx_lfm2.text.tools import CALL_END, CALL_START, MAX_DEPTH, parse_tool_calls


def block(body: str) -> str:
    return f"before {CALL_START}{body}{CALL_END} after"


@pytest.mark.parametrize("body", [
    "[f(x=" + "[" * 100_000 + "]" * 100_000 + ")]",
    "[f(x=" + "{'a': " * 5_000 + "1" + "}" * 5_000 + ")]",
    "[f(x=" + "(" * 300 + "1" + ")" * 300 + ")]",
    '{"name": "f", "arguments": ' + "[" * 100_000 + "]" * 100_000 + "}",
    '{"name": "f", "arguments": "' + "[" * 100_000 + '"}',
    "[" + "a." * 200_000 + "b()]",
    "[" * 1_000_000,
])
def test_deep_nesting_is_a_parse_error_not_an_exception(body):
    parsed = parse_tool_calls(block(body))
    assert parsed.calls == [] and len(parsed.errors) == 1
    assert parsed.content == block(body)


def test_nesting_within_the_limit_and_brackets_in_strings_still_parse():
    deep = "[" * (MAX_DEPTH - 4) + "]" * (MAX_DEPTH - 4)
    parsed = parse_tool_calls(block(f'[f(x={deep}, s="{"(" * 500}")]'))
    assert parsed.errors == [] and parsed.calls[0]["arguments"]["s"] == "(" * 500


@pytest.mark.parametrize("body, message", [
    ("[f(x={1, 2})]", "set"), ("[f(x=b'ab')]", "bytes"), ("[f(x=1j)]", "complex"),
    ("[f(x=...)]", "ellipsis"), ("[f(x=1e999)]", "inf"), ("[f(x=-1e999)]", "inf"),
    ("[f(x=[1, {2: 3}])]", "keys must be strings"), ("[f(x=[1, {1, 2}])]", "set"),
    ('{"name": "f", "arguments": {"x": 1e999}}', "inf"),
    ('{"name": "f", "arguments": {"x": NaN}}', "NaN"),
    ('{"name": "f", "arguments": {"x": -Infinity}}', "Infinity"),
    ('{"name": "f", "arguments": "{\\"x\\": Infinity}"}', "Infinity"),
    ('{"name": "f", "arguments": [1, 2]}', "arguments must be an object"),
    ('{"name": "f", "arguments": "[1, 2]"}', "arguments must be an object"),
    ('{"name": "f", "arguments": "3"}', "arguments must be an object"),
])
def test_only_json_values_are_accepted(body, message):
    parsed = parse_tool_calls(block(body))
    assert parsed.calls == [] and parsed.content == block(body)
    assert len(parsed.errors) == 1 and message in parsed.errors[0], parsed.errors


def test_accepted_arguments_always_survive_strict_json():
    body = "[f(a=(1, 2), b={'k': [None, True, -2.5, 'x']}, c=1000000000000000000000000000000)]"
    parsed = parse_tool_calls(block(body))
    args = parsed.calls[0]["arguments"]
    assert json.loads(json.dumps(args, allow_nan=False)) == {"a": [1, 2], "b": {"k": [None, True, -2.5, "x"]},
                                                             "c": 10**30}


def test_a_bad_block_does_not_hide_a_good_one():
    text = block("[f(x={1})]") + block("[g(y=1)]")
    parsed = parse_tool_calls(text)
    assert parsed.calls == [{"name": "g", "arguments": {"y": 1}}] and len(parsed.errors) == 1


def test_streaming_parser_is_linear_in_the_text():
    """1 MB fed in 8-character pieces: the quadratic version took minutes (the bound is loose)."""
    text = "x<" * 250_000 + CALL_START + '[f(a="' + "y<" * 250_000 + '")]' + CALL_END + "z"
    stream, shown = ToolCallStream(), []
    started = time.perf_counter()
    for i in range(0, len(text), 8):
        shown.append(stream.feed(text[i:i + 8]))
    shown.append(stream.finish())
    elapsed = time.perf_counter() - started
    assert "".join(shown) == "x<" * 250_000 + "z"
    assert stream.calls == [{"name": "f", "arguments": {"a": "y<" * 250_000}}]
    assert elapsed < 10, f"{elapsed:.1f} s for 1 MB"


def test_streaming_parser_markers_split_anywhere():
    text = f"a<{CALL_START}[f(x='{CALL_END[:-1]}')]{CALL_END}<|tool_call_sta b"
    for step in range(1, 12):
        s = ToolCallStream()
        out = "".join(s.feed(text[i:i + step]) for i in range(0, len(text), step)) + s.finish()
        assert out == "a<<|tool_call_sta b" and s.calls == [{"name": "f", "arguments": {"x": CALL_END[:-1]}}]
        assert not s.in_call and s.errors == []


def test_writing_deeply_nested_arguments_is_a_tool_call_error():
    from mlx_lfm2.text.tools import ToolCallError, format_pythonic_call

    deep = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ToolCallError, match="nested too deeply"):
        format_pythonic_call("f", {"x": deep})
    assert format_pythonic_call("f", {"x": [[1]], "s": 'a"b'}) == 'f(x=[[1]], s="a\\"b")'


def test_fuzzed_blocks_never_raise_and_calls_are_strict_json():
    """Seeded mutations of valid Pythonic and JSON calls: the parser answers every one."""
    import random

    rng = random.Random(0)
    seeds = ['[f(a=1, b="x", c=[1, {"k": None}], d=-2.5, e=True)]',
             '[{"name": "g", "arguments": {"q": [1, 2, {"r": "s"}], "n": 1e5}}]',
             '{"name": "h", "parameters": "{\\"z\\": [true, false, null]}"}', "[f(), g(x=(1, 2))]"]
    alphabet = list("[](){}\"',:=.\\-+eE0123456789 xyz") + ["1e999", "NaN", "...", "b'", "j", "{1, 2}", "**",
                                                          "lambda", "__import__", CALL_START, CALL_END]
    parsed_ok = 0
    for _ in range(3000):
        text = list(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(text) + 1)
            op = rng.random()
            if op < 0.4:
                text.insert(i, rng.choice(alphabet))
            elif op < 0.7 and text:
                del text[min(i, len(text) - 1)]
            else:
                text.insert(i, rng.choice("[{(") * rng.randint(1, 300))
        body = "".join(text)
        parsed = parse_tool_calls(block(body))
        for call in parsed.calls:
            assert isinstance(call["name"], str) and isinstance(call["arguments"], dict)
            json.dumps(call["arguments"], allow_nan=False)  # strict JSON: no set, bytes, inf...
        parsed_ok += bool(parsed.calls)
        stream = ToolCallStream()
        pieces = [block(body)[i:i + 5] for i in range(0, len(block(body)), 5)]
        assert "".join(stream.feed(p) for p in pieces) + stream.finish() == parsed.content
        assert stream.calls == parsed.calls
    assert parsed_ok > 300  # the mutations leave many blocks valid: the check is not vacuous
