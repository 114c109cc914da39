"""LFM2.5's unmarked tool calls ``[f(x=1)]``: calls only where tools were offered, the whole
reply is a call list and every name is an offered tool; streamed and whole alike; never run."""

import pytest

from mlx_lfm2.text.tool_stream import ToolCallStream
from mlx_lfm2.text.tools import parse_tool_calls

NAMES = {"get_weather", "search"}
CALLS = [
    ('[get_weather(city="Paris")]', [("get_weather", {"city": "Paris"})]),
    ('  \n[get_weather(city="Paris"), search(q="x", n=2)]\n', [("get_weather", {"city": "Paris"}),
                                                               ("search", {"q": "x", "n": 2})]),
    ('[{"name": "search", "arguments": {"q": "json form"}}]', [("search", {"q": "json form"})]),
    ('[search()]', [("search", {})]),
]
TEXT = [  # with tools offered, each stays text
    '[os.system(cmd="rm -rf /")]',  # not an offered tool
    '[__import__("os").system("x")]',  # code, not a call
    '[get_weather(city="Paris"), os.system(cmd="x")]',  # one name not offered
    'Sure: [get_weather(city="Paris")]',  # text before the list
    '[get_weather(city="Paris")] and then some',  # text after it
    '[get_weather](https://example.com) is a link',
    '[1, 2, 3]', '[]', '[note] plain text', '[get_weather(city=x)]',  # x: a name, not a literal
    '[get_weather(city="Paris")',  # never closed
]


def pairs(calls):
    return [(c["name"], c["arguments"]) for c in calls]


@pytest.mark.parametrize("text, calls", CALLS)
def test_a_whole_reply_that_is_a_call_list_of_offered_tools_is_read_as_calls(text, calls):
    parsed = parse_tool_calls(text, bare_names=NAMES)
    assert parsed.content == "" and pairs(parsed.calls) == calls and not parsed.errors
    # without tools offered the same text is only text
    assert parse_tool_calls(text) == (text, [])


@pytest.mark.parametrize("text", TEXT)
def test_anything_else_stays_text_and_nothing_runs(text):
    parsed = parse_tool_calls(text, bare_names=NAMES)
    assert parsed == (text, []) and not parsed.errors


def test_the_marked_form_is_still_read_with_bare_names_on():
    text = 'Let me check.<|tool_call_start|>[get_weather(city="Rome")]<|tool_call_end|>'
    assert pairs(parse_tool_calls(text, bare_names=NAMES).calls) == [("get_weather", {"city": "Rome"})]


def stream(text, size):
    s = ToolCallStream(bare_names=NAMES)
    shown = [s.feed(text[i:i + size]) for i in range(0, len(text), size)]
    return shown, "".join(shown) + s.finish(), s.calls


@pytest.mark.parametrize("size", [1, 3, 1000])
@pytest.mark.parametrize("text", [t for t, _ in CALLS] + TEXT + [
    'Checking.<|tool_call_start|>[search(q="a")]<|tool_call_end|> done', "Hello there", ""])
def test_streamed_equals_whole(text, size):
    whole = parse_tool_calls(text, bare_names=NAMES)
    _, content, calls = stream(text, size)
    assert (content, pairs(calls)) == (whole.content, pairs(whole.calls))


def test_a_reply_that_cannot_be_a_call_list_streams_at_once():
    shown, _, _ = stream("[note] this is plain text that keeps going", 1)
    assert "".join(shown[:3]) == "[no"  # released at the first character no offered name begins with
    shown, _, _ = stream("The weather is fine", 1)
    assert shown[0] == "T"
    shown, content, calls = stream('[get_weather(city="Oslo")]', 1)
    assert "".join(shown) == "" and content == "" and pairs(calls) == [("get_weather", {"city": "Oslo"})]


def test_a_long_bare_call_is_inspected_only_until_its_opening_is_known(monkeypatch):
    from mlx_lfm2.text import tool_stream

    seen = []
    opening = tool_stream._bare_opening
    monkeypatch.setattr(tool_stream, "_bare_opening", lambda text, names: seen.append(len(text)) or opening(text, names))
    text = '[search(q="' + "x" * 100_000 + '")]'
    _, content, calls = stream(text, 8)
    assert content == "" and len(calls[0]["arguments"]["q"]) == 100_000
    assert len(seen) <= 2 and max(seen) <= 16  # not re-read on every piece: streaming stays linear
