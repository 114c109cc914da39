"""LFM2 tool calls: parse them out of model text, never evaluate them.

The model writes ``<|tool_call_start|>[f(a=1, b="x"), g()]<|tool_call_end|>`` (Pythonic) or
the same markers around a JSON list of ``{"name", "arguments"}``. Pythonic calls are read
with ``ast.parse`` and ``ast.literal_eval``: only names called with literal keyword
arguments (strings, numbers, booleans, None, lists, dicts, tuples) are accepted, so text
such as ``[__import__('os').system('x')]`` is rejected and nothing runs.
"""

from __future__ import annotations

import ast
import json
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


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    raise ToolCallError("a tool name must be a plain name")


def _literal(node):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
        raise ToolCallError(f"argument is not a literal: {ast.unparse(node)[:80]}") from e


def _pythonic(text: str) -> list[dict]:
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError) as e:
        raise ToolCallError(f"not a Python list of calls: {e}") from e
    nodes = tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]
    calls = []
    for node in nodes:
        if not isinstance(node, ast.Call):
            raise ToolCallError(f"not a call: {ast.unparse(node)[:80]}")
        name = _dotted(node.func)
        if node.args:
            raise ToolCallError(f"{name}: positional arguments are not allowed, name them")
        if any(k.arg is None for k in node.keywords):
            raise ToolCallError(f"{name}: **kwargs is not allowed")
        calls.append({"name": name, "arguments": {k.arg: _literal(k.value) for k in node.keywords}})
    return calls


def _json(text: str) -> list[dict]:
    data = json.loads(text)
    data = data if isinstance(data, list) else [data]
    calls = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ToolCallError("a JSON tool call is an object with a string 'name'")
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            args = json.loads(args)
        if not isinstance(args, dict):
            raise ToolCallError(f"{item['name']}: arguments must be an object")
        calls.append({"name": item["name"], "arguments": args})
    return calls


def parse_call_block(text: str) -> list[dict]:
    """The calls inside one ``<|tool_call_start|>...<|tool_call_end|>`` block."""
    stripped = text.strip()
    if stripped.startswith(("{", "[{")):
        try:
            return _json(stripped)
        except ValueError:
            pass  # a Pythonic list holding a dict literal, say: try that next
    return _pythonic(stripped)


def parse_tool_calls(text: str) -> ParsedOutput:
    """Split model output into ``(content, calls)``; calls are ``{"name", "arguments"}`` dicts.

    Text around call blocks is kept in ``content``; a malformed block is kept there
    verbatim and described in ``.errors``.
    """
    content, calls, errors, pos = [], [], [], 0
    while True:
        start = text.find(CALL_START, pos)
        if start < 0:
            content.append(text[pos:])
            break
        end = text.find(CALL_END, start + len(CALL_START))
        if end < 0:
            content.append(text[pos:])
            errors.append("unterminated tool call")
            break
        content.append(text[pos:start])
        block = text[start + len(CALL_START):end]
        try:
            calls.extend(parse_call_block(block))
        except (ToolCallError, ValueError) as e:
            content.append(text[start:end + len(CALL_END)])
            errors.append(str(e))
        pos = end + len(CALL_END)
    return ParsedOutput("".join(content), calls, errors)


class ToolCallStream:
    """Streams text while holding back tool-call blocks until they close.

    ``feed(piece) -> str`` returns the text safe to show now; complete calls collect in
    ``calls`` (and ``new_calls()`` returns those not yet taken); ``finish() -> str``
    flushes the rest (an unterminated block comes back as text, with ``errors`` set).
    """

    def __init__(self):
        self.buffer = ""
        self.calls: list[dict] = []
        self.errors: list[str] = []
        self._taken = 0

    def feed(self, piece: str) -> str:
        self.buffer += piece
        out = []
        while True:
            start = self.buffer.find(CALL_START)
            if start < 0:
                keep = _partial_suffix(self.buffer, CALL_START)
                out.append(self.buffer[: len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep:]
                break
            out.append(self.buffer[:start])
            end = self.buffer.find(CALL_END, start)
            if end < 0:
                self.buffer = self.buffer[start:]
                break
            parsed = parse_tool_calls(self.buffer[start: end + len(CALL_END)])
            self.calls += parsed.calls
            self.errors += parsed.errors
            out.append(parsed.content)
            self.buffer = self.buffer[end + len(CALL_END):]
        return "".join(out)

    def finish(self) -> str:
        rest, self.buffer = self.buffer, ""
        if rest.startswith(CALL_START):
            self.errors.append("unterminated tool call")
        return rest

    def new_calls(self) -> list[dict]:
        new = self.calls[self._taken:]
        self._taken = len(self.calls)
        return new

    @property
    def in_call(self) -> bool:
        return self.buffer.startswith(CALL_START)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _py_literal(value) -> str:
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, (int, float, str)):
        return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_py_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_py_literal(str(k))}: {_py_literal(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


def format_pythonic_call(name: str, arguments: dict) -> str:
    """``name(k=v, ...)`` as LFM2 writes calls; ``parse_call_block`` reads it back."""
    return f"{name}(" + ", ".join(f"{k}={_py_literal(v)}" for k, v in arguments.items()) + ")"


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
