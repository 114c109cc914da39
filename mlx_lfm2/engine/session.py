"""Conversations that keep their cache, so turn N prefills only turn N.

``PromptCache`` pairs a model cache with the exact prompt text it has consumed. A new
prompt that extends that text costs only its suffix; one that does not (an edited
history) starts over. Matching on rendered text rather than token ids keeps this exact
even when a sampled reply is not tokenized the way its re-rendered text would be.

The conv state cannot be rewound, so ``Chat`` copies the cache at each turn boundary
(arrays are immutable, the copy is cheap): a reply interrupted mid-step (Ctrl-C) restores
that copy, and the partial reply is kept in the transcript for the next turn to prefill.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Optional

from ..model.cache import copy_cache, load_cache, save_cache
from .generation import GenerationResponse, default_sampling, stream_generate


class PromptCache:
    """A model cache, the token ids it has consumed, and the prompt text they spell."""

    def __init__(self, model, cache=None, text: str = "", tokens=()):
        self.model = model
        self.cache = cache if cache is not None else model.make_cache()
        self.text, self.tokens = text, list(tokens)

    @property
    def offset(self) -> int:
        return self.cache[0].offset if self.cache else 0

    def copy(self) -> "PromptCache":
        return PromptCache(self.model, copy_cache(self.cache), self.text, self.tokens)

    def new_tokens(self, tokenizer, prompt_text: str) -> list[int]:
        """Ids of the part of ``prompt_text`` not yet in the cache (resets it if not a prefix)."""
        if not prompt_text.startswith(self.text) or self.offset != len(self.tokens):
            self.cache, self.text, self.tokens = self.model.make_cache(), "", []
        return tokenizer.encode(prompt_text[len(self.text):], add_special_tokens=False)

    def commit(self, tokenizer, prompt_text: str, prompt_ids: list[int], generated: list[int]) -> None:
        """After generation: record what the cache consumed (the prompt, and most of the reply)."""
        fed = (list(prompt_ids) + list(generated))[: self.offset - len(self.tokens)]
        self.tokens += fed
        self.text = prompt_text + tokenizer.decode(fed[len(prompt_ids):])


class Chat:
    """A multi-turn conversation: ``for r in chat.send("hi"): print(r.text, end="")``."""

    def __init__(self, model, tokenizer, system: Optional[str] = None, tools=None, **sampling):
        self.model, self.tokenizer, self.tools = model, tokenizer, tools
        self.sampling = {**default_sampling(model), **sampling}
        self.system = system
        self.reset()

    def reset(self, system: Optional[str] = None) -> None:
        if system is not None:
            self.system = system
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.prompt_cache = PromptCache(self.model)
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
            for r in stream_generate(self.model, tok, ids, cache=pc.cache, **{**self.sampling, **overrides}):
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
        self.prompt_cache = PromptCache(self.model, cache, meta["text"], json.loads(meta["tokens"]))
