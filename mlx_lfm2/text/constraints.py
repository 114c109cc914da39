"""Constrained decoding: a JSON schema, a regex or a Lark grammar as a logits processor.

The grammar engine is llguidance (compared with xgrammar and outlines-core on LFM2's
tokenizer: see the README's "Structured output"). Each generation gets a fresh matcher; the
processor masks disallowed tokens to -inf, advances the matcher with each sampled token, and
once the value is closed allows only the stop tokens, so generation ends there.

The mask is computed on the CPU while the device runs the step: the processor queues the
read of the sampled token and the step's forward (``mx.async_eval``, in that order), waits for
the token only, then advances the matcher and asks llguidance for the next mask (which
releases the GIL), so their cost hides behind the forward.

Given the reply's token budget (``max_tokens``), the processor also makes sure the reply can
still end within it: it keeps a completion of the current state (``closing.Closer``: the bytes
that close what is open, as tokens, then a stop token). While more than ``window`` tokens are to
spare the mask is the grammar's; within ``window`` it keeps only the next token of that
completion and those of the model's ``TOP`` choices after which a completion still fits; with
nothing to spare, only the completion's next token; when even that completion does not fit,
the grammar's mask from there on (the reply ends "length"). So a reply whose grammar can end
within ``max_tokens`` does (a single token that lengthens the way to the end by more than
``window``, an object of many required keys opened at once, widens ``window`` for the rest).

What a grammar may cost is bounded (``LIMITS``, ``MAX_SCHEMA_CHARS``, ``MAX_SCHEMA_DEPTH``), and
every number a JSON schema admits has bounded digits (``bounded_number``).
"""

from __future__ import annotations

import json
import weakref
from typing import Optional, Union

import mlx.core as mx
import numpy as np

from .closing import Closer

Schema = Union[dict, bool, str]

# One line, ", " / ": " separators (as json.dumps writes): no free whitespace, which a weak
# model can loop on forever. A schema's "x-guidance" key overrides these (llguidance's options).
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# Numbers without bounds of their own: at most 15 digits before the point (|x| < 1e15, as a
# double holds integers exactly) and 6 after it, no exponent. A schema's own minimum, maximum
# or multipleOf take precedence; a missing bound alone is filled in.
MAX_INT_DIGITS, MAX_FRACTION_DIGITS = 15, 6
_BOUND = 10 ** MAX_INT_DIGITS - 1

# What compiling one grammar may cost: llguidance's limits (its defaults are 500k symbols, 1M
# lexer fuel ~20 ms, 250k lexer states ~0.5 GB), checked while it compiles and steps; and the
# schema's size and nesting, checked before.
MAX_SCHEMA_CHARS, MAX_SCHEMA_DEPTH = 100_000, 32
_LIMITS = dict(max_grammar_size=100_000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000,
               step_max_items=50_000, max_lexer_states=50_000, verbose_errors=False)


class ConstraintError(ValueError):
    """A schema, regex or grammar that cannot be enforced (invalid, unsupported keyword,
    admitting no output, over a limit)."""


_LL_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def grammar_tokenizer(tokenizer):
    """llguidance's view of ``tokenizer`` (built from its tokenizer.json once, ~0.5 s; cached)."""
    import llguidance

    ll = _LL_TOKENIZERS.get(tokenizer)
    if ll is None:
        ll = llguidance.LLTokenizer(tokenizer.backend.to_str(), eos_token=sorted(tokenizer.eos_token_ids))
        _LL_TOKENIZERS[tokenizer] = ll
    return ll


def bounded_number(s: dict) -> dict:
    """A ``number`` / ``integer`` schema with its digits bounded (see ``MAX_INT_DIGITS``)."""
    s = dict(s)
    num = lambda k: s.get(k) if isinstance(s.get(k), (int, float)) and not isinstance(s.get(k), bool) else None  # noqa: E731
    lo = num("minimum") if num("minimum") is not None else num("exclusiveMinimum")
    hi = num("maximum") if num("maximum") is not None else num("exclusiveMaximum")
    if lo is None:
        s["minimum"] = -_BOUND if hi is None or hi >= -_BOUND else hi - _BOUND
    if hi is None:
        s["maximum"] = _BOUND if lo is None or lo <= _BOUND else lo + _BOUND
    kinds = s.get("type") if isinstance(s.get("type"), list) else [s.get("type")]
    if "number" in kinds and "multipleOf" not in s:
        s["multipleOf"] = 10.0 ** -MAX_FRACTION_DIGITS
    return s


_SUBSCHEMA = ("additionalProperties", "items", "additionalItems", "contains", "propertyNames",
              "unevaluatedItems", "unevaluatedProperties", "if", "then", "else")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


_ANY = "#/$defs/mlx_lfm2_any"  # a JSON value whose numbers are bounded, for what a schema leaves open
_ANY_DEF = {"anyOf": [{"type": "null"}, {"type": "boolean"}, bounded_number({"type": "number"}), {"type": "string"},
                      {"type": "array", "items": {"$ref": _ANY}}, {"type": "object", "additionalProperties": {"$ref": _ANY}}]}


def bound_numbers(s, depth: int = 0):
    """``s`` with every ``number`` / ``integer`` subschema bounded (``bounded_number``), and
    values it leaves open (``{}``, an object's other keys, a list's items) bounded-number JSON."""
    if s is True or s == {}:
        return {"$ref": _ANY}
    if not isinstance(s, dict):
        return s
    if depth > MAX_SCHEMA_DEPTH:
        raise ConstraintError(f"json_schema is nested more than {MAX_SCHEMA_DEPTH} deep")
    out = dict(s)
    for k in _SUBSCHEMA:
        if isinstance(s.get(k), dict) or s.get(k) is True:
            out[k] = bound_numbers(s[k], depth + 1)
    for k in _SCHEMA_LISTS:
        if isinstance(s.get(k), list):
            out[k] = [bound_numbers(v, depth + 1) for v in s[k]]
    for k in _SCHEMA_MAPS:
        if isinstance(s.get(k), dict):
            out[k] = {name: bound_numbers(v, depth + 1) for name, v in s[k].items()}
        elif k in s:  # llguidance reads it as a map: anything else is the schema's fault, not ours
            raise ConstraintError(f"json_schema: {k} must be an object of schemas, not {type(s[k]).__name__}")
    kinds = [k for k in (s.get("type") if isinstance(s.get("type"), list) else [s.get("type")]) if isinstance(k, str)]
    if kinds == ["object"] and "additionalProperties" not in s and "unevaluatedProperties" not in s:
        out["additionalProperties"] = {"$ref": _ANY}
    if kinds == ["array"] and "items" not in s and "prefixItems" not in s:
        out["items"] = {"$ref": _ANY}
    return bounded_number(out) if {"number", "integer"} & set(kinds) else out


def _with_any(schema):
    """The root schema, holding ``_ANY``'s definition when something refers to it."""
    if not isinstance(schema, dict) or _ANY not in json.dumps(schema):
        return schema
    return {**schema, "$defs": {**schema.get("$defs", {}), "mlx_lfm2_any": _ANY_DEF}}


def _schema(json_schema) -> Union[dict, bool]:
    """The schema as a dict (or boolean), checked against the size limits, numbers bounded."""
    if isinstance(json_schema, str):
        text = json_schema
        try:
            json_schema = json.loads(json_schema)
        except (ValueError, RecursionError) as e:
            raise ConstraintError(f"json_schema is not valid JSON: {e}") from None
    elif isinstance(json_schema, (dict, bool)):
        try:
            text = json.dumps(json_schema)
        except (TypeError, ValueError, RecursionError) as e:
            raise ConstraintError(f"json_schema is not JSON: {e}") from None
    else:
        raise ConstraintError("json_schema must be a JSON object (or true/false)")
    if not isinstance(json_schema, (dict, bool)):
        raise ConstraintError("json_schema must be a JSON object (or true/false)")
    if len(text) > MAX_SCHEMA_CHARS:
        raise ConstraintError(f"json_schema is {len(text)} characters, over the limit of {MAX_SCHEMA_CHARS}")
    return _with_any(bound_numbers(json_schema))  # llguidance then names what it refuses


def check_schema(schema, what: str = "json_schema") -> None:
    """Refuse a schema that its own draft's metaschema refuses (Draft 2020-12 unless it
    names another in ``$schema``): a keyword of the wrong JSON type (``"type": 5``,
    ``"minItems": "2"``, ``"required": "a"``) is the request's fault, said by path. For the
    tool-call grammar, which reads only some keywords (llguidance checks response formats)."""
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import Draft202012Validator, validator_for

    try:
        validator_for(schema, default=Draft202012Validator).check_schema(schema)
    except SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "its root"
        raise ConstraintError(f"{what} is not a valid JSON Schema: at {where}, {e.message[:200]}") from None


def grammar_source(*, json_schema: Optional[Schema] = None, regex: Optional[str] = None,
                   grammar: Optional[str] = None) -> Optional[str]:
    """llguidance's grammar text for exactly one of the three (None when none is given).

    ``json_schema``: a dict (or its JSON text); keywords llguidance does not implement are
    an error unless the schema says ``"x-guidance": {"lenient": true}`` (then they are listed
    in the constraint's ``warnings``). ``regex``: the whole output must match.
    ``grammar``: llguidance's Lark dialect (``%json{...}`` embeds a schema, ``<|name|>`` a
    special token).
    """
    from llguidance import LLMatcher

    given = [k for k, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar)) if v is not None]
    if len(given) > 1:
        raise ConstraintError(f"pass one constraint, not {' and '.join(given)}")
    if json_schema is not None:
        schema = _schema(json_schema)
        if schema is False:
            raise ConstraintError("json_schema is false, which admits no value")
        try:
            return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
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

    ``history`` is the prompt (``prompt_tokens`` ids) then the generated ids, as the decode
    loops pass it. Each call brings the matcher in line with the generated ids (consuming new
    ones; rolling back ones replaced since, as speculative decoding does with rejected drafts,
    looking back at most ``LOOK_BACK`` ids), then masks. An id the grammar refuses (a draft
    that will be rejected, or the stop token that ends generation) is not consumed. Rows past
    the tokenizer's vocabulary (embedding padding) are always masked.

    ``max_tokens``: the reply's budget, stop token included (None: no budget). ``warnings``:
    what llguidance did not enforce (a lenient schema's unsupported keywords).
    """

    LOOK_BACK = 32
    TOP = 8  # the model's choices checked for room to finish, within the window
    WINDOW, MAX_WINDOW = 8, 64  # tokens to spare below which the budget shapes the mask (it grows, see above)
    MAX_REACH = 4096  # bytes a completion walk may write (~40 us each): a longer end lets the budget go

    def __init__(self, tokenizer, source: str, prompt_tokens: int = 0, what: str = "constraint",
                 max_tokens: Optional[int] = None):
        from llguidance import LLMatcher, LLParserLimits

        self.ll = grammar_tokenizer(tokenizer)
        self.matcher = LLMatcher(self.ll, source, log_level=0, limits=LLParserLimits(**_LIMITS))
        if self.matcher.is_error():
            raise ConstraintError(f"{what}: {self.matcher.get_error()}")
        self.warnings = self.matcher.get_grammar_warnings()
        self.prompt_tokens, self.max_tokens = prompt_tokens, max_tokens
        self.tokens: list[int] = []  # the generated ids the matcher has consumed
        self.closer, self.window = Closer(self.ll, source), self.WINDOW
        self.plan = self.closer.complete(self.matcher, self.reach)  # a completion of the current state
        self.plan_at, self.fresh = 0, True  # len(self.tokens) when ``plan`` was made; see ``completion``
        if self.plan is None and not self.closer.gave_up:
            raise ConstraintError(f"{what} admits no output: no text ends it")

    @property
    def reach(self) -> int:
        """The bytes a completion may take (more than the budget could hold; at most ``MAX_REACH``)."""
        return self.MAX_REACH if self.max_tokens is None else min(self.MAX_REACH, 8 * self.max_tokens + 64)

    @property
    def done(self) -> bool:
        """The value is closed: only a stop token may follow."""
        return self.matcher.is_stopped()

    def advance(self, tokens: list[int]) -> int:
        """Consume ``tokens`` up to the first one the grammar refuses; how many were taken."""
        n = self.matcher.try_consume_tokens(tokens)
        self.tokens += tokens[:n]
        return n

    def rollback(self, n: int) -> None:
        if n and not self.matcher.rollback(n):
            raise RuntimeError(f"the constraint cannot take back {n} tokens: {self.matcher.get_error()}")
        del self.tokens[len(self.tokens) - n:]

    def allowed(self, vocab: int) -> np.ndarray:
        """The next token's mask ``[vocab]`` (bool) in the matcher's current state."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), np.uint8)
        mask = np.zeros(vocab, bool)
        n = min(vocab, self.ll.vocab_size)
        mask[:n] = np.unpackbits(bits, bitorder="little", count=n).astype(bool)
        return mask

    def completion(self, fresh: bool = False) -> Optional[list[int]]:
        """A way to the end from here (tokens, the last a stop token): the last one found, less
        what was written along it, while it still holds; else a new one. ``fresh``: one found
        from here, or followed since it was (not one that merely still holds)."""
        new = self.tokens[self.plan_at:] if self.plan_at <= len(self.tokens) else None
        old = self.plan
        if old is not None and new is not None:
            followed = old[:len(new)] == new
            if followed:
                tries = [old[len(new):]] if self.fresh or not fresh else []
            else:  # the reply left it: it may still hold, or do once the reply wrote its first tokens
                tries = [] if fresh else [old, old[1:], old[2:]]
            for rest in tries:
                if rest and self.matcher.validate_tokens(rest) == len(rest):
                    self.plan, self.plan_at, self.fresh = rest, len(self.tokens), followed and self.fresh
                    return rest
        self.plan, self.plan_at, self.fresh = self.closer.complete(self.matcher, self.reach), len(self.tokens), True
        if old is not None and self.plan is not None and new is not None:  # how far one step set the end back
            grew = len(self.plan) - len(old) + len(new) + 1
            self.window = min(max(self.window, grew), self.MAX_WINDOW)
        return self.plan

    def budget(self, mask: np.ndarray, logits: mx.array, left: int) -> np.ndarray:
        """``mask`` less the tokens after which the reply could not end in the ``left`` tokens."""
        plan = self.completion()
        if plan is not None and len(plan) < left - self.window:
            return mask
        plan = self.completion(fresh=True)
        if plan is None or len(plan) > left:  # no end in reach of the budget: the grammar's mask from here on
            self.max_tokens = None
            return mask
        keep = np.zeros_like(mask)
        keep[plan[0]] = True
        if len(plan) < left:  # room for other choices: the model's best that leave room to finish
            scores = np.where(mask, np.array(logits[0].astype(mx.float32)), -np.inf)
            top = np.argpartition(scores, -self.TOP)[-self.TOP:]
            for t in top[np.isfinite(scores[top])].tolist():
                keep[t] = keep[t] or self._fits(t, left - 1)
        return keep

    def _fits(self, token: int, left: int) -> bool:
        """Whether a completion of at most ``left`` tokens follows ``token``."""
        if token in self.ll.eos_tokens:
            return True
        child = self.matcher.deep_copy()
        if not child.consume_token(token):
            return False
        plan = self.closer.complete(child, 8 * left + 64)
        return plan is not None and len(plan) <= left

    def __call__(self, history: mx.array, logits: mx.array) -> mx.array:
        generated, held = history.size - self.prompt_tokens, len(self.tokens)
        start = max(0, min(generated, held) - self.LOOK_BACK)
        # Queue the read of the newest ids, then this step's forward behind it, then wait for
        # the read only: the device never idles, and the matcher works while the forward runs.
        recent = history[self.prompt_tokens + start:]
        mx.async_eval(recent)
        mx.async_eval(logits)
        recent = recent.tolist() if generated > start else []
        same = start
        while same < min(generated, held) and recent[same - start] == self.tokens[same]:
            same += 1
        self.rollback(held - same)
        self.advance(recent[same - start:])
        mask = self.allowed(logits.shape[-1])
        if self.max_tokens is not None and not self.done:
            mask = self.budget(mask, logits, self.max_tokens - generated)
        if not mask.any():  # only when the model's rows do not cover the tokenizer's vocabulary
            raise ConstraintError(f"no token the model can write ({logits.shape[-1]} rows) satisfies the "
                                  "constraint here: does the tokenizer belong to this model?")
        return mx.where(mx.array(mask), logits, mx.array(-mx.inf, logits.dtype))


def schema_errors(schema: Schema, text: str) -> list[str]:
    """Why ``text`` is not a JSON value of ``schema`` (empty when it is): the check after
    generation for what a lenient schema did not enforce (``jsonschema``, draft 2020-12)."""
    import jsonschema

    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        return [f"not JSON: {e}"]
    try:
        validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
        return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"[:300]
                for e in list(validator.iter_errors(value))[:10]]
    except (jsonschema.SchemaError, RecursionError, ValueError, TypeError) as e:
        return [f"the schema cannot be checked: {str(e)[:200]}"]


def make_constraint(tokenizer, *, json_schema: Optional[Schema] = None, regex: Optional[str] = None,
                    grammar: Optional[str] = None, prompt_tokens: int = 0,
                    max_tokens: Optional[int] = None) -> Optional[Constraint]:
    """The processor for one generation, or None without a constraint. Raises
    ``ConstraintError`` (a ValueError) naming what is wrong with the schema/regex/grammar.
    ``max_tokens``: the reply's budget, which the mask keeps room to finish in."""
    source = grammar_source(json_schema=json_schema, regex=regex, grammar=grammar)
    if source is None:
        return None
    what = "json_schema" if json_schema is not None else "regex" if regex is not None else "grammar"
    return Constraint(tokenizer, source, prompt_tokens, what, max_tokens)
