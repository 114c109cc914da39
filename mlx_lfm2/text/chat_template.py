"""Chat templates rendered as transformers renders them, without transformers.

The checkpoint's own Jinja template runs in an immutable sandbox with what transformers
gives templates: ``tojson`` (``json.dumps`` semantics, no HTML escaping), ``raise_exception``,
``strftime_now``, ``{% generation %}`` blocks, loop controls, ``namespace`` and ``dict``.
Python functions given as tools become JSON schemas the way ``get_json_schema`` makes them.
Rendering is bounded in time and output size (``template_limits``).
"""

from __future__ import annotations

import inspect
import json
import re
import secrets
import types
import warnings
from datetime import datetime
from enum import Enum
from functools import lru_cache
from typing import Any, Callable, Literal, Union, get_args, get_origin, get_type_hints

import jinja2
import jinja2.ext

from .template_limits import BoundedSandbox, bounded_render, check_size

# Used when a checkpoint ships no template: the LFM2 format (ChatML with LFM2's tool tokens).
DEFAULT_TEMPLATE = """{{- bos_token -}}
{%- set ns = namespace(system="") -%}
{%- if messages and messages[0]["role"] == "system" -%}
{%- set ns.system = messages[0]["content"] -%}{%- set messages = messages[1:] -%}
{%- endif -%}
{%- if tools -%}
{%- set ns.system = ns.system + ("\\n" if ns.system else "") + "List of tools: <|tool_list_start|>[" -%}
{%- for tool in tools -%}{%- set ns.system = ns.system + (tool if tool is string else tool | tojson) + (", " if not loop.last else "") -%}{%- endfor -%}
{%- set ns.system = ns.system + "]<|tool_list_end|>" -%}
{%- endif -%}
{%- if ns.system -%}{{- "<|im_start|>system\\n" + ns.system + "<|im_end|>\\n" -}}{%- endif -%}
{%- for message in messages -%}
{%- set content = message["content"] if message["content"] is string else message["content"] | tojson -%}
{%- if message["role"] == "tool" -%}{%- set content = "<|tool_response_start|>" + content + "<|tool_response_end|>" -%}{%- endif -%}
{{- "<|im_start|>" + message["role"] + "\\n" + content + "<|im_end|>\\n" -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- "<|im_start|>assistant\\n" -}}{%- endif -%}"""


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body (masks are not needed here)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing underscore names (no reach into CPython internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        check_size(value)  # a string doubled in a loop stops here
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"templates cannot set {name!r} on a namespace")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=lambda fmt: datetime.now().strftime(fmt),
        namespace=_Namespace,
        dict=dict,
    )
    return env.from_string(source)


def _plain(value: Any) -> Any:
    """What a template may see: JSON-like data only (no objects with dangerous methods)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    for base, plain in ((str, str.__str__), (bool, bool), (int, int.__int__), (float, float.__float__)):
        if isinstance(value, base):  # subclasses (str enums, IntEnum) -> the plain value
            return plain(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _plain(value.item())
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def tool_schemas(tools) -> list | None:
    if tools is None:
        return None
    out = []
    for tool in tools:
        if isinstance(tool, dict):
            out.append(tool)
        elif inspect.isfunction(tool) or inspect.ismethod(tool):
            out.append(get_json_schema(tool))
        else:
            raise ValueError("a tool is a JSON-schema dict or a function with type hints and a docstring")
    return out


def render(source: str, messages: list, tools=None, documents=None, add_generation_prompt=False,
           **kwargs) -> str:
    if not messages:
        raise ValueError("cannot render an empty conversation: give at least one message")
    for m in messages:
        if not isinstance(m, dict):
            raise TypeError(f"chat messages are dicts with 'role' and 'content', got {m!r}")
    # As transformers does: a key set to None (OpenAI's content=None) is a missing key.
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    return bounded_render(
        compile_template(source), messages=_plain(messages), tools=_plain(tool_schemas(tools)),
        documents=_plain(documents), add_generation_prompt=add_generation_prompt, **_plain(kwargs),
    )


# ---- untrusted content -----------------------------------------------------------------

UNTRUSTED_ROLES = ("user", "tool")


def render_with_spans(source: str, messages: list, untrusted: Callable[[str], bool], **kwargs):
    """``(text, spans)``: ``render``'s text, and the ``(start, end)`` character spans where it
    holds the content of user and tool messages for which ``untrusted(content)`` is true.

    The template runs once more with that content replaced by unique markers; the markers'
    places in that rendering, laid over the real one, give the spans. A template that
    transforms content beyond JSON-escaping or trimming it cannot be laid over: then
    ``spans`` is None (with a warning) and the caller reads specials as transformers does.
    """
    text = render(source, messages, **kwargs)
    nonce, originals = secrets.token_hex(8), []

    def mark(value):  # every string in the content: text parts and JSON tool results too
        if isinstance(value, list):
            return [mark(v) for v in value]
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        if not isinstance(value, str) or not untrusted(value):
            return value
        originals.append(value)
        return f"MLXLFM2{nonce}X{len(originals) - 1}Y"

    marked = [dict(m, content=mark(m["content"])) if isinstance(m, dict) and m.get("role") in UNTRUSTED_ROLES
              and "content" in m else m for m in messages]
    if not originals:
        return text, []
    pieces = re.split(f"MLXLFM2{nonce}X(\\d+)Y", render(source, marked, **kwargs))
    spans, pos = [], 0
    for k in range(0, len(pieces) - 1, 2):
        literal, value = pieces[k], originals[int(pieces[k + 1])]
        if not text.startswith(literal, pos):
            break
        pos += len(literal)
        form = next((f for f in (value, json.dumps(value, ensure_ascii=False)[1:-1], value.strip()) if text.startswith(f, pos)), None)
        if form is None:
            break
        spans.append((pos, pos + len(form)))
        pos += len(form)
    else:
        if text[pos:] == pieces[-1]:
            return text, spans
    warnings.warn("this chat template transforms message content, so special tokens typed in user "
                  "or tool messages cannot be told from the template's: they stay special", stacklevel=3)
    return text, None


# ---- get_json_schema, as transformers.utils.get_json_schema behaves -----------------------

class ToolSchemaError(ValueError):
    """A function that cannot be described to the model as a tool."""


_SCALARS = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}
_BASIC = {**{t: {"type": n} for t, n in _SCALARS.items()}, list: {"type": "array"},
          tuple: {"type": "array"}, dict: {"type": "object"}, Any: {}}
_description_re = re.compile(r"^(.*?)[\n\s]*(Args:|Returns:|Raises:|\Z)", re.DOTALL)
_args_re = re.compile(r"\n\s*Args:\n(.*?)[\n\s]*(Returns:|Raises:|\Z)", re.DOTALL)
_arg_split_re = re.compile(r"(?:^|\n)([ \t]*)(\w+):\s*(.*?)\s*(?=\n(?!\1[ \t])[ \t]*\w+:|\Z)", re.DOTALL)
_returns_re = re.compile(r"\n\s*Returns:\n\s*(.*?)[\n\s]*(Raises:|\Z)", re.DOTALL)


def _enum(values: list) -> dict:
    kinds = list(dict.fromkeys(_SCALARS[type(v)] for v in values))
    return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": values}


def _hint(hint) -> dict:
    origin, args = get_origin(hint), get_args(hint)
    if origin is None and isinstance(hint, type) and issubclass(hint, Enum):
        return _enum([m.value for m in hint])
    if origin is None:
        if hint not in _BASIC:
            raise ToolSchemaError(f"cannot describe type hint {hint!r} in JSON schema")
        return dict(_BASIC[hint])
    if origin is Union or origin is types.UnionType:
        subs = [_hint(t) for t in args if t is not type(None)]
        if len(subs) == 1:
            out = subs[0]
        elif all(s.keys() == {"type"} and isinstance(s["type"], str) for s in subs):
            names = sorted({s["type"] for s in subs})
            out = {"type": names[0] if len(names) == 1 else names}
        else:
            out = {"anyOf": subs}
        if type(None) in args:
            out["nullable"] = True
        return out
    if origin is Literal and args:
        return _enum(list(args))
    if origin is list:
        return {"type": "array", "items": _hint(args[0])} if args else {"type": "array"}
    if origin is tuple:
        if len(args) == 1 or ... in args:
            raise ToolSchemaError(f"tuple hint {hint} is not supported: use list[...]")
        return {"type": "array", "prefixItems": [_hint(t) for t in args]} if args else {"type": "array"}
    if origin is dict:
        return {"type": "object", "additionalProperties": _hint(args[1])} if len(args) == 2 else {"type": "object"}
    raise ToolSchemaError(f"cannot describe type hint {hint!r} in JSON schema")


def get_json_schema(func: Callable) -> dict:
    """The OpenAI-style tool schema of a function with type hints and a Google docstring."""
    name = getattr(func, "__name__", "operation")
    doc = inspect.getdoc(func)
    if not doc:
        raise ToolSchemaError(f"{name} has no docstring to describe it to the model")
    doc = doc.strip()
    m = _description_re.search(doc)
    description = m.group(1).strip() if m else None
    m = _args_re.search(doc)
    arg_docs = {}
    if m:
        block = "\n".join(line for line in m.group(1).split("\n") if line.strip())
        arg_docs = {a: re.sub(r"\s*\n+\s*", " ", d.strip()) for _, a, d in _arg_split_re.findall(block)}
    m = _returns_re.search(doc)
    returns = m.group(1).strip() if m else None

    hints, sig = get_type_hints(func), inspect.signature(func)
    first = next(iter(sig.parameters), None)
    implicit = first if first in {"self", "cls"} and sig.parameters[first].annotation is inspect.Parameter.empty else None
    required = []
    for pname, p in sig.parameters.items():
        if pname == implicit:
            continue
        if p.annotation is inspect.Parameter.empty:
            raise ToolSchemaError(f"argument {pname} of {name} has no type hint")
        if p.default is inspect.Parameter.empty:
            required.append(pname)
    props, ret = {}, None
    for pname, hint in hints.items():
        if pname == implicit:
            continue
        if pname == "return":
            try:
                ret = _hint(hint)
            except ToolSchemaError:
                pass
            continue
        props[pname] = _hint(hint)
    for pname, schema in props.items():
        if pname not in arg_docs:
            raise ToolSchemaError(f"the docstring of {name} does not describe argument {pname!r}")
        desc = arg_docs[pname]
        choices = re.search(r"\(choices:\s*(.*?)\)\s*$", desc, flags=re.IGNORECASE)
        if choices:
            schema["enum"] = [c.strip() if isinstance(c, str) else c for c in json.loads(choices.group(1))]
            desc = choices.string[: choices.start()].strip()
        schema["description"] = desc
    params = {"type": "object", "properties": props}
    if required:
        params["required"] = required
    out = {"name": name, "description": description, "parameters": params}
    if ret is not None:
        if returns is not None:
            ret["description"] = returns
        out["return"] = ret
    return {"type": "function", "function": out}


QUERY = "<query>"  # mlx-lm's marker for where the user's text goes (its prompt caches)


def split_template(tokenizer, messages: list, add_generation_prompt: bool) -> tuple[str, str]:
    """The rendered chat with its last message's content as ``QUERY``: (text before, text after)."""
    text = str(tokenizer.apply_chat_template(messages[:-1] + [{**messages[-1], "content": QUERY}],
                                             add_generation_prompt=add_generation_prompt))
    i = text.index(QUERY)
    return text[:i], text[i + len(QUERY):]
