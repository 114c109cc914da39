"""Front ends under ``mlx.launch``: rank 0 meets the user, every rank runs the same code.

With a pipelined model (``model.pipeline``) every rank runs the whole front end, so caches,
prompt reuse and stopping stay in step without a protocol of their own. What differs between
ranks is only what comes from outside: a line typed at rank 0's terminal, an HTTP request
reaching rank 0, a tool rank 0 runs. ``from_leader`` runs such a call on rank 0 and hands its
result to every rank; ``leader`` says which rank prints. Outside the launcher both are no-ops.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

import mlx.core as mx

from ..model.pipeline import launched

_group: Optional[Any] = None
_checked = False


def group():
    """The launcher's group when there is more than one process, else None."""
    global _group, _checked
    if not _checked:
        _group, _checked = (mx.distributed.init() if launched() else None), True
    return _group


def rank() -> int:
    g = group()
    return g.rank() if g is not None else 0


def leader() -> bool:
    """True on rank 0, the rank that prints the reply and talks to users (and when not launched)."""
    return rank() == 0


def broadcast(obj: Any = None) -> Any:
    """Rank 0's JSON-able ``obj`` on every rank (the others' argument is ignored). Blocking."""
    g = group()
    if g is None:
        return obj
    data = json.dumps(obj).encode() if g.rank() == 0 else b""
    n = mx.distributed.all_sum(mx.array([len(data)], mx.int32), group=g, stream=mx.cpu).item()
    buf = mx.array(list(data), mx.uint8) if g.rank() == 0 else mx.zeros((n,), mx.uint8)
    buf = mx.distributed.all_sum(buf, group=g, stream=mx.cpu)
    return json.loads(bytes(memoryview(buf)).decode())


# Exceptions a leader's call may end with that the other ranks must replay to stay in step.
_REPLAYED = {"EOFError": EOFError, "KeyboardInterrupt": KeyboardInterrupt}


def from_leader(fn: Callable, *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` run on rank 0 only; its result (JSON-able), or its EOFError or
    KeyboardInterrupt, on every rank. Use it for input: ``line = from_leader(input, ">>> ")``."""
    if group() is None:
        return fn(*args, **kwargs)
    if leader():
        try:
            out = {"value": fn(*args, **kwargs)}
        except tuple(_REPLAYED.values()) as e:
            broadcast({"raise": type(e).__name__})
            raise
        except Exception as e:
            broadcast({"raise": "RuntimeError", "message": f"rank 0 failed: {type(e).__name__}: {e}"})
            raise
        return broadcast(out)["value"]
    out = broadcast()
    if "raise" in out:
        raise _REPLAYED.get(out["raise"], RuntimeError)(out.get("message", ""))
    return out["value"]
