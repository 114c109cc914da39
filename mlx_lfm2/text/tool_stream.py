"""Tool calls while a reply streams: show its text at once, hold back its call blocks.

``ToolCallStream`` takes the reply piece by piece and returns the text that is safe to show;
a ``<|tool_call_start|>`` block is held until ``<|tool_call_end|>`` closes it, then read by
``tools.parse_tool_calls`` (so a streamed reply and the same reply whole give the same calls
and text). With the offered tools' names (``bare_names``) the reply's opening is held while
it may still be an unmarked ``[f(x=1)]`` call list (``tools.parse_bare_calls`` decides at
the end).
"""

from __future__ import annotations

import re
from typing import Optional

from .tools import CALL_END, CALL_START, complete_calls, parse_bare_calls, parse_tool_calls

_NAME = re.compile(r"[A-Za-z_][\w.]*")


class ToolCallStream:
    """Streams text while holding back tool-call blocks until they close.

    ``feed(piece) -> str`` returns the text safe to show now; complete calls collect in
    ``calls`` (and ``new_calls()`` returns those not yet taken); ``finish() -> str``
    flushes the rest (an unterminated block gives its finished calls, or comes back as text
    when it has none; ``errors`` says it was cut).
    Each piece is scanned once (plus a marker's length of overlap), so a long reply fed in
    small pieces costs time linear in its length.
    """

    def __init__(self, bare_names=None):
        # With ``bare_names`` a reply's opening is held while it may be an unmarked call list.
        self.bare_names = frozenset(bare_names or ())
        self._bare: Optional[list[str]] = [] if self.bare_names else None
        self._bare_call = False  # the opening reads "[name(": only the reply's end decides
        self._pending = ""  # outside a call: a tail that may begin CALL_START
        self._parts: list[str] = []  # inside a call: the block so far, from CALL_START
        self._tail = ""  # inside a call: the last characters, which may begin CALL_END
        self.calls: list[dict] = []
        self.errors: list[str] = []
        self._taken = 0

    @property
    def in_call(self) -> bool:
        return bool(self._parts)

    @property
    def buffer(self) -> str:
        """What is held back: a possible start of a marker, or an open call block."""
        return "".join(self._parts) if self._parts else self._pending

    def feed(self, piece: str) -> str:
        if self._bare is not None:
            self._bare.append(piece)
            if self._bare_call:
                return ""
            held = "".join(self._bare)
            opening = _bare_opening(held, self.bare_names)
            if opening != "text":
                self._bare_call = opening == "call"
                return ""
            self._bare, piece = None, held
        out = []
        while piece:
            if not self._parts:
                text, self._pending = self._pending + piece, ""
                start = text.find(CALL_START)
                if start < 0:
                    keep = _partial_suffix(text, CALL_START)
                    out.append(text[: len(text) - keep])
                    self._pending = text[len(text) - keep:]
                    break
                out.append(text[:start])
                self._parts, self._tail = [CALL_START], ""
                piece = text[start + len(CALL_START):]
                continue
            window = self._tail + piece
            end = window.find(CALL_END)
            if end < 0:
                self._parts.append(piece)
                self._tail = window[-(len(CALL_END) - 1):]
                break
            cut = end + len(CALL_END) - len(self._tail)  # where the block ends in ``piece``
            self._parts.append(piece[:cut])
            parsed = parse_tool_calls("".join(self._parts))
            self._parts, self._tail = [], ""
            self.calls += parsed.calls
            self.errors += parsed.errors
            out.append(parsed.content)
            piece = piece[cut:]
        return "".join(out)

    def finish(self) -> str:
        if self._bare is not None:
            held, self._bare = "".join(self._bare), None
            bare = parse_bare_calls(held, self.bare_names)
            if bare:
                self.calls += bare
                return ""
            return self.feed(held) + self.finish()
        rest = self.buffer
        if self._parts:
            self.errors.append("unterminated tool call")
            kept = complete_calls(rest[len(CALL_START):])
            self.calls += kept
            rest = "" if kept else rest
        self._pending, self._parts, self._tail = "", [], ""
        return rest

    def new_calls(self) -> list[dict]:
        new = self.calls[self._taken:]
        self._taken = len(self.calls)
        return new


def _bare_opening(text: str, names) -> str:
    """How a reply's beginning reads: "text" (cannot be a bare call list), "maybe" (too short
    to tell) or "call" (``[`` and an offered tool's name, then ``(`` or ``{``: the end decides)."""
    s = text.lstrip()
    if not s:
        return "maybe"
    if s[0] != "[":
        return "text"
    rest = s[1:].lstrip()
    if not rest:
        return "maybe"
    if rest[0] == "{":  # the JSON form
        return "call"
    m = _NAME.match(rest)
    if m is None:
        return "text"
    if m.end() == len(rest):
        return "maybe" if any(n.startswith(m.group()) for n in names) else "text"
    after = rest[m.end():].lstrip()
    if m.group() not in names or after[:1] not in ("(", ""):
        return "text"
    return "call" if after else "maybe"


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker`` (only its last
    ``len(marker) - 1`` characters are looked at)."""
    i = text.find(marker[0], max(0, len(text) - len(marker) + 1))
    while i >= 0:
        if marker.startswith(text[i:]):
            return len(text) - i
        i = text.find(marker[0], i + 1)
    return 0
