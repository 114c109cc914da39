"""Conversations that keep their cache, so turn N prefills only turn N.

``PromptCache`` pairs a model cache with the exact prompt text it has consumed. A new
prompt that extends that text costs only its suffix; one that does not (a regenerated
reply, an edited or dropped message) rewinds the cache to the longest common prefix it
can reach (``cache.py``: anywhere in the last few tokens, or a checkpoint such as the end
of a prompt or of a turn) and prefills the rest. Matching on rendered text rather than
token ids keeps this exact even when a sampled reply is not tokenized the way its
re-rendered text would be.

``Chat`` copies the cache at each turn boundary (arrays are immutable, the copy is cheap):
a reply interrupted mid-step (Ctrl-C) restores that copy, and the partial reply is kept in
the transcript for the next turn to prefill. ``retry()`` and ``undo()`` edit the transcript;
the next prompt then rewinds instead of prefilling the conversation again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Optional

import mlx.core as mx

from ..model.cache import checkpoint, copy_cache, load_cache, reachable, rewind, save_cache
from .generation import GenerationResponse, default_sampling, stream_generate


class PromptCache:
    """A model cache, the token ids it has consumed, and the prompt text they spell."""

    def __init__(self, model, cache=None, text: str = "", tokens=(), draft_model=None, draft_cache=None):
        self.model, self.draft_model = model, draft_model
        self.cache = cache if cache is not None else model.make_cache()
        self.text, self.tokens = text, list(tokens)
        # A draft model's cache (speculative decoding) holds what ``cache`` holds.
        self.draft_cache = draft_cache
        if draft_model is not None and (draft_cache is None or draft_cache[0].offset != self.offset):
            self.draft_cache = draft_model.make_cache()
            if self.tokens:
                from .generation import prefill

                prefill(draft_model, mx.array(self.tokens, dtype=mx.uint32), self.draft_cache)

    @property
    def offset(self) -> int:
        return self.cache[0].offset if self.cache else 0

    def copy(self) -> "PromptCache":
        draft = copy_cache(self.draft_cache) if self.draft_cache is not None else None
        return PromptCache(self.model, copy_cache(self.cache), self.text, self.tokens, self.draft_model, draft)

    @property
    def _caches(self) -> list:
        return self.cache + (self.draft_cache or [])

    def reusable(self, tokenizer, prompt_text: str) -> int:
        """How many cached tokens ``prompt_text`` could reuse (what ``new_tokens`` keeps)."""
        if self.offset != len(self.tokens) or not self.tokens:
            return 0
        if prompt_text.startswith(self.text) and len(prompt_text) > len(self.text):
            return len(self.tokens)
        # The longest token prefix that spells a proper prefix of the prompt (binary search),
        # then the nearest offset below it that every layer can rewind to.
        def fits(p):
            return len(prompt_text) > len(tokenizer.decode(self.tokens[:p])) and \
                prompt_text.startswith(tokenizer.decode(self.tokens[:p]))

        lo, hi = 0, len(self.tokens)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        p = reachable(self._caches, lo)
        while p > 0 and not fits(p):  # a split multi-byte character: step back
            p = reachable(self._caches, p - 1)
        return p

    def new_tokens(self, tokenizer, prompt_text: str) -> list[int]:
        """Ids of the part of ``prompt_text`` not yet in the cache: the cache is extended,
        rewound to the longest common prefix it can reach, or reset."""
        keep = self.reusable(tokenizer, prompt_text)
        if keep == 0:
            self.cache, self.text, self.tokens = self.model.make_cache(), "", []
            if self.draft_model is not None:
                self.draft_cache = self.draft_model.make_cache()
        elif keep < len(self.tokens):
            rewind(self.cache, self.offset - keep)
            if self.draft_cache is not None:
                rewind(self.draft_cache, self.draft_cache[0].offset - keep)
            self.tokens = self.tokens[:keep]
            self.text = tokenizer.decode(self.tokens)
        return tokenizer.encode(prompt_text[len(self.text):], add_special_tokens=False)

    def commit(self, tokenizer, prompt_text: str, prompt_ids: list[int], generated: list[int]) -> None:
        """After generation: record what the cache consumed (the prompt, and most of the reply)."""
        fed = (list(prompt_ids) + list(generated))[: self.offset - len(self.tokens)]
        self.tokens += fed
        self.text = prompt_text + tokenizer.decode(fed[len(prompt_ids):])
        checkpoint(self._caches)  # the end of this turn: where a later edit can come back to


class Chat:
    """A multi-turn conversation: ``for r in chat.send("hi"): print(r.text, end="")``."""

    def __init__(self, model, tokenizer, system: Optional[str] = None, tools=None, draft_model=None,
                 num_draft_tokens: Optional[int] = None, prompt_lookup: bool = False, **sampling):
        self.model, self.tokenizer, self.tools = model, tokenizer, tools
        self.draft_model = draft_model
        self.speculative = dict(num_draft_tokens=num_draft_tokens, prompt_lookup=prompt_lookup)
        self.sampling = {**default_sampling(model), **sampling}
        self.system = system
        self.reset()

    def reset(self, system: Optional[str] = None) -> None:
        if system is not None:
            self.system = system
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.prompt_cache = PromptCache(self.model, draft_model=self.draft_model)
        self.last: Optional[GenerationResponse] = None

    def send(self, content, role: str = "user", **overrides) -> Iterator[GenerationResponse]:
        """Add a message (user, or tool result) and stream the assistant's reply."""
        self.messages.append({"role": role, "content": content})
        return self.reply(**overrides)

    def reply(self, **overrides) -> Iterator[GenerationResponse]:
        tok, pc = self.tokenizer, self.prompt_cache
        prompt = tok.apply_chat_template(self.messages, tools=self.tools, add_generation_prompt=True)
        snapshot = pc.copy()
        ids = pc.new_tokens(tok, prompt)
        reply, generated, finished = "", [], False
        try:
            spec = dict(self.speculative, draft_model=self.draft_model, draft_cache=pc.draft_cache)
            for r in stream_generate(self.model, tok, ids, cache=pc.cache, **spec,
                                     **{**self.sampling, **overrides}):
                reply += r.text
                if r.token is not None:
                    generated.append(r.token)
                if r.finish_reason:
                    finished, self.last = True, r
                yield r
        finally:
            self.messages.append({"role": "assistant", "content": reply})
            if finished:
                pc.commit(tok, prompt, ids, generated)
            else:  # interrupted inside a step: the cache may be half-updated
                self.prompt_cache = snapshot

    def retry(self, **overrides) -> Iterator[GenerationResponse]:
        """Regenerate the last reply (the cache rewinds to the end of its prompt)."""
        if not any(m["role"] == "user" for m in self.messages):
            raise ValueError("nothing to retry: no message yet")
        while self.messages[-1]["role"] != "user":  # the reply, and any tool round after it
            self.messages.pop()
        return self.reply(**overrides)

    def undo(self) -> list[dict]:
        """Drop the last exchange (the last user message and everything after it); returns it."""
        users = [i for i, m in enumerate(self.messages) if m["role"] == "user"]
        if not users:
            raise ValueError("nothing to undo: no message yet")
        dropped, self.messages = self.messages[users[-1]:], self.messages[: users[-1]]
        return dropped

    @property
    def cached_tokens(self) -> int:
        return self.prompt_cache.offset

    def save(self, path) -> None:
        """Transcript and cache in one safetensors file, written atomically."""
        path = Path(path)
        pc = self.prompt_cache
        meta = {"messages": json.dumps(self.messages, ensure_ascii=False), "text": pc.text,
                "tokens": json.dumps(pc.tokens),
                "system": self.system or "", "format": "mlx_lfm2.chat/1"}
        tmp = path.with_name(path.name + ".tmp.safetensors")
        save_cache(str(tmp), self.prompt_cache.cache, meta)
        os.replace(tmp, path)

    def load(self, path) -> None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no saved chat at {path}")
        try:
            cache, meta = load_cache(str(path))
        except Exception as e:
            raise ValueError(f"{path} is not a saved mlx_lfm2 chat: {e}") from e
        if meta.get("format") != "mlx_lfm2.chat/1":
            raise ValueError(f"{path} is not a saved mlx_lfm2 chat")
        kinds = [type(c) for c in self.model.make_cache()]
        if [type(c) for c in cache] != kinds:
            raise ValueError(f"{path} was saved from a model with a different layer layout")
        self.messages = json.loads(meta["messages"])
        self.system = meta.get("system") or None
        self.prompt_cache = PromptCache(self.model, cache, meta["text"], json.loads(meta["tokens"]),
                                        draft_model=self.draft_model)
