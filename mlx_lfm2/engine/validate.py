"""Token ids from outside, checked before they reach the model.

MLX does not bounds-check gathers and scatters: an embedding lookup or a ``logits[:, ids]``
update with an id past the last row reads or writes outside the array (garbage, or a
segfault). Every id that comes from a caller (prompt ids, ``logit_bias`` keys, stop ids)
goes through ``check_token_ids`` against the model's embedding rows first.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional


class TokenIdError(ValueError):
    """A token id that is not an integer in ``[0, vocab_size)``."""


def vocab_rows(model) -> int:
    """Rows of the model's embedding (and of its logits): the exclusive bound of a valid id."""
    return int(model.args.vocab_size)


def check_token_ids(ids: Iterable, vocab_size: int, what: str = "token id") -> list[int]:
    """``ids`` as a list of ints, or ``TokenIdError`` naming the first bad one and the valid range."""
    ids = list(ids)
    if all(type(i) is int for i in ids) and (not ids or (min(ids) >= 0 and max(ids) < vocab_size)):
        return ids  # the common case, checked in bulk
    out = []
    for i in ids:
        # bool is an int subclass and numpy ints are not: accept integers only, by value.
        if isinstance(i, bool) or not hasattr(i, "__index__"):
            raise TokenIdError(f"{what} {i!r} is not an integer (valid ids: 0..{vocab_size - 1})")
        i = i.__index__()
        if not 0 <= i < vocab_size:
            raise TokenIdError(f"{what} {i} is out of range: this model's ids are 0..{vocab_size - 1}")
        out.append(i)
    return out


def check_logit_bias(bias: dict, vocab_size: Optional[int]) -> dict[int, float]:
    """``{id: finite float}``; ids checked against ``vocab_size`` when it is known."""
    ids = check_token_ids(list(bias), vocab_size if vocab_size is not None else 1 << 62, "logit_bias key")
    values = []
    for k, v in zip(ids, bias.values()):
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias[{k}] = {v!r} is not a number") from None
        if not math.isfinite(v):
            raise ValueError(f"logit_bias[{k}] = {v} is not finite")
        values.append(v)
    return dict(zip(ids, values))


def check_number(name: str, value, low: float = -math.inf, high: float = math.inf) -> float:
    """A finite real number in ``[low, high]`` (NaN and infinities are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r:.40}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not hasattr(seed, "__index__") or not 0 <= seed.__index__() < 1 << 64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r:.40}")
    return seed.__index__()
