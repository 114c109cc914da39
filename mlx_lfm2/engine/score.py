"""Scoring a prompt: the model's own log-probability of each of its tokens given those before.

What eval harnesses ask for (``/v1/completions`` with ``echo`` and ``logprobs``): one forward
over the prompt, in chunks through a fresh cache so memory stays at a chunk's logits
``[C, V]``, and for each position ``i >= 1`` the log-softmax of the logits at ``i - 1``
(no penalties, no temperature). Token ids only; the server turns them into text.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

SCORE_CHUNK = 512  # positions per forward: [C, V] float32 logits, 128 MiB at C=512 for 65k tokens


@dataclass
class TokenScore:
    logprob: float  # log p(token | the tokens before)
    top: list[tuple[int, float]]  # the ``top`` likeliest tokens at this position, likeliest first


def score_prompt(model, ids: list[int], top: int = 0, chunk: int = SCORE_CHUNK) -> list[TokenScore]:
    """Scores of ``ids[1:]`` (the first token has no context: a caller reports it as null)."""
    if len(ids) < 2:
        return []
    cache = model.make_cache()
    out: list[TokenScore] = []
    for start in range(0, len(ids) - 1, chunk):
        window = ids[start: start + chunk]
        logits = model(mx.array(window)[None], cache=cache)[0].astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # [C, V]
        targets = mx.array(ids[start + 1: start + 1 + len(window)])
        logprobs = logprobs[: targets.size]
        chosen = mx.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]
        if top:
            best = mx.argpartition(-logprobs, kth=top - 1, axis=-1)[:, :top]
            best_lp = mx.take_along_axis(logprobs, best, axis=-1)
            order = mx.argsort(-best_lp, axis=-1)
            best, best_lp = mx.take_along_axis(best, order, axis=-1), mx.take_along_axis(best_lp, order, axis=-1)
            mx.eval(chosen, best, best_lp)
            tops = [list(zip(b, v)) for b, v in zip(best.tolist(), best_lp.tolist())]
        else:
            mx.eval(chosen)
            tops = [[] for _ in range(targets.size)]
        out.extend(TokenScore(lp, t) for lp, t in zip(chosen.tolist(), tops))
    return out
