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

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Optional

from ..model.cache import copy_cache, load_cache, save_cache
from ..text.tokenizer import RenderedPrompt, plain_spans
from .generation import GenerationResponse, default_sampling, stream_generate

FORMAT = "mlx_lfm2.chat/2"  # /2 records the model's identity


def model_identity(model) -> dict:
    """What a saved cache depends on: the architecture, and a hash of the whole config
    (quantization aside: a 4-bit and a bf16 copy of one checkpoint share conversations)."""
    args = model.args
    config = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(vars(args))
    config = {k: v for k, v in config.items() if k not in ("quantization", "extra")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"layer_types": config.get("layer_types"), "hidden_size": config.get("hidden_size"),
            "vocab_size": config.get("vocab_size"), "num_experts": config.get("num_experts"),
            "config_hash": digest}


def _mismatch(saved: dict, ours: dict) -> str:
    diffs = [k for k in ours if k != "config_hash" and saved.get(k) != ours[k]]
    if diffs:
        return "; ".join(f"{k} {saved.get(k)!r:.60} there vs {ours[k]!r:.60} here" for k in diffs)
    return f"config hash {saved.get('config_hash')} there vs {ours['config_hash']} here"


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
        """Ids of the part of ``prompt_text`` not yet in the cache (resets it if not a prefix).

        A prefix must agree on the untrusted-content spans too: the same characters typed by
        a user and written by the template are different tokens.
        """
        if (not prompt_text.startswith(self.text) or self.offset != len(self.tokens)
                or plain_spans(prompt_text[: len(self.text)]) != plain_spans(self.text)):
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
        """Transcript, cache and model identity in one safetensors file, written atomically:
        a failed save (missing folder, a directory in the way, a full disk) leaves nothing."""
        path = Path(path).expanduser()
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder: give a file name, e.g. {path / 'chat.safetensors'}")
        if not path.parent.is_dir():
            raise FileNotFoundError(f"folder {path.parent} does not exist: create it first")
        pc = self.prompt_cache
        meta = {"messages": json.dumps(self.messages, ensure_ascii=False), "text": str(pc.text),
                "plain": json.dumps(plain_spans(pc.text)),
                "tokens": json.dumps(pc.tokens), "model": json.dumps(model_identity(self.model)),
                "system": self.system or "", "format": FORMAT}
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.safetensors")
        try:
            save_cache(str(tmp), self.prompt_cache.cache, meta)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load(self, path) -> None:
        """Replace the conversation by a saved one; refused (ValueError) if another model saved it."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no saved chat at {path}")
        try:
            cache, meta = load_cache(str(path))
        except Exception as e:
            raise ValueError(f"{path} is not a saved mlx_lfm2 chat: {e}") from e
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a saved mlx_lfm2 chat of this version "
                             f"(format {meta.get('format')!r}, expected {FORMAT!r})")
        try:
            saved = json.loads(meta["model"])
            messages, tokens = json.loads(meta["messages"]), json.loads(meta["tokens"])
            text = RenderedPrompt(meta["text"], [(int(a), int(b)) for a, b in json.loads(meta.get("plain", "[]"))])
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{path} is a damaged saved chat: {e}") from e
        ours = model_identity(self.model)
        if saved != ours:
            raise ValueError(f"{path} was saved with another model ({_mismatch(saved, ours)}): "
                             "load it with the model that saved it")
        if [type(c) for c in cache] != [type(c) for c in self.model.make_cache()]:
            raise ValueError(f"{path} was saved from a model with a different layer layout")
        self.messages = messages
        self.system = meta.get("system") or None
        self.prompt_cache = PromptCache(self.model, cache, text, tokens)
