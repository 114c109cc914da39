"""Constrained decoding: a JSON schema, a regex or a Lark grammar as a logits processor.

The grammar engine is llguidance (compared with xgrammar and outlines-core on LFM2's
tokenizer: see the README's "Structured output"). Each generation gets a fresh matcher; the
processor masks disallowed tokens to -inf, advances the matcher with each sampled token, and
once the value is closed allows only the stop tokens, so generation ends there.

The mask is computed on the CPU while the device runs the step: the processor queues the
read of the sampled token and the step's forward (``mx.async_eval``, in that order), waits for
the token only, then advances the matcher and asks llguidance for the next mask (which
releases the GIL), so their cost hides behind the forward.
"""

from __future__ import annotations

import json
import weakref
from typing import Optional, Union

import mlx.core as mx
import numpy as np

from .tools import CALL_END, CALL_START, _py_literal as py_literal

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

    ``history`` is the prompt (``prompt_tokens`` ids) then the generated ids, as the decode
    loops pass it. Each call brings the matcher in line with the generated ids (consuming new
    ones; rolling back ones replaced since, as speculative decoding does with rejected drafts,
    looking back at most ``LOOK_BACK`` ids), then masks. An id the grammar refuses (a draft
    that will be rejected, or the stop token that ends generation) is not consumed. Rows past
    the tokenizer's vocabulary (embedding padding) are always masked.
    """

    LOOK_BACK = 32

    def __init__(self, tokenizer, source: str, prompt_tokens: int = 0, what: str = "constraint"):
        from llguidance import LLMatcher

        self.ll = grammar_tokenizer(tokenizer)
        self.matcher = LLMatcher(self.ll, source, log_level=0)
        if self.matcher.is_error():
            raise ConstraintError(f"{what}: {self.matcher.get_error()}")
        self.prompt_tokens = prompt_tokens
        self.tokens: list[int] = []  # the generated ids the matcher has consumed

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
        if not mask.any():  # only when the model's rows do not cover the tokenizer's vocabulary
            raise ConstraintError(f"no token the model can write ({logits.shape[-1]} rows) satisfies the "
                                  "constraint here: does the tokenizer belong to this model?")
        return mx.where(mx.array(mask), logits, mx.array(-mx.inf, logits.dtype))


def make_constraint(tokenizer, *, json_schema: Optional[Schema] = None, regex: Optional[str] = None,
                    grammar: Optional[str] = None, prompt_tokens: int = 0) -> Optional[Constraint]:
    """The processor for one generation, or None without a constraint. Raises
    ``ConstraintError`` (a ValueError) naming what is wrong with the schema/regex/grammar."""
    source = grammar_source(json_schema=json_schema, regex=regex, grammar=grammar)
    if source is None:
        return None
    what = "json_schema" if json_schema is not None else "regex" if regex is not None else "grammar"
    return Constraint(tokenizer, source, prompt_tokens, what)


# --- Forced tool calls: LFM2's Pythonic syntax, <|tool_call_start|>[f(a=1, b="x")]<|tool_call_end|>

_PY_ANY = r"""
py_any: py_str | py_num | "True" | "False" | "None" | "[" (py_any (", " py_any)*)? "]"
      | "{" (py_str ": " py_any (", " py_str ": " py_any)*)? "}"
py_str: %json{"type": "string", "x-guidance": {"json_allowed_escapes": "nrbtf\\\"", "whitespace_flexible": false}}
py_num: %json{"type": "number"}
PY_NAME: /[A-Za-z_][A-Za-z0-9_]{0,63}/
"""
# JSON strings and numbers are Python literals too (with the \/ and \u escapes excluded, they
# mean the same); true/false/null are not, so those and the containers are spelled here.
_STR_OPTIONS = {"json_allowed_escapes": 'nrbtf\\"', **JSON_DEFAULTS}


def _lit(text: str) -> str:
    """A Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


class _PythonicGrammar:
    """JSON schemas of tool parameters -> Lark rules whose text ``ast.literal_eval`` reads."""

    def __init__(self):
        self.rules, self.defs, self.named = [], {}, {}

    def use_defs(self, params: dict) -> None:
        """One tool's ``$defs`` / ``definitions``, which its ``$ref``s point into."""
        self.defs = {**params.get("$defs", {}), **params.get("definitions", {})}
        self.named = {}

    def rule(self, body: str) -> str:
        name = f"r{len(self.rules)}"
        self.rules.append(f"{name}: {body}")
        return name

    def value(self, s) -> str:
        if not isinstance(s, dict) or not s:
            return "py_any"
        if "$ref" in s:
            ref = s["$ref"]
            for prefix in ("#/$defs/", "#/definitions/"):
                if ref.startswith(prefix) and ref[len(prefix):] in self.defs:
                    return self.ref(ref[len(prefix):])
            raise ConstraintError(f"tool parameters: unsupported $ref {ref!r}")
        if "const" in s or "enum" in s:
            values = [s["const"]] if "const" in s else s["enum"]
            return "(" + " | ".join(_lit(py_literal(v)) for v in values) + ")"
        for key in ("anyOf", "oneOf"):
            if key in s:
                return "(" + " | ".join(self.value(sub) for sub in s[key]) + ")"
        kind = s.get("type")
        if isinstance(kind, list):
            return "(" + " | ".join(self.value({**s, "type": k}) for k in kind) + ")"
        if kind in ("string", "number", "integer"):
            sub = {k: v for k, v in s.items() if k not in ("description", "title", "default", "examples")}
            return "%json" + json.dumps({**sub, "x-guidance": _STR_OPTIONS}, ensure_ascii=False)
        if kind == "boolean":
            return '("True" | "False")'
        if kind == "null":
            return '"None"'
        if kind == "array" and isinstance(s.get("items"), dict):
            item, lo, hi = self.value(s["items"]), s.get("minItems", 0), s.get("maxItems")
            more = f'(", " {item})' + (f"{{{max(lo - 1, 0)},{hi - 1}}}" if hi is not None else
                                        f"{{{max(lo - 1, 0)},}}")
            body = f"{item} {more}"
            return self.rule(f'"[" {body} "]"' if lo > 0 else f'"[" ({body})? "]"' if hi != 0 else '"[" "]"')
        if kind == "object" and isinstance(s.get("properties"), dict):
            fields = [(_lit(_lit(k) + ": "), self.value(v), k in s.get("required", ()))
                      for k, v in s["properties"].items()]
            return self.rule(f'"{{" {self.fields(fields)} "}}"')
        return "py_any"

    def ref(self, name: str) -> str:
        """A rule per definition, named before its body is built, so definitions may recurse."""
        if name not in self.named:
            i = len(self.rules)
            self.named[name] = f"d{i}"
            self.rules.append("")  # its place, taken before the body adds rules of its own
            self.rules[i] = f"d{i}: {self.value(self.defs[name])}"
        return self.named[name]

    def fields(self, fields: list) -> str:
        """``k1=v1, k2=v2`` in order, optional ones may be left out: ``first_i`` is what may
        follow when nothing is written yet, ``rest_i`` when something is (so it opens ", ")."""
        first, rest = "", ""
        for key, value, required in reversed(fields):
            item = f"{key} {value}"
            rest_next, first_next = rest, first
            rest = self.rule(f'", " {item} {rest_next}' if required else f'(", " {item})? {rest_next}')
            first = self.rule(f"{item} {rest_next}" if required else
                              f"{item} {rest_next} | {first_next}" if first_next else f"({item} {rest_next})?")
        return first


def tool_call_grammar(tools: list, name: Optional[str] = None, opened: bool = False) -> str:
    """A Lark grammar for one LFM2 tool-call block: ``name`` called once, or (None) one or more
    calls of any of ``tools`` (OpenAI ``{"type": "function", "function": {...}}`` or bare
    ``{"name", "parameters"}`` dicts). Arguments follow each tool's parameter schema.

    ``opened``: the reply already holds the block's opening (``forced_tool_opening``), as the
    server writes it at the end of the prompt; the grammar covers the rest.
    """
    functions = [t.get("function", t) for t in tools]
    if name is not None:
        functions = [f for f in functions if f.get("name") == name]
        if not functions:
            raise ConstraintError(f"tool_choice names {name!r}, which is not one of the tools")
    g = _PythonicGrammar()
    calls = []
    for f in functions:
        if not isinstance(f.get("name"), str) or not f["name"].replace(".", "_").isidentifier():
            raise ConstraintError(f"tool name {f.get('name')!r} is not a Python name, so LFM2's call "
                                  "syntax cannot call it")
        params = f.get("parameters") or {}
        g.use_defs(params)
        props = params.get("properties")
        for key in props or ():
            if not str(key).isidentifier():
                raise ConstraintError(f"tool {f['name']}: parameter {key!r} is not a Python name, "
                                      "so LFM2's call syntax cannot pass it")
        if isinstance(props, dict):
            fields = [(_lit(f"{k}="), g.value(v), k in params.get("required", ())) for k, v in props.items()]
            args = g.fields(fields)
        else:  # no declared parameters: any keyword arguments
            args = '(PY_NAME "=" py_any (", " PY_NAME "=" py_any)*)?'
        calls.append((_lit(f["name"] + "("), f'{args} ")"'))
    if name is not None:
        ((head, rest),) = calls
        body = rest if opened else f"{head} {rest}"
    else:
        call = "(" + " | ".join(g.rule(f"{head} {rest}") for head, rest in calls) + ")"
        body = f'{call} (", " {call})*'
    start = f'start: {body} "]" {CALL_END}' if opened else f'start: {CALL_START} "[" {body} "]" {CALL_END}'
    return "\n".join([start, *g.rules, _PY_ANY])


def forced_tool_opening(name: Optional[str] = None) -> str:
    """The reply's first characters when a call is forced (of ``name``, or of any tool)."""
    return f"{CALL_START}[{name}(" if name is not None else f"{CALL_START}["
