"""The one request builder: the only place ids, the context and constraints are checked.

``build_request`` turns prompt ids and a ``SamplingParams`` into a ``Request`` that
``stream_generate``, ``BatchGenerator`` and the speculative loop run as it is: ids in range
(MLX does not bounds-check gathers), the prompt plus what the cache holds within the context
(the limit clamped to what is left), the stop ids, the sampler and logits processors, and the
constraint (compiled here, or handed in already compiled by a front end that checked it
early) last among the processors, since it masks what the others produced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from ..text.constraints import Constraint, make_constraint
from .decode import Picker
from .sample import SamplingParams
from .validate import check_token_ids, vocab_rows


class PromptTooLongError(ValueError):
    """The prompt (plus what the cache already holds) exceeds the model's context."""


def context_length(model) -> int:
    return model.args.max_position_embeddings


def check_context(model, n_prompt: int, held: int = 0, context: Optional[int] = None) -> int:
    """How many tokens may follow ``n_prompt`` new prompt tokens after ``held`` cached ones,
    or ``PromptTooLongError`` when not even one may. ``context``: a limit below the model's."""
    limit = min(context or context_length(model), context_length(model))
    if held + n_prompt + 1 > limit:
        raise PromptTooLongError(
            f"prompt of {n_prompt} tokens (+{held} cached) does not fit the model's context of "
            f"{limit} tokens: shorten it or start a new conversation")
    return limit - held - n_prompt


def sampling_for(prompt_tokens: int, params: Optional[SamplingParams] = None, vocab_size: Optional[int] = None,
                 **settings) -> dict:
    """``params`` (or ``SamplingParams(**settings)``) as ``BatchGenerator.insert``'s keywords:
    the sampler (None when greedy: a batch's fast path; its settings are checked either way)
    and the logits processors, for a prompt of ``prompt_tokens``."""
    params = (params or SamplingParams()).replace(**settings)
    sampler = params.sampler()
    return {"sampler": None if params.greedy else sampler,
            "logits_processors": params.processors(prompt_tokens, vocab_size)}


@dataclass
class Request:
    """One generation, checked: what the token loops take."""

    ids: list[int]  # the prompt ids still to feed (after what the cache holds)
    params: SamplingParams
    max_tokens: int  # params.max_tokens clamped to the context
    stop_tokens: frozenset
    sampler: Optional[object]  # None: greedy
    processors: list  # the constraint, if any, last
    constraint: Optional[Constraint] = None

    def picker(self, history=None) -> Picker:
        """A fresh picker over ``history`` (the prompt ids as an array; needed with processors)."""
        return Picker(self.sampler, list(self.processors), history)


def build_request(model, tokenizer, ids: Sequence[int], params: SamplingParams, held: int = 0,
                  context: Optional[int] = None, constraint: Optional[Constraint] = None) -> Request:
    """``ids`` after ``held`` cached tokens, generated as ``params`` says (see the module
    docstring). ``constraint``: ``params``' constraint already compiled (it is used as is)."""
    rows = vocab_rows(model)
    ids = check_token_ids(ids, rows, "prompt token id")
    room = check_context(model, len(ids), held, context)
    stop_tokens = frozenset(check_token_ids(tokenizer.eos_token_ids, rows, "stop token id"))
    picking = sampling_for(len(ids), params, rows)
    processors = picking["logits_processors"]
    max_tokens = max(0, min(params.max_tokens, room))
    if constraint is None:
        constraint = make_constraint(tokenizer, **params.constraint, prompt_tokens=len(ids), max_tokens=max_tokens)
    else:  # compiled before the prompt's ids and the reply's budget were known
        constraint.prompt_tokens, constraint.max_tokens = len(ids), max_tokens
    if constraint is not None:
        processors.append(constraint)
    return Request(ids, params, max_tokens, stop_tokens, picking["sampler"], processors, constraint)
