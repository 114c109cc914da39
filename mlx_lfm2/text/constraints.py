"""Constrained decoding: a JSON schema, a regex or a Lark grammar as a logits processor.

The grammar engine is llguidance (compared with xgrammar and outlines-core on LFM2's
tokenizer: see the README's "Structured output"). Each generation gets a fresh matcher; the
processor masks disallowed tokens to -inf, advances the matcher with each sampled token, and
once the value is closed allows only the stop tokens, so generation ends there.

The mask is computed on the CPU while the device runs the step: the processor starts the
forward (``mx.async_eval``) before it reads the previous token and asks llguidance for the
next mask (which releases the GIL), so its cost hides behind the forward.
"""

from __future__ import annotations

import json
import weakref
from typing import Optional, Union

import mlx.core as mx
import numpy as np

Schema = Union[dict, bool, str]

# One line, ", " / ": " separators (as json.dumps writes): no free whitespace, which a weak
# model can loop on forever. A schema's "x-guidance" key overrides these (llguidance's options).
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintError(ValueError):
    """A schema, regex or grammar that cannot be enforced (invalid, unsupported keyword, ...)."""


_LL_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def grammar_tokenizer(tokenizer):
    """llguidance's view of ``tokenizer`` (built from its tokenizer.json once, ~0.5 s; cached)."""
    import llguidance

    ll = _LL_TOKENIZERS.get(tokenizer)
    if ll is None:
        ll = llguidance.LLTokenizer(tokenizer.backend.to_str(), eos_token=sorted(tokenizer.eos_token_ids))
        _LL_TOKENIZERS[tokenizer] = ll
    return ll


def grammar_source(*, json_schema: Optional[Schema] = None, regex: Optional[str] = None,
                   grammar: Optional[str] = None) -> Optional[str]:
    """llguidance's grammar text for exactly one of the three (None when none is given).

    ``json_schema``: a dict (or its JSON text); keywords llguidance does not implement are
    an error unless the schema says ``"x-guidance": {"lenient": true}``. ``regex``: the whole
    output must match.
    ``grammar``: llguidance's Lark dialect (``%json{...}`` embeds a schema, ``<|name|>`` a
    special token).
    """
    from llguidance import LLMatcher

    given = [k for k, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar)) if v is not None]
    if len(given) > 1:
        raise ConstraintError(f"pass one constraint, not {' and '.join(given)}")
    if json_schema is not None:
        if isinstance(json_schema, str):
            try:
                json_schema = json.loads(json_schema)
            except ValueError as e:
                raise ConstraintError(f"json_schema is not valid JSON: {e}") from None
        if not isinstance(json_schema, (dict, bool)):
            raise ConstraintError("json_schema must be a JSON object (or true/false)")
        try:
            return LLMatcher.grammar_from_json_schema(json_schema, defaults=JSON_DEFAULTS)
        except (ValueError, TypeError) as e:
            raise ConstraintError(f"json_schema: {e}") from None
    if regex is not None:
        if not isinstance(regex, str):
            raise ConstraintError("regex must be a string")
        return LLMatcher.grammar_from_regex(regex)
    if grammar is not None:
        if not isinstance(grammar, str):
            raise ConstraintError("grammar must be a string (llguidance's Lark syntax)")
        return LLMatcher.grammar_from_lark(grammar)
    return None


class Constraint:
    """A logits processor ``(history [T], logits [1, V]) -> logits`` enforcing one grammar.

    ``history`` is the prompt (``prompt_tokens`` ids) then the generated ids, as
    ``generate_step`` passes it; each call consumes the newest generated id, if any, then
    masks. Rows past the tokenizer's vocabulary (embedding padding) are always masked.
    """

    def __init__(self, tokenizer, source: str, prompt_tokens: int = 0, what: str = "constraint"):
        from llguidance import LLMatcher

        self.ll = grammar_tokenizer(tokenizer)
        self.matcher = LLMatcher(self.ll, source, log_level=0)
        if self.matcher.is_error():
            raise ConstraintError(f"{what}: {self.matcher.get_error()}")
        self.prompt_tokens, self.consumed = prompt_tokens, 0
        self.eos = sorted(tokenizer.eos_token_ids)

    @property
    def done(self) -> bool:
        """The value is closed: only a stop token may follow."""
        return self.matcher.is_stopped()

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the constraint rejected token {token}: {self.matcher.get_error()}")
        self.consumed += 1

    def allowed(self, vocab: int) -> np.ndarray:
        """The next token's mask ``[vocab]`` (bool) in the matcher's current state."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), np.uint8)
        mask = np.zeros(vocab, bool)
        n = min(vocab, self.ll.vocab_size)
        mask[:n] = np.unpackbits(bits, bitorder="little", count=n).astype(bool)
        return mask

    def __call__(self, history: mx.array, logits: mx.array) -> mx.array:
        mx.async_eval(logits)  # the forward runs while the matcher works below
        new = history.size - self.prompt_tokens - self.consumed
        assert new in (0, 1), "the constraint must see every generated token"
        if new:
            self.advance(history[-1].item())
        mask = mx.array(self.allowed(logits.shape[-1]))
        return mx.where(mask, logits, mx.array(-mx.inf, logits.dtype))


def make_constraint(tokenizer, *, json_schema: Optional[Schema] = None, regex: Optional[str] = None,
                    grammar: Optional[str] = None, prompt_tokens: int = 0) -> Optional[Constraint]:
    """The processor for one generation, or None without a constraint. Raises
    ``ConstraintError`` (a ValueError) naming what is wrong with the schema/regex/grammar."""
    source = grammar_source(json_schema=json_schema, regex=regex, grammar=grammar)
    if source is None:
        return None
    what = "json_schema" if json_schema is not None else "regex" if regex is not None else "grammar"
    return Constraint(tokenizer, source, prompt_tokens, what)
