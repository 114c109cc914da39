"""Sampling settings (``SamplingParams``), samplers and logits processors.

``SamplingParams`` is how one request picks its tokens and when it stops, as one value
(vLLM's pattern): each front end (the OpenAI and Anthropic routes, the chat REPL, the
generate CLI) parses its own spelling into it once, and it travels unchanged to the engine,
into a batch row, and across ranks under ``mlx.launch`` (``to_json`` / ``from_json``).

A sampler maps log-probabilities ``[B, V]`` to tokens ``[B]``; a logits processor maps
``(history [T], logits [B, V])`` to new logits: pure functions of arrays, no text. Sampling
with a ``seed`` draws from its own key sequence, so a seeded run is reproducible whatever
else uses ``mx.random``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

import mlx.core as mx

from .validate import TokenIdError, check_logit_bias, check_number, check_seed

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling, limit, stop strings and output constraint.

    Values are checked where they are used (``sampler``, ``processors``, the constraint's
    compiler), so a bad one is a ``ValueError`` from the engine before the first token.
    ``temperature`` 0 (or None) is greedy; ``json_schema`` (a dict), ``regex`` or ``grammar``
    (llguidance Lark) constrain the reply (see ``text.constraints``).
    """

    max_tokens: int = 256
    temperature: Optional[float] = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: Optional[float] = None
    repetition_context_size: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: Optional[Mapping[int, float]] = None
    seed: Optional[int] = None
    stop: Union[str, Sequence[str], None] = ()  # kept as a tuple of non-empty strings
    json_schema: Optional[dict] = None
    regex: Optional[str] = None
    grammar: Optional[str] = None

    def __post_init__(self):
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        object.__setattr__(self, "stop", tuple(s for s in stop if s))
        object.__setattr__(self, "temperature", self.temperature or 0.0)

    def replace(self, **changes) -> "SamplingParams":
        """A copy with ``changes`` (any other keyword is a TypeError)."""
        return dataclasses.replace(self, **changes) if changes else self

    @property
    def greedy(self) -> bool:
        return not self.temperature

    @property
    def constraint(self) -> dict:
        """``make_constraint``'s keywords: the output constraint, if any."""
        return {k: v for k in ("json_schema", "regex", "grammar") if (v := getattr(self, k)) is not None}

    def sampler(self) -> Sampler:
        return make_sampler(self.temperature, self.top_p, self.top_k, self.min_p, self.seed)

    def distribution(self) -> Optional[Callable[[mx.array], mx.array]]:
        return make_distribution(self.temperature, self.top_p, self.top_k, self.min_p)

    def processors(self, prompt_tokens: int, vocab_size: Optional[int] = None) -> list[LogitsProcessor]:
        """The logits processors, for a prompt of ``prompt_tokens`` (the OpenAI penalties skip it)."""
        return make_logits_processors(self.repetition_penalty, self.repetition_context_size, self.logit_bias,
                                      self.frequency_penalty, self.presence_penalty, prompt_tokens=prompt_tokens,
                                      vocab_size=vocab_size)

    def to_json(self) -> dict:
        """A JSON-able form (``logit_bias`` as pairs: JSON keys are strings)."""
        out = dataclasses.asdict(self)
        out["logit_bias"] = [[int(k), float(v)] for k, v in self.logit_bias.items()] if self.logit_bias else None
        out["stop"] = list(self.stop)
        return out

    @classmethod
    def from_json(cls, data: dict) -> "SamplingParams":
        bias = data.get("logit_bias")
        return cls(**{**data, "logit_bias": {int(k): v for k, v in bias} if bias else None})


def _top_k(logprobs: mx.array, k: int) -> mx.array:
    if k <= 0 or k >= logprobs.shape[-1]:
        return logprobs
    kth = mx.partition(logprobs, kth=-k, axis=-1)[..., -k:].min(axis=-1, keepdims=True)
    return mx.where(logprobs < kth, -mx.inf, logprobs)


def _top_p(logprobs: mx.array, p: float) -> mx.array:
    if not 0 < p < 1:
        return logprobs
    order = mx.argsort(-logprobs, axis=-1)
    sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
    probs = mx.exp(sorted_lp)
    # Keep a token while the mass before it is < p (the top token always stays).
    before = mx.cumsum(probs, axis=-1) - probs
    kept = mx.where(before < p, sorted_lp, -mx.inf)
    inverse = mx.argsort(order, axis=-1)
    return mx.take_along_axis(kept, inverse, axis=-1)


def _min_p(logprobs: mx.array, min_p: float) -> mx.array:
    if min_p <= 0:
        return logprobs
    threshold = logprobs.max(axis=-1, keepdims=True) + mx.log(mx.array(min_p, logprobs.dtype))
    return mx.where(logprobs < threshold, -mx.inf, logprobs)


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 seed: Optional[int] = None) -> Sampler:
    """Greedy at temperature 0; otherwise filter (top_k, top_p, min_p) then sample."""
    check_number("temperature", temperature, 0)
    check_number("top_p", top_p, 0, 1)
    check_number("min_p", min_p, 0, 1)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0, got {top_k!r:.40}")
    seed = check_seed(seed) if seed is not None else None
    if temperature == 0:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)
    state = {"key": mx.random.key(seed) if seed is not None else None}

    def sample(logprobs: mx.array) -> mx.array:
        lp = _min_p(_top_p(_top_k(logprobs, top_k), top_p), min_p)
        key = None
        if state["key"] is not None:
            state["key"], key = mx.random.split(state["key"])
        return mx.random.categorical(lp * (1 / temperature), key=key)

    return sample


def make_distribution(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                      min_p: float = 0.0) -> Optional[Callable[[mx.array], mx.array]]:
    """The log-probabilities ``make_sampler`` draws from (same filters), for rules that need
    the distribution itself (speculative sampling); None when greedy."""
    if temperature <= 0:
        return None

    def dist(logprobs: mx.array) -> mx.array:
        lp = _min_p(_top_p(_top_k(logprobs, top_k), top_p), min_p) * (1 / temperature)
        return lp - mx.logsumexp(lp, axis=-1, keepdims=True)

    return dist


def repetition_penalty_processor(penalty: float, window: int = 64) -> LogitsProcessor:
    """Divide positive / multiply negative logits of tokens seen in the last ``window``."""
    if check_number("repetition_penalty", penalty) <= 0:
        raise ValueError("repetition_penalty must be > 0")

    def process(history: mx.array, logits: mx.array) -> mx.array:
        if history.size == 0:
            return logits
        recent = history[-window:]
        picked = logits[:, recent]
        picked = mx.where(picked > 0, picked / penalty, picked * penalty)
        logits[:, recent] = picked
        return logits

    return process


def logit_bias_processor(bias: dict[int, float], vocab_size: Optional[int] = None) -> LogitsProcessor:
    """Add ``bias[id]`` to each id's logit. Ids are checked here against ``vocab_size`` and,
    before each use, against the logits' width: an unchecked scatter writes out of bounds."""
    bias = check_logit_bias(bias, vocab_size)
    top = max(bias)
    ids = mx.array(list(bias.keys()))
    values = mx.array(list(bias.values()), dtype=mx.float32)

    def process(history: mx.array, logits: mx.array) -> mx.array:
        if top >= logits.shape[-1]:
            raise TokenIdError(f"logit_bias key {top} is out of range: the logits have "
                               f"{logits.shape[-1]} entries (ids 0..{logits.shape[-1] - 1})")
        logits[:, ids] = logits[:, ids] + values.astype(logits.dtype)
        return logits

    return process


def frequency_presence_processor(frequency: float, presence: float, skip: int) -> LogitsProcessor:
    """OpenAI's penalties: subtract ``count * frequency + (count > 0) * presence`` from each
    token's logit, counting the tokens generated so far (``history[skip:]``)."""

    def process(history: mx.array, logits: mx.array) -> mx.array:
        generated = history[skip:]
        if generated.size == 0:
            return logits
        counts = mx.zeros((logits.shape[-1],), logits.dtype).at[generated].add(1)
        return logits - (counts * frequency + (counts > 0) * presence)

    return process


def make_logits_processors(repetition_penalty: Optional[float] = None, repetition_context_size: int = 64,
                           logit_bias: Optional[dict[int, float]] = None, frequency_penalty: float = 0.0,
                           presence_penalty: float = 0.0, prompt_tokens: int = 0,
                           vocab_size: Optional[int] = None) -> list[LogitsProcessor]:
    """``prompt_tokens``: how much of the history is prompt, which the OpenAI penalties skip.
    ``vocab_size``: the model's rows, to refuse out-of-range ``logit_bias`` ids up front."""
    check_number("frequency_penalty", frequency_penalty)
    check_number("presence_penalty", presence_penalty)
    out = []
    if logit_bias:
        out.append(logit_bias_processor(logit_bias, vocab_size))
    if frequency_penalty or presence_penalty:
        out.append(frequency_presence_processor(frequency_penalty, presence_penalty, prompt_tokens))
    if repetition_penalty and repetition_penalty != 1.0:
        out.append(repetition_penalty_processor(repetition_penalty, repetition_context_size))
    return out
