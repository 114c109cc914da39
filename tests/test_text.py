"""Tokenizer, chat templates and tool calls against transformers on the real LFM2 files."""

import json
from typing import Literal, Optional

import pytest

from conftest import ROOT, reference_dir
from mlx_lfm2.text.tokenizer import load_tokenizer
from mlx_lfm2.text.tool_stream import ToolCallStream
from mlx_lfm2.text.tools import parse_tool_calls

transformers = pytest.importorskip("transformers")

NEW_TEMPLATE = (ROOT / "tests/fixtures/new_style_template.jinja").read_text()

TEXTS = {
    "en": "The quick brown fox jumps over the lazy dog. It's 3:45pm!",
    "ar": "مرحبا بالعالم، كيف حالك اليوم؟",
    "zh": "你好，世界！今天天气很好，我们去公园散步吧。",
    "fr": "Où est la bibliothèque ? C'était très agréable, n'est-ce pas ?",
    "de": "Größenwahnsinnige Überraschungen fördern Straßenbahn-Fahrgäste.",
    "ja": "こんにちは、世界。東京タワーは高いです。",
    "ko": "안녕하세요, 세계! 오늘 날씨가 좋네요.",
    "es": "¿Dónde está el niño? ¡Mañana será otro día!",
    "pt": "Não sei se ele está à espera da avó ação.",
    "code": "def f(x: int) -> dict[str, int]:\n    return {'a': x ** 2}  # comment\n\tpass\r\n",
    "emoji": "Family: 👨‍👩‍👧‍👦, flags 🇫🇷🇯🇵, skin 👍🏽 and 🤖🧠✨",
    "specials": "<|im_start|>user\nhi<|im_end|>\n<|tool_call_start|>[f()]<|tool_call_end|>",
}


@pytest.mark.parametrize("lang", sorted(TEXTS))
def test_encode_matches_reference(ours, ref, lang):
    assert ours.encode(TEXTS[lang]) == ref.encode(TEXTS[lang])
    assert ours.encode(TEXTS[lang], add_special_tokens=False) == ref.encode(TEXTS[lang], add_special_tokens=False)
    ids = ref.encode(TEXTS[lang])
    assert ours.decode(ids) == ref.decode(ids)


def test_special_ids_and_stop_ids(ours):
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 7, 0)
    assert {7, ours.convert_tokens_to_ids("<|endoftext|>")} <= ours.eos_token_ids
    assert ours.vocab_size == 64400


@pytest.mark.parametrize("lang", sorted(TEXTS))
def test_streaming_detokenizer_never_splits_characters(ours, lang):
    ids = ours.encode(TEXTS[lang] * 2, add_special_tokens=False)
    d = ours.detokenizer()
    pieces = [d.add_token(i) for i in ids] + [d.finalize()]
    assert "".join(pieces) == ours.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> dict:
    """Get the current weather in a city.

    Args:
        city: The city name, e.g. Paris
        unit: Temperature unit (choices: ["celsius", "fahrenheit"])

    Returns:
        The weather as a dict.
    """
    return {"city": city, "temp": 21}


def search(query: str, limit: Optional[int] = None, tags: list[str] | None = None) -> list[dict]:
    """Search the knowledge base.

    Args:
        query: What to look for,
            possibly over several lines.
        limit: Most results to return
        tags: Only results with these tags
    """
    return []


WEATHER_SCHEMA = {"type": "function", "function": {"name": "get_status", "description": "Status of a candidate",
                  "parameters": {"type": "object", "properties": {"candidate_id": {"type": "string"}},
                                 "required": ["candidate_id"]}}}

CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is C. elegans?"}],
    "system": [{"role": "system", "content": "You are a helpful assistant."},
               {"role": "user", "content": "Hi"}],
    "multi-turn": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                   {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
    "tool-result": [{"role": "user", "content": "Status of 12345?"},
                    {"role": "assistant", "content": '<|tool_call_start|>[get_status(candidate_id="12345")]<|tool_call_end|>'},
                    {"role": "tool", "content": '{"status": "hired"}'}],
    "non-string-content": [{"role": "user", "content": [{"type": "text", "text": "look"}]},
                           {"role": "tool", "content": {"ok": True, "n": [1, 2.5, None]}}],
    "non-ascii": [{"role": "user", "content": "Ünïcödé 你好 مرحبا 🤖 \"quotes\" <tags> & \\ backslash"}],
}


@pytest.mark.parametrize("tools", [None, "dicts", "functions"])
@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_matches_transformers(ours, ref, name, gen, tools):
    tools = {None: None, "dicts": [WEATHER_SCHEMA], "functions": [get_weather, search]}[tools]
    msgs = CONVERSATIONS[name]
    expected = ref.apply_chat_template(msgs, tools=tools, add_generation_prompt=gen, tokenize=False)
    assert ours.apply_chat_template(msgs, tools=tools, add_generation_prompt=gen) == expected
    expected_ids = ref.apply_chat_template(msgs, tools=tools, add_generation_prompt=gen, tokenize=True,
                                           return_dict=False)
    ids = ours.apply_chat_template(msgs, tools=tools, add_generation_prompt=gen, tokenize=True)
    assert ids == list(expected_ids)
    assert ids.count(ours.bos_token_id) == 1


NEW_CONVERSATIONS = dict(CONVERSATIONS, **{
    "assistant-tool-calls": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}}]},
        {"role": "tool", "content": '{"temp": 21}'}, {"role": "tool", "content": '{"temp": 25}'}],
})


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("name", sorted(NEW_CONVERSATIONS))
def test_new_style_template_matches_transformers(ours, ref, name, gen):
    msgs = NEW_CONVERSATIONS[name]
    tools = [get_weather, WEATHER_SCHEMA]
    kw = dict(tools=tools, add_generation_prompt=gen, chat_template=NEW_TEMPLATE)
    assert ours.apply_chat_template(msgs, **kw) == ref.apply_chat_template(msgs, tokenize=False, **kw)


def test_template_errors_surface_as_template_errors(ours):
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="Unknown role: narrator"):
        ours.apply_chat_template([{"role": "narrator", "content": "x"}], chat_template=NEW_TEMPLATE)


def test_sandbox_blocks_escapes(ours):
    import jinja2

    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(jinja2.exceptions.SecurityError):
        ours.apply_chat_template([{"role": "user", "content": "x"}], chat_template=evil)


def test_function_schemas_match_transformers():
    from mlx_lfm2 import get_json_schema

    for fn in (get_weather, search):
        assert get_json_schema(fn) == transformers.utils.get_json_schema(fn)


def test_no_template_falls_back_with_warning(tmp_path):
    import shutil

    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(reference_dir() / f, tmp_path / f)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(tmp_path)
    with pytest.warns(UserWarning, match="no chat template"):
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|startoftext|><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# ---- tool calls ----------------------------------------------------------------------


def test_parse_pythonic_calls_with_surrounding_text():
    text = ('Let me check.<|tool_call_start|>[get_status(candidate_id="12345"), '
            'f(a=1, b=-2.5, c=True, d=None, e=[1, {"k": "v"}], s=\'x\')]<|tool_call_end|>Done.')
    content, calls = parse_tool_calls(text)
    assert content == "Let me check.Done."
    assert calls == [{"name": "get_status", "arguments": {"candidate_id": "12345"}},
                     {"name": "f", "arguments": {"a": 1, "b": -2.5, "c": True, "d": None,
                                                 "e": [1, {"k": "v"}], "s": "x"}}]


def test_parse_json_calls():
    text = '<|tool_call_start|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]<|tool_call_end|>'
    assert parse_tool_calls(text) == ("", [{"name": "get_weather", "arguments": {"city": "Paris"}}])


@pytest.mark.parametrize("payload", [
    "[__import__('os').system('touch /tmp/pwned')]",
    "[f(x=__import__('os').system('x'))]",
    "[f(x=open('/etc/passwd').read())]",
    "[f(*args)]", "[f(**{'a': 1})]", "[f(1, 2)]", "[lambda: 1]", "[f(x=1)", "not python at all (",
    "[f(x=[i for i in range(10**9)])]",
])
def test_hostile_or_malformed_calls_are_text_with_an_error(payload, tmp_path):
    text = f"ok <|tool_call_start|>{payload}<|tool_call_end|>"
    parsed = parse_tool_calls(text)
    assert parsed.calls == [] and parsed.errors
    assert parsed.content == text
    assert not (tmp_path / "pwned").exists()


def test_round_trip_through_the_template(ours):
    calls = [{"name": "get_weather", "arguments": {"city": "São Paulo", "unit": "celsius"}},
             {"name": "search", "arguments": {"query": "a \"quoted\" word", "limit": 3, "tags": ["x", "y"]}}]
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": c} for c in calls]}]
    text = ours.apply_chat_template(msgs, chat_template=NEW_TEMPLATE, add_generation_prompt=False)
    reply = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    assert parse_tool_calls(reply) == ("", calls)


def test_streaming_parser_holds_back_calls_until_closed():
    text = 'Sure.<|tool_call_start|>[f(a="<|tool")]<|tool_call_end|> Then <|tool_call_start|>[g()]<|tool_call_end|>end'
    for step in (1, 3, 7):
        s, shown = ToolCallStream(), []
        for i in range(0, len(text), step):
            out = s.feed(text[i:i + step])
            assert "<|tool" not in out and "[f(" not in out
            shown.append(out)
        shown.append(s.finish())
        assert "".join(shown) == "Sure. Then end"
        assert s.calls == [{"name": "f", "arguments": {"a": "<|tool"}}, {"name": "g", "arguments": {}}]


def test_streaming_parser_returns_unterminated_call_as_text():
    s = ToolCallStream()
    assert s.feed("hi <|tool_call_start|>[f(") == "hi "
    assert s.in_call
    assert s.finish() == "<|tool_call_start|>[f("
    assert s.errors == ["unterminated tool call"]
