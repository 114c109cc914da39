"""The grammar of a forced tool call: LFM2's Pythonic syntax, ``<|tool_call_start|>[f(a=1, b="x")]<|tool_call_end|>``.

``tool_call_grammar`` turns the offered tools' parameter schemas into a Lark grammar (llguidance's
dialect) whose every sentence ``tools.parse_tool_calls`` reads back as calls whose arguments match
those schemas. What the grammar admits is bounded: at most ``max_calls`` calls, numbers of bounded
digits (``constraints.bounded_number``), schemas nested at most ``MAX_DEPTH`` deep and a grammar of at
most ``MAX_GRAMMAR_CHARS``; a malformed schema (a ``required`` that is not a list, an empty ``enum``,
...) is a ``ConstraintError`` naming the tool and the keyword.
"""

from __future__ import annotations

import json
from typing import Optional

from .constraints import JSON_DEFAULTS, ConstraintError, bounded_number, check_schema
from .tools import CALL_END, CALL_START, py_literal

MAX_CALLS = 4  # calls in one forced block when parallel calls are allowed
MAX_DEPTH = 32  # schema nesting
MAX_GRAMMAR_CHARS = 200_000  # a few hundred bytes of schema make a few KB of grammar; this is far past that

# JSON strings and numbers are Python literals too (with the \/ and \u escapes excluded, they
# mean the same); true/false/null are not, so those and the containers are spelled here.
_STR_OPTIONS = {"json_allowed_escapes": 'nrbtf\\"', **JSON_DEFAULTS}
_PY_ANY = f"""
py_any: py_str | py_num | "True" | "False" | "None" | py_list | py_dict
py_list: "[" (py_any (", " py_any)*)? "]"
py_dict: "{{" (py_str ": " py_any (", " py_str ": " py_any)*)? "}}"
py_str: %json{json.dumps({"type": "string", "x-guidance": _STR_OPTIONS})}
py_num: %json{json.dumps({**bounded_number({"type": "number"}), "x-guidance": _STR_OPTIONS})}
PY_NAME: /[A-Za-z_][A-Za-z0-9_]{{0,63}}/
"""
# The keywords a scalar's %json piece keeps (the rest describe other types or nothing enforced).
_SCALAR_KEYS = {"string": ("minLength", "maxLength", "pattern", "format"),
                "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"),
                "integer": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")}


def _lit(text: str) -> str:
    """A Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def _required(s: dict, what: str) -> list:
    names = _expect(s.get("required", []), list, f"{what}: required")
    if not all(isinstance(n, str) for n in names):
        raise ConstraintError(f"{what}: required must list parameter names (strings)")
    return names


def _expect(value, kind, what: str):
    if not isinstance(value, kind):
        names = {dict: "an object", list: "a list", str: "a string", int: "an integer"}
        raise ConstraintError(f"{what} must be {names.get(kind, kind)}, not {type(value).__name__}")
    return value


class _PythonicGrammar:
    """JSON schemas of tool parameters -> Lark rules whose text ``ast.literal_eval`` reads."""

    def __init__(self):
        self.rules, self.defs, self.named, self.memo, self.size = [], {}, {}, {}, 0
        self.where = ""

    def use_tool(self, name: str, params: dict) -> None:
        """One tool's ``$defs`` / ``definitions``, which its ``$ref``s point into."""
        self.where = f"tool {name}"
        defs = {}
        for key in ("$defs", "definitions"):
            defs.update(_expect(params.get(key, {}), dict, f"{self.where}: {key}"))
        self.defs, self.named, self.memo = defs, {}, {}

    def rule(self, body: str) -> str:
        name = f"r{len(self.rules)}"
        self.add(f"{name}: {body}")
        return name

    def add(self, line: str, at: Optional[int] = None) -> None:
        self.size += len(line)
        if self.size > MAX_GRAMMAR_CHARS:
            raise ConstraintError(f"the tools' parameter schemas make a grammar over {MAX_GRAMMAR_CHARS} "
                                  "characters: simplify them (fewer alternatives, less nesting)")
        if at is None:
            self.rules.append(line)
        else:
            self.rules[at] = line

    def value(self, s, depth: int = 0) -> str:
        """The rule (or expression) for values of schema ``s``; equal subschemas share one."""
        if not isinstance(s, dict) or not s:
            if not isinstance(s, (dict, bool)):
                raise ConstraintError(f"{self.where}: a schema must be an object or a boolean, not {s!r:.60}")
            if s is False:
                raise ConstraintError(f"{self.where}: a parameter's schema is false, so no value can be passed")
            return "py_any"
        if depth > MAX_DEPTH:
            raise ConstraintError(f"{self.where}: parameter schemas nested more than {MAX_DEPTH} deep")
        key = json.dumps(s, sort_keys=True, default=str)
        if key not in self.memo:
            self.memo[key] = self._value(s, depth + 1)
        return self.memo[key]

    def _value(self, s: dict, depth: int) -> str:
        if "$ref" in s:
            ref = _expect(s["$ref"], str, f"{self.where}: $ref")
            for prefix in ("#/$defs/", "#/definitions/"):
                if ref.startswith(prefix) and ref[len(prefix):] in self.defs:
                    return self.ref(ref[len(prefix):], depth)
            raise ConstraintError(f"{self.where}: unsupported $ref {ref!r}")
        if "const" in s or "enum" in s:
            values = [s["const"]] if "const" in s else _expect(s["enum"], list, f"{self.where}: enum")
            if not values:
                raise ConstraintError(f"{self.where}: an empty enum admits no value")
            return "(" + " | ".join(_lit(py_literal(v)) for v in values) + ")"
        for key in ("anyOf", "oneOf"):
            if key in s:
                subs = _expect(s[key], list, f"{self.where}: {key}")
                if not subs:
                    raise ConstraintError(f"{self.where}: an empty {key} admits no value")
                return "(" + " | ".join(self.value(sub, depth) for sub in subs) + ")"
        kind = s.get("type")
        if not (kind is None or isinstance(kind, str) or isinstance(kind, list) and all(isinstance(k, str) for k in kind)):
            raise ConstraintError(f"{self.where}: type must be a string or a list of strings, not {kind!r:.60}")
        if isinstance(kind, list):
            if not kind:
                raise ConstraintError(f"{self.where}: an empty list of types admits no value")
            return "(" + " | ".join(self.value({**s, "type": k}, depth) for k in dict.fromkeys(kind)) + ")"
        if kind in _SCALAR_KEYS:
            sub = {k: s[k] for k in _SCALAR_KEYS[kind] if k in s}
            sub = bounded_number({"type": kind, **sub}) if kind != "string" else {"type": kind, **sub}
            return "%json" + json.dumps({**sub, "x-guidance": _STR_OPTIONS}, ensure_ascii=False)
        if kind == "boolean":
            return '("True" | "False")'
        if kind == "null":
            return '"None"'
        if kind == "array" and isinstance(s.get("items"), dict):
            return self.array(s, depth)
        if kind == "object" and isinstance(s.get("properties"), dict):
            required = _required(s, self.where)
            fields = [(_lit(_lit(k) + ": "), self.value(v, depth), k in required) for k, v in s["properties"].items()]
            return self.rule(f'"{{" {self.fields(fields)} "}}"')
        if kind in ("array", "object"):
            return "py_list" if kind == "array" else "py_dict"
        if kind is not None:
            raise ConstraintError(f"{self.where}: unknown type {kind!r}")
        return "py_any"

    def array(self, s: dict, depth: int) -> str:
        lo, hi = s.get("minItems", 0), s.get("maxItems")
        for k, v in (("minItems", lo), ("maxItems", hi)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ConstraintError(f"{self.where}: {k} must be a non-negative integer, not {v!r:.40}")
        if hi is not None and hi < lo:
            raise ConstraintError(f"{self.where}: maxItems {hi} is under minItems {lo}, so no list fits")
        if hi == 0:
            return '"[" "]"'
        item = self.value(s["items"], depth)
        more = f'(", " {item})' + (f"{{{max(lo - 1, 0)},{hi - 1}}}" if hi is not None else f"{{{max(lo - 1, 0)},}}")
        body = f"{item} {more}"
        return self.rule(f'"[" {body} "]"' if lo > 0 else f'"[" ({body})? "]"')

    def ref(self, name: str, depth: int) -> str:
        """A rule per definition, named before its body is built, so definitions may recurse."""
        if name not in self.named:
            i = len(self.rules)
            self.named[name] = f"d{i}"
            self.rules.append("")  # its place, taken before the body adds rules of its own
            self.add(f"d{i}: {self.value(self.defs[name], depth)}", at=i)
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


def _arguments(g: _PythonicGrammar, f: dict) -> str:
    """The rule for one tool's keyword arguments."""
    params = f.get("parameters")
    params = {} if params is None else _expect(params, dict, f"tool {f['name']}: parameters")
    g.use_tool(f["name"], params)
    props = params.get("properties")
    if props is None:  # no declared parameters: any keyword arguments
        return '(PY_NAME "=" py_any (", " PY_NAME "=" py_any)*)?'
    _expect(props, dict, f"tool {f['name']}: properties")
    required = _required(params, f"tool {f['name']}")
    for key in props:
        if not str(key).isidentifier():
            raise ConstraintError(f"tool {f['name']}: parameter {key!r} is not a Python name, "
                                  "so LFM2's call syntax cannot pass it")
    missing = [k for k in required if k not in props]
    if missing:
        raise ConstraintError(f"tool {f['name']}: required parameter {missing[0]!r} is not among its properties")
    return g.fields([(_lit(f"{k}="), g.value(v), k in required) for k, v in props.items()])


def tool_call_grammar(tools: list, name: Optional[str] = None, opened: bool = False,
                      max_calls: int = MAX_CALLS) -> str:
    """A Lark grammar for one LFM2 tool-call block: ``name`` called once, or (None) one to
    ``max_calls`` calls of any of ``tools`` (OpenAI ``{"type": "function", "function": {...}}``
    or bare ``{"name", "parameters"}`` dicts). Arguments follow each tool's parameter schema.

    ``opened``: the reply already holds the block's opening (``forced_tool_opening``), as the
    server writes it at the end of the prompt; the grammar covers the rest.
    """
    if max_calls < 1:
        raise ConstraintError(f"max_calls is at least 1, not {max_calls}")
    functions = [_expect(t, dict, "a tool") for t in _expect(tools, list, "tools")]
    functions = [_expect(t.get("function", t), dict, "a tool's function") for t in functions]
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
        calls.append((_lit(f["name"] + "("), f'{_arguments(g, f)} ")"'))
        check_schema(f.get("parameters") or {}, f"tool {f['name']}: parameters")  # what the grammar did not read
    if name is not None:
        ((head, rest),) = calls[:1]
        body = rest if opened else f"{head} {rest}"
    else:
        call = "(" + " | ".join(g.rule(f"{head} {rest}") for head, rest in calls) + ")"
        body = call if max_calls == 1 else f'{call} (", " {call}){{0,{max_calls - 1}}}'
    start = f'start: {body} "]" {CALL_END}' if opened else f'start: {CALL_START} "[" {body} "]" {CALL_END}'
    return "\n".join([start, *g.rules, _PY_ANY])


def forced_tool_opening(name: Optional[str] = None) -> str:
    """The reply's first characters when a call is forced (of ``name``, or of any tool)."""
    return f"{CALL_START}[{name}(" if name is not None else f"{CALL_START}["
