"""Memory: what a request will need at its peak, predicted from the model's config alone, and
the budget the server admits requests against.

Only the part a request adds is predicted (its KV cache, conv state, prefill activations and
logits); the weights are counted once, from the loaded arrays (``serve.metrics.model_bytes``).
"""

from __future__ import annotations

from typing import Optional

from .disk_cache import parse_bytes


def default_budget() -> int:
    """Bytes the server may use: the same memory probe the first run sizes the model by
    (``weights.provision.machine``: the GPU's recommended working set, else system memory)."""
    from ..weights.provision import GB, machine

    return int(machine().working_set_gb * GB)


def budget_bytes(text: Optional[str]) -> int:
    """``--memory-budget``: ``"24G"``, ``"512M"``, a number of bytes, or None for
    ``default_budget()``."""
    if text is None:
        return default_budget()
    return parse_bytes(text)
