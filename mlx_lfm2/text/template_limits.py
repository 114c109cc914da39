"""Bounds on rendering a chat template: output size and time.

A checkpoint's template is code: it can loop (``range`` nested a few deep) or build a huge
string (``"x" * 10**9``, a namespace string doubled in a loop). ``BoundedSandbox`` refuses,
before computing them, the operations that would make a string or list past
``MAX_RENDER_CHARS`` (``*`` and ``+``, a call with a count past it, a namespace value past
it); ``bounded_render`` stops the output at that size and the rendering at
``RENDER_TIMEOUT`` seconds. Each raises ``TemplateLimitError`` (a ``TemplateError``), which
the server answers with a 400 and the chat REPL prints.

The time limit raises in the rendering thread itself (``PyThreadState_SetAsyncExc``): the
template's Python code stops at its next bytecode; nothing is left running.
"""

from __future__ import annotations

import ctypes
import threading
import time
from contextlib import contextmanager

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_RENDER_CHARS = 16 << 20  # a prompt this long is far past any context; a 4 MiB body renders well below
RENDER_TIMEOUT = 10.0  # seconds


class TemplateLimitError(jinja2.exceptions.TemplateError):
    pass


class _Timeout(BaseException):  # BaseException: no ``except Exception`` in a template's path swallows it
    pass


def _too_big(n: int) -> TemplateLimitError:
    return TemplateLimitError(f"the chat template would build {n} characters or items, over the "
                              f"limit of {MAX_RENDER_CHARS}")


def check_size(value) -> None:
    if isinstance(value, (str, list, tuple)) and len(value) > MAX_RENDER_CHARS:
        raise _too_big(len(value))


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, refusing to build anything past ``MAX_RENDER_CHARS``."""

    intercepted_binops = frozenset({"*", "+"})

    def call_binop(self, context, operator, left, right):
        seqs = (str, list, tuple)
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, seqs) and isinstance(n, int) and len(seq) * n > MAX_RENDER_CHARS:
                    raise _too_big(len(seq) * n)
        elif isinstance(left, seqs) and isinstance(right, seqs) and len(left) + len(right) > MAX_RENDER_CHARS:
            raise _too_big(len(left) + len(right))
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and a > MAX_RENDER_CHARS:  # "x".ljust(10**9)
                raise _too_big(a)
        return super().call(__context, __obj, *args, **kwargs)


@contextmanager
def _deadline(seconds: float):
    """Raise ``_Timeout`` in this thread if the block runs past ``seconds``."""
    tid, lock, state = threading.get_ident(), threading.Lock(), {"on": True, "fired": False}

    def fire():
        with lock:
            if state["on"]:
                state["fired"] = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(_Timeout))

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        with lock:
            state["on"] = False
            if state["fired"]:  # raised already, or still pending: then it must not fire later
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), None)
        timer.cancel()


def bounded_render(template: jinja2.Template, **context) -> str:
    """``template.render(**context)``, within ``RENDER_TIMEOUT`` s and ``MAX_RENDER_CHARS``."""
    parts, n, tic = [], 0, time.monotonic()
    try:
        with _deadline(RENDER_TIMEOUT):
            for part in template.generate(**context):
                n += len(part)
                if n > MAX_RENDER_CHARS:
                    raise _too_big(n)
                parts.append(part)
    except _Timeout:
        raise TemplateLimitError(f"the chat template ran past the limit of {RENDER_TIMEOUT:g} s "
                                 f"(stopped after {time.monotonic() - tic:.1f} s, {n} characters out)") from None
    return "".join(parts)
