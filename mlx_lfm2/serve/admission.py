"""Admission by predicted memory: a request joins the batch only when the batch's predicted
peak with it fits.

The budget (``--memory-budget``, default ``engine.memory.default_budget``) covers the weights
of every loaded model (``metrics.model_bytes``, counted once), what the running requests will
take at their peak (``engine.memory.batch_peak``: their prompts' and replies' KV, each row at
the longest row's length as the batched cache pads it, conv state, prefill activations,
logits), and the prompt caches the models keep (``PromptCacheStore.nbytes``). So:

* a request that cannot fit even alone (its peak over the budget less the weights) is a 400
  at ``Service.prepare``, before anything streams, naming the numbers and what to change;
* one that fits alone but not beside the running rows waits at the head of the queue until
  enough of them finish. Order is kept: the requests behind it wait too, so a large request
  is never starved by a stream of small ones (first come, first served, as Ollama queues);
* kept prompt caches give way: when a request is admitted, the least recently used entries
  (this model's first, then the other loaded models') are dropped until the caches fit in
  what the weights and the batch leave (their prefixes stay in the disk tier);
* an empty batch always admits the head, so the queue never stalls.

The prediction counts every prompt token, cached ones included: the batch holds their KV.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

from ..engine.memory import Row, Shapes, batch_peak
from .boundary import APIError
from .metrics import model_bytes

MB = 2**20


class Admission:
    """The budget of one model's scheduler, and the predicted bytes of its batch."""

    def __init__(self, model, budget: int, max_context: Optional[int] = None, store=None):
        self.model, self.budget = model, budget
        self.shapes = Shapes.of(model)
        self.weights = model_bytes(model)
        self.max_context = max_context or model.args.max_position_embeddings
        self.store = store  # this model's prompt caches (engine.prompt_cache.PromptCacheStore), or None
        self.others: Callable[[], int] = lambda: 0  # the weights of the other loaded models (``models``)
        self.other_stores: Callable[[], list] = lambda: []  # their prompt caches, least recently used first

    @property
    def available(self) -> int:
        """Bytes for requests and prompt caches: the budget less the weights (this model's and
        the other loaded ones')."""
        return self.budget - self.weights - self.others()

    def row(self, prompt_tokens: int, max_tokens: int) -> Row:
        """A request as the batch will hold it (its reply never longer than the context allows)."""
        return Row(prompt_tokens, max(0, min(max_tokens, self.max_context - prompt_tokens)))

    def bytes(self, prompt_tokens: int, max_tokens: int) -> int:
        """One request's predicted peak, alone."""
        return self.batch([self.row(prompt_tokens, max_tokens)])

    def batch(self, rows: list) -> int:
        """The predicted peak of a batch of ``rows`` (``engine.memory.Row``)."""
        return batch_peak(self.model.args, rows, self.shapes)

    def check(self, prompt_tokens: int, max_tokens: int) -> Row:
        """The request's row, or a 400 when it cannot fit even alone (with no prompt cache kept)."""
        row = self.row(prompt_tokens, max_tokens)
        need = self.batch([row])
        if need > self.available:
            raise APIError(
                400, f"this request needs about {need / MB:.0f} MB of memory at its peak ({prompt_tokens} prompt "
                f"tokens + max_tokens {max_tokens}), but {max(0, self.available) / MB:.0f} MB are available "
                f"(memory budget {self.budget / MB:.0f} MB less {(self.weights + self.others()) / MB:.0f} MB of weights): lower "
                "max_tokens, shorten the prompt, or start the server with a larger --memory-budget",
                param="max_tokens", code="memory_exceeded")
        return row

    def fits(self, row: Row, running: list) -> bool:
        """Whether ``row`` fits beside the ``running`` rows, prompt caches giving way. A
        question: nothing is dropped (``admit`` drops)."""
        return self.batch([*running, row]) <= self.available

    def admit(self, row: Row, running: list) -> None:
        """``row`` joins the ``running`` rows: prompt caches beyond what the batch leaves are
        dropped (module docstring)."""
        self.make_room(self.available - self.batch([*running, row]))

    def stores(self) -> list:
        return ([self.store] if self.store is not None else []) + list(self.other_stores())

    def cached(self) -> int:
        """Bytes of the prompt caches the loaded models keep."""
        return sum(s.nbytes for s in self.stores())

    def make_room(self, room: int) -> None:
        """Drop prompt caches, least recently used first (this model's first), until all of
        them fit in ``room`` bytes."""
        for store in self.stores():
            over = self.cached() - max(0, room)
            if over <= 0:
                return
            store.shrink(store.nbytes - over)

    def waits(self, row: Optional[Row], live: dict) -> bool:
        """Whether ``row`` waits for memory beside the batch's ``live`` rows (uid -> the
        scheduler's row); if not, it is admitted (``admit``). An empty batch admits any request."""
        if row is None:
            return False
        running = rows_of(live)
        if live and not self.fits(row, running):
            return True
        self.admit(row, running)
        return False

    def reserved(self, live: dict) -> int:
        """The predicted peak of the batch's ``live`` rows."""
        return self.batch(rows_of(live))

    def status(self, running: int, waiting: bool) -> dict:
        """For ``/health``: the budget, the weights, what the running rows reserve, the prompt
        caches kept, what is free."""
        cached = self.cached()
        return {"budget_mb": round(self.budget / MB, 1), "weights_mb": round((self.weights + self.others()) / MB, 1),
                "reserved_mb": round(running / MB, 1), "prompt_caches_mb": round(cached / MB, 1),
                "free_mb": round((self.available - running - cached) / MB, 1), "waiting_for_memory": int(waiting)}


def rows_of(live: dict) -> list:
    """A batch's requests (uid -> the scheduler's row, holding its job and what it generated)
    as ``Row``s; read from any thread (``copy()`` is atomic while the worker changes it)."""
    return [replace(r.job.memory, decoding=bool(r.generated)) for r in live.copy().values() if r.job.memory is not None]
