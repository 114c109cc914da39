"""How a constrained reply can end: a short completion of a matcher's state, in tokens.

llguidance says which tokens may come next, not how far the end is. ``Closer.complete`` finds
out by walking a copy of the matcher byte by byte (every byte has a token of its own in LFM2's
vocabulary, and llguidance matches tokens by their bytes, so any way of writing the bytes as
tokens is accepted):
- what the grammar forces (``compute_ff_tokens``: a fixed key, ``": "``) is taken at once;
- otherwise a closing byte (``} ] ) "``) that ends something (the state after it is accepting or
  allows other bytes than before) is taken, else the first allowed byte in a fixed order (closers,
  digits, then ASCII), moving one place along that order for each step that changed nothing (so
  ``[ab]+c`` reaches its ``c`` and a ``minLength`` string fills and closes);
- the grammar's special tokens (``<|tool_call_end|>``) count as one token;
- the walk ends where a stop token is allowed; the bytes are then tokenized as the tokenizer
  writes them and a stop token added.
The result is a short completion (an object gets its required keys only, a list its
minItems, a string closes at the first quote allowed), not always the shortest one: where a
value must be written the walk takes the first byte of its order, not the one that ends
soonest, and a tokenization of fewer tokens may exist. It costs one mask and one consumed
token per byte not forced (plus a mask per closing byte tried).
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np

_CLOSERS = b'}])"'
_ORDER = _CLOSERS + b"0123456789" + bytes(b for b in range(0x20, 0x7F) if b not in _CLOSERS + b"0123456789") \
    + bytes(range(0x20)) + bytes(range(0x7F, 0x100))
_BYTE_IDS: dict = {}  # id(llguidance tokenizer) -> (it, its byte ids); a handful per process


def _byte_ids(ll) -> np.ndarray:
    """The token of each byte, in ``_ORDER`` (cached per llguidance tokenizer)."""
    if id(ll) not in _BYTE_IDS:
        found = [ll.tokenize_bytes(bytes([b])) for b in _ORDER]
        if any(len(t) != 1 for t in found):
            raise ValueError("the tokenizer has no token for some single byte")
        _BYTE_IDS[id(ll)] = (ll, np.array([t[0] for t in found], np.int64))
    return _BYTE_IDS[id(ll)][1]


class Closer:
    """Short completions for matchers of one grammar (``grammar``: its llguidance text, whose
    ``<|name|>`` special tokens the walk may write)."""

    def __init__(self, ll, grammar: str):
        self.ll, self.byte_ids = ll, _byte_ids(ll)
        names = set(re.findall(r"<\|[A-Za-z0-9_]+\|>", grammar))
        specials = [ll.tokenize_str(n, parse_special=True) for n in sorted(names)]
        self.specials = np.array([t[0] for t in specials if len(t) == 1 and t[0] not in ll.eos_tokens], np.int64)
        self.watch = np.concatenate([self.specials, self.byte_ids])  # the ids whose mask bits the walk reads
        self.closers = len(_CLOSERS)
        self.gave_up = False  # the last ``complete`` stopped at ``max_bytes`` (rather than at no way on)
        self.byte_of = {int(t): b for t, b in zip(self.byte_ids, _ORDER)}

    def allowed(self, m) -> np.ndarray:
        """Which of ``watch`` ``m`` allows next (bool)."""
        bits = np.frombuffer(m.compute_bitmask(), np.uint8)
        return (bits[self.watch >> 3] >> (self.watch & 7)) & 1 == 1

    def complete(self, matcher, max_bytes: int = 4096) -> Optional[list[int]]:
        """Tokens that end ``matcher``'s reply (the last a stop token), found by the walk above;
        None when it finds no end within ``max_bytes`` (or the state has none)."""
        m, self.gave_up = matcher.deep_copy(), False
        path: list[int] = []  # the tokens written
        previous, stall, written = None, 0, 0
        while not (m.is_accepting() or m.is_stopped()):
            if m.is_error() or written > max_bytes:
                self.gave_up = not m.is_error()
                return None
            forced = m.compute_ff_tokens()  # (special tokens among them)
            if forced:
                if not m.consume_tokens(forced):
                    return None
                path += forced
                written += len(forced)
                continue
            ok = self.allowed(m)
            if not ok.any():
                return None
            sig = ok.tobytes()
            stall = stall + 1 if sig == previous else 0
            previous = sig
            pick = self._closing(m, ok, sig)
            if pick is None:
                choices = self.watch[ok]
                pick = int(choices[stall % len(choices)])
            m.consume_token(pick)
            path.append(pick)
            written += 1
        if m.is_error():
            return None
        return self._tokens(path) + [self.ll.eos_token]

    def _closing(self, m, ok: np.ndarray, sig: bytes) -> Optional[int]:
        """An allowed special token, or closing byte after which something changed."""
        n = len(self.specials)
        if ok[:n].any():
            return int(self.specials[ok[:n]][0])
        for i in np.flatnonzero(ok[n:n + self.closers]):
            t = int(self.byte_ids[i])
            child = m.deep_copy()
            child.consume_token(t)
            if child.is_accepting() or self.allowed(child).tobytes() != sig:
                return t
        return None

    def _tokens(self, path: list) -> list[int]:
        """The walk as the tokenizer writes it: runs of bytes tokenized, special ids as they are."""
        out, run = [], bytearray()
        for p in path:
            if p in self.byte_of:
                run.append(self.byte_of[p])
            elif self.ll.is_special_token(p):
                out += self.ll.tokenize_bytes(bytes(run)) if run else []
                out.append(p)
                run = bytearray()
            else:
                run += self.ll.decode_bytes([p])
        return out + (self.ll.tokenize_bytes(bytes(run)) if run else [])
