"""LFM2 tool calls: parse them out of model text, never evaluate them.

The model writes ``<|tool_call_start|>[f(a=1, b="x"), g()]<|tool_call_end|>`` (Pythonic) or
the same markers around a JSON list of ``{"name", "arguments"}``. Pythonic calls are read
with ``ast.parse`` and ``ast.literal_eval``: only names called with literal keyword
arguments that JSON can carry (strings, finite numbers, booleans, None, lists, tuples,
dicts with string keys) are accepted, so text such as ``[__import__('os').system('x')]``
or ``f(x={1, 2})`` is rejected and nothing runs. Blocks nested deeper than ``MAX_DEPTH``
are refused before parsing.

LFM2.5 may also answer with an unmarked ``[f(x=1)]``. Given the offered tools' names
(``bare_names``), a reply that is exactly such a list of those tools is read as calls, in
``parse_tool_calls`` and ``tool_stream.ToolCallStream`` (the same while a reply streams)
alike; any other bracketed text stays text.
"""

from __future__ import annotations

import ast
import json
import math
import re
import warnings
from typing import Optional

CALL_START, CALL_END = "<|tool_call_start|>", "<|tool_call_end|>"


class ToolCallError(ValueError):
    pass


class ParsedOutput(tuple):
    """``(content, calls)``, plus ``.errors``: one message per malformed call block."""

    def __new__(cls, content: str, calls: list, errors=()):
        self = super().__new__(cls, (content, calls))
        self.content, self.calls, self.errors = content, calls, list(errors)
        return self


# Model text is untrusted: a block nested thousands deep would overflow the parser's stack.
MAX_DEPTH = 64
MAX_BLOCK_CHARS = 1_000_000
_BRACKETS = re.compile(r"""[\[\](){}"'\\]""")


def _brackets(text: str):
    """``(index, bracket, depth after it)`` for each bracket of ``text`` outside its strings."""
    depth, quote, skip = 0, None, -1
    for m in _BRACKETS.finditer(text):
        i, c = m.start(), m.group()
        if i < skip:
            continue
        if quote:
            if c == "\\":
                skip = i + 2
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c in "([{":
            depth += 1
            yield i, c, depth
        elif c in ")]}":
            depth -= 1
            yield i, c, depth


def _check_shape(text: str) -> None:
    """Refuse blocks too large or too deeply nested to parse safely (strings are skipped)."""
    if len(text) > MAX_BLOCK_CHARS:
        raise ToolCallError(f"tool call block of {len(text)} characters is over the {MAX_BLOCK_CHARS} limit")
    if any(depth > MAX_DEPTH for _, _, depth in _brackets(text)):
        raise ToolCallError(f"tool call nested more than {MAX_DEPTH} levels deep")


def complete_calls(block: str) -> list[dict]:
    """The calls that closed in a block cut short (``[f(a=1), g(b=`` -> ``f``'s call): a reply
    that ran out of tokens mid-block keeps what it finished."""
    text = block.strip()
    if not text.startswith("[") or len(text) > MAX_BLOCK_CHARS:
        return []
    ends = [i for i, c, depth in _brackets(text) if depth == 1 and c in ")}"]
    if not ends:
        return []
    try:
        return parse_call_block(text[:ends[-1] + 1] + "]")
    except ValueError:
        return []


def _json_value(value, where: str):
    """``value`` if JSON can carry it (tuples become lists); else ToolCallError."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ToolCallError(f"{where}: {value} is not a JSON number")
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v, where) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ToolCallError(f"{where}: object keys must be strings")
        return {k: _json_value(v, where) for k, v in value.items()}
    raise ToolCallError(f"{where}: {type(value).__name__} values are not JSON")


def _snippet(node, source: str) -> str:
    return (ast.get_source_segment(source, node) or type(node).__name__)[:80]


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        raise ToolCallError("a tool name must be a plain name")
    return ".".join([node.id, *reversed(parts)])


def _literal(node, source: str, where: str):
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError) as e:
        raise ToolCallError(f"{where}: not a literal: {_snippet(node, source)}") from e
    return _json_value(value, where)


def _pythonic(text: str) -> list[dict]:
    try:
        with warnings.catch_warnings():  # a "\d" in model text: an invalid escape that Python reads as is
            warnings.simplefilter("ignore", SyntaxWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError) as e:
        raise ToolCallError(f"not a Python list of calls: {e}") from e
    nodes = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
    calls = []
    for node in nodes:
        if not isinstance(node, ast.Call):
            raise ToolCallError(f"not a call: {_snippet(node, text)}")
        name = _dotted(node.func)
        if node.args:
            raise ToolCallError(f"{name}: positional arguments are not allowed, name them")
        if any(k.arg is None for k in node.keywords):
            raise ToolCallError(f"{name}: **kwargs is not allowed")
        calls.append({"name": name, "arguments": {k.arg: _literal(k.value, text, f"{name}.{k.arg}")
                                                  for k in node.keywords}})
    return calls


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _loads(text: str):
    """``json.loads`` that refuses NaN / Infinity and numbers that overflow to them (1e999)."""
    return json.loads(text, parse_constant=_no_constant,
                      parse_float=lambda s: _json_value(float(s), "number"))


def _json(text: str) -> list[dict]:
    data = _loads(text)
    data = data if isinstance(data, list) else [data]
    calls = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ToolCallError("a JSON tool call is an object with a string 'name'")
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            _check_shape(args)
            args = _loads(args)
        if not isinstance(args, dict):
            raise ToolCallError(f"{item['name']}: arguments must be an object")
        calls.append({"name": item["name"], "arguments": args})
    return calls


def parse_call_block(text: str) -> list[dict]:
    """The calls inside one ``<|tool_call_start|>...<|tool_call_end|>`` block.

    Raises ``ToolCallError`` (a ValueError) for anything but calls with JSON-representable
    arguments, including blocks too large or too deep to parse.
    """
    stripped = text.strip()
    _check_shape(stripped)
    try:
        if stripped.startswith(("{", "[{")):
            try:
                return _json(stripped)
            except ToolCallError:
                raise
            except ValueError as e:  # a Pythonic list holding a dict literal, say: try that next
                try:
                    return _pythonic(stripped)
                except ToolCallError:
                    raise ToolCallError(f"not a valid JSON tool call: {e}") from None
        return _pythonic(stripped)
    except (RecursionError, MemoryError) as e:  # what the depth check missed
        raise ToolCallError(f"tool call too deeply nested to parse ({type(e).__name__})") from None


def parse_tool_calls(text: str, bare_names=None) -> ParsedOutput:
    """Split model output into ``(content, calls)``; calls are ``{"name", "arguments"}`` dicts.

    Text around call blocks is kept in ``content``; a malformed block is kept there
    verbatim and described in ``.errors``. With ``bare_names`` (the offered tools' names), a
    reply that is exactly an unmarked call list of those tools is read as calls too.
    """
    bare = parse_bare_calls(text, bare_names) if bare_names else None
    if bare:
        return ParsedOutput("", bare)
    content, calls, errors, pos = [], [], [], 0
    while True:
        start = text.find(CALL_START, pos)
        if start < 0:
            content.append(text[pos:])
            break
        end = text.find(CALL_END, start + len(CALL_START))
        if end < 0:  # cut short: its finished calls count, the rest stays text if there are none
            kept = complete_calls(text[start + len(CALL_START):])
            calls.extend(kept)
            content.append(text[pos:start] if kept else text[pos:])
            errors.append("unterminated tool call")
            break
        content.append(text[pos:start])
        block = text[start + len(CALL_START):end]
        try:
            calls.extend(parse_call_block(block))
        except ValueError as e:
            content.append(text[start:end + len(CALL_END)])
            errors.append(str(e))
        pos = end + len(CALL_END)
    return ParsedOutput("".join(content), calls, errors)


# LFM2.5 sometimes answers with a bare ``[f(x=1)]``, without the call markers. That text is
# read as calls only where tools were offered (``bare_names``), only when the whole reply is
# exactly a call list, and only when every name is an offered tool's; otherwise it stays text.


def parse_bare_calls(text: str, names) -> Optional[list[dict]]:
    """The calls if ``text`` (stripped) is exactly ``[call, ...]`` of tools in ``names``, else None."""
    stripped = text.strip()
    if not (stripped.startswith("[") and stripped.endswith("]")) or CALL_START in stripped:
        return None
    try:
        calls = parse_call_block(stripped)
    except ValueError:
        return None
    return calls if calls and all(c["name"] in names for c in calls) else None


def py_literal(value) -> str:
    """``value`` as a Python literal that ``ast.literal_eval`` reads back (strings in JSON's
    escapes, which Python reads the same)."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, (int, float, str)):
        return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(py_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{py_literal(str(k))}: {py_literal(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


def format_pythonic_call(name: str, arguments: dict) -> str:
    """``name(k=v, ...)`` as LFM2 writes calls; ``parse_call_block`` reads it back."""
    try:
        return f"{name}(" + ", ".join(f"{k}={py_literal(v)}" for k, v in arguments.items()) + ")"
    except RecursionError:
        raise ToolCallError(f"{name}: arguments nested too deeply to write") from None


def format_tool_result(result) -> str:
    """A tool's return value as the content of a ``tool`` message."""
    return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)


def call_tool(functions: dict, call: dict) -> str:
    """Run a parsed call against a dict of allowed functions; errors become the result text."""
    fn: Optional[callable] = functions.get(call["name"])
    if fn is None:
        return json.dumps({"error": f"unknown tool {call['name']!r}"})
    try:
        return format_tool_result(fn(**call["arguments"]))
    except Exception as e:  # the model's arguments may be wrong; tell it, don't crash
        return json.dumps({"error": f"{type(e).__name__}: {e}"})
