"""Admission by predicted memory: a request joins the batch only when its predicted peak fits.

The budget (``--memory-budget``, default ``engine.memory.default_budget``) covers the weights
(``metrics.model_bytes``, counted once) and every running request's predicted peak
(``engine.memory.predict``: its prompt's and reply's KV, conv state, prefill activations,
logits). So:

* a request that cannot fit even alone (its peak over the budget less the weights) is a 400
  at ``Service.prepare``, before anything streams, naming the numbers and what to change;
* one that fits alone but not beside the running rows waits at the head of the queue until
  enough of them finish. Order is kept: the requests behind it wait too, so a large request
  is never starved by a stream of small ones (first come, first served, as Ollama queues);
* an empty batch always admits the head, so the queue never stalls.

The prediction counts every prompt token, cached ones included: the batch holds their KV.
"""

from __future__ import annotations

from typing import Callable, Optional

from ..engine.memory import Shapes, predict
from .boundary import APIError
from .metrics import model_bytes

MB = 2**20


class Admission:
    """The budget of one model's scheduler, and the predicted bytes of a request."""

    def __init__(self, model, budget: int, max_context: Optional[int] = None):
        self.model, self.budget = model, budget
        self.shapes = Shapes.of(model)
        self.weights = model_bytes(model)
        self.max_context = max_context or model.args.max_position_embeddings
        self.others: Callable[[], int] = lambda: 0  # the weights of the other loaded models (``models``)

    @property
    def available(self) -> int:
        """Bytes for requests: the budget less the weights (this model's and the other loaded ones')."""
        return self.budget - self.weights - self.others()

    def bytes(self, prompt_tokens: int, max_tokens: int) -> int:
        """One request's predicted peak (its reply is never longer than the context allows)."""
        max_tokens = max(0, min(max_tokens, self.max_context - prompt_tokens))
        return predict(self.model.args, prompt_tokens, max_tokens, self.shapes)

    def check(self, prompt_tokens: int, max_tokens: int) -> int:
        """The request's predicted bytes, or a 400 when it cannot fit even alone."""
        need = self.bytes(prompt_tokens, max_tokens)
        if need > self.available:
            raise APIError(
                400, f"this request needs about {need / MB:.0f} MB of memory at its peak ({prompt_tokens} prompt "
                f"tokens + max_tokens {max_tokens}), but {max(0, self.available) / MB:.0f} MB are available "
                f"(memory budget {self.budget / MB:.0f} MB less {(self.weights + self.others()) / MB:.0f} MB of weights): lower "
                "max_tokens, shorten the prompt, or start the server with a larger --memory-budget",
                param="max_tokens", code="memory_exceeded")
        return need

    def fits(self, need: int, running: int) -> bool:
        """Whether a request of ``need`` bytes fits beside rows that reserve ``running``."""
        return need <= self.available - running

    def waits(self, need: int, rows: dict) -> bool:
        """Whether a request of ``need`` bytes waits for memory beside the batch's ``rows``
        (uid -> the scheduler's row, holding its job). An empty batch admits any request."""
        return bool(rows) and not self.fits(need, reserved(rows))

    def status(self, running: int, waiting: bool) -> dict:
        """For ``/health``: the budget, the weights, what the running rows reserve, what is free."""
        return {"budget_mb": round(self.budget / MB, 1), "weights_mb": round((self.weights + self.others()) / MB, 1),
                "reserved_mb": round(running / MB, 1), "free_mb": round((self.available - running) / MB, 1),
                "waiting_for_memory": int(waiting)}


def reserved(rows: dict) -> int:
    """The predicted bytes that a batch's rows reserve (read from any thread)."""
    return sum(row.job.memory for row in rows.copy().values())  # copy(): atomic while the worker changes it
