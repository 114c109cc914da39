"""Conversations that keep their cache, so turn N prefills only turn N.

``Chat`` keeps its conversation's cache in a one-entry ``prompt_cache.PromptCacheStore``
(which extends it, or rewinds it to the longest common prefix it can reach) and works on a
copy each turn (arrays are immutable, the copy is cheap): a reply interrupted mid-step
(Ctrl-C) leaves the stored turn as it was, and the partial reply is kept in the transcript
for the next turn to prefill. ``retry()`` and ``undo()`` edit the transcript; the next
prompt then rewinds instead of prefilling the conversation again. ``save``/``load`` write
and check the transcript, cache and model identity.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Iterator, Optional

import mlx.core as mx

from ..text.tokenizer import RenderedPrompt, plain_spans
from .cache_files import CacheFileError, SafeTensors, layout, save_session, session_cache
from .disk_cache import model_digest
from .generation import GenerationResponse, default_sampling, stream_generate
from .prompt_cache import PromptCache, PromptCacheStore
from .sample import SamplingParams

ROLES = ("system", "user", "assistant", "tool")
FORMAT = "mlx_lfm2.chat/3"  # /2 records the model's identity, /3 checksums and its weights' digest


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


class Chat:
    """A multi-turn conversation: ``for r in chat.send("hi"): print(r.text, end="")``."""

    def __init__(self, model, tokenizer, system: Optional[str] = None, tools=None, draft_model=None,
                 num_draft_tokens: Optional[int] = None, prompt_lookup: bool = False,
                 sampling: Optional[SamplingParams] = None, **settings):
        """``sampling`` (default: the model card's) and ``settings`` (its fields by name) are
        used for every reply; ``send``/``reply``/``retry`` take more settings for one reply."""
        self.model, self.tokenizer, self.tools = model, tokenizer, tools
        self.draft_model = draft_model
        self.speculative = dict(num_draft_tokens=num_draft_tokens, prompt_lookup=prompt_lookup)
        self.sampling = (sampling or SamplingParams(**default_sampling(model))).replace(**settings)
        self.system = system
        # One conversation: the store holds its cache as of the last whole turn.
        self.store = PromptCacheStore(model, entries=1, draft_model=draft_model)
        self.reset()

    def reset(self, system: Optional[str] = None) -> None:
        if system is not None:
            self.system = system
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.store.clear()
        self._stats: list[tuple[int, GenerationResponse]] = []  # (index of the reply in messages, its stats)

    @property
    def prompt_cache(self) -> PromptCache:
        """The conversation's cache as of its last whole turn."""
        return self.store.latest() or self.store.fresh()

    @property
    def last(self) -> Optional[GenerationResponse]:
        """The stats of the latest reply still in the conversation (an interrupted one's
        ``finish_reason`` is "interrupted"); None when there is none."""
        return self._stats[-1][1] if self._stats else None

    def _forget_from(self, index: int) -> None:
        """Drop messages from ``index`` on, and the stats of replies among them."""
        self.messages = self.messages[:index]
        self._stats = [(i, r) for i, r in self._stats if i < index]

    def send(self, content, role: str = "user", **overrides) -> Iterator[GenerationResponse]:
        """Add a message (user, or tool result) and stream the assistant's reply."""
        self.messages.append({"role": role, "content": content})
        return self.reply(**overrides)

    def reply(self, **overrides) -> Iterator[GenerationResponse]:
        tok = self.tokenizer
        prompt = tok.apply_chat_template(self.messages, tools=self.tools, add_generation_prompt=True)
        pc = self.store.take(prompt)  # a copy: the stored turn stays as it was until this one ends
        ids = pc.new_tokens(tok, prompt)
        reply, generated, finished, latest = "", [], False, None
        try:
            spec = dict(self.speculative, draft_model=self.draft_model, draft_cache=pc.draft_cache)
            for latest in stream_generate(self.model, tok, ids, cache=pc.cache,
                                          sampling=self.sampling.replace(**overrides), **spec):
                reply += latest.text
                if latest.token is not None:
                    generated.append(latest.token)
                finished = latest.finish_reason is not None
                yield latest
        finally:
            self.messages.append({"role": "assistant", "content": reply})
            if finished:
                self._stats.append((len(self.messages) - 1, latest))
            else:  # what an interrupted reply got done (nothing but its prompt, before the first token)
                latest = latest or GenerationResponse("", None, None, None, len(ids), 0, 0.0, 0.0,
                                                      mx.get_peak_memory() / 1e9)
                self._stats.append((len(self.messages) - 1, dataclasses.replace(latest, finish_reason="interrupted")))
            if finished:
                pc.commit(tok, prompt, ids, generated)
                self.store.keep(pc)
            # else: interrupted inside a step, the copy may be half-updated; the store keeps
            # the last whole turn, and the partial reply is prefilled with the next one.

    def retry(self, **overrides) -> Iterator[GenerationResponse]:
        """Regenerate the last reply (the cache rewinds to the end of its prompt)."""
        if not any(m["role"] == "user" for m in self.messages):
            raise ValueError("nothing to retry: no message yet")
        users = [i for i, m in enumerate(self.messages) if m["role"] == "user"]
        self._forget_from(users[-1] + 1)  # the reply, and any tool round after it
        return self.reply(**overrides)

    def undo(self) -> list[dict]:
        """Drop the last exchange (the last user message and everything after it); returns it."""
        users = [i for i, m in enumerate(self.messages) if m["role"] == "user"]
        if not users:
            raise ValueError("nothing to undo: no message yet")
        dropped = self.messages[users[-1]:]
        self._forget_from(users[-1])
        # The cache keeps only what the remaining conversation can reuse (what /stats counts).
        rest = (self.tokenizer.apply_chat_template(self.messages, tools=self.tools, add_generation_prompt=False)
                if self.messages else "")
        pc = self.store.take(rest)
        pc.trim(self.tokenizer, rest)
        self.store.clear()
        self.store.keep(pc)  # (nothing when no token of it remains)
        return dropped

    @property
    def cached_tokens(self) -> int:
        return self.prompt_cache.offset

    def save(self, path) -> None:
        """Transcript, cache and model identity in one checksummed safetensors file, written
        atomically: a failed save (missing folder, a directory in the way, a full disk)
        leaves nothing."""
        path = Path(path).expanduser()
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder: give a file name, e.g. {path / 'chat.safetensors'}")
        if not path.parent.is_dir():
            raise FileNotFoundError(f"folder {path.parent} does not exist: create it first")
        pc = self.prompt_cache
        meta = {"messages": json.dumps(self.messages, ensure_ascii=False), "text": str(pc.text),
                "plain": json.dumps(plain_spans(pc.text)), "tokens": json.dumps(pc.tokens),
                "model": json.dumps(model_identity(self.model)), "weights": model_digest(self.model, self.tokenizer),
                "system": self.system or "", "format": FORMAT}
        save_session(path, pc.cache, meta)

    def _check_transcript(self, path, messages: list, tokens: list, text) -> None:
        """What a crafted file could hold that would pass ``load`` and break the next turn:
        messages that are not role/content strings, ones this template cannot render, token
        ids past the embedding rows (MLX does not bounds-check), spans outside the text."""
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                    and set(m) == {"role", "content"}):
                raise ValueError(f"{path} is a damaged saved chat: message {i} is not a "
                                 f"{{role, content}} pair of strings ({str(m)[:60]})")
        vocab = getattr(self.model.args, "vocab_size", None) or self.tokenizer.vocab_size  # embedding rows
        if any(not 0 <= t < vocab for t in tokens):
            raise ValueError(f"{path} is a damaged saved chat: a token id outside the vocabulary of {vocab}")
        if any(not 0 <= a <= b <= len(text) for a, b in text.plain):
            raise ValueError(f"{path} is a damaged saved chat: a content span outside its text")
        try:
            self.tokenizer.apply_chat_template(messages + [{"role": "user", "content": "?"}], tools=self.tools,
                                               add_generation_prompt=True)
        except Exception as e:  # the template's own refusal (raise_exception), a limit, a bad value
            raise ValueError(f"{path}: this model's chat template cannot render its conversation: {e}") from e

    def load(self, path) -> None:
        """Replace the conversation by a saved one; refused (ValueError) if another model saved
        it. Saved by another copy of the same model (another quantization, say), the transcript
        loads and its cache does not: the next turn prefills it again, so replies stay exact."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no saved chat at {path}")
        try:
            f = SafeTensors.open(path)
        except CacheFileError as e:
            raise ValueError(f"{path} is not a saved mlx_lfm2 chat: {e}") from e
        meta = f.metadata
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a saved mlx_lfm2 chat of this version "
                             f"(format {meta.get('format')!r:.40}, expected {FORMAT!r})")
        try:
            saved = json.loads(meta["model"])
            messages, tokens = json.loads(meta["messages"]), json.loads(meta["tokens"])
            text = RenderedPrompt(meta["text"], [(int(a), int(b)) for a, b in json.loads(meta.get("plain", "[]"))])
            if not (isinstance(messages, list) and isinstance(tokens, list) and all(type(t) is int for t in tokens)):
                raise TypeError("messages or tokens of the wrong type")
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{path} is a damaged saved chat: {e}") from e
        self._check_transcript(path, messages, tokens, text)
        ours = model_identity(self.model)
        if saved != ours:
            raise ValueError(f"{path} was saved with another model ({_mismatch(saved, ours)}): "
                             "load it with the model that saved it")
        if meta.get("weights") == model_digest(self.model, self.tokenizer):
            try:  # the offsets index the arrays: shapes are checked before any is read
                cache = session_cache(f, layout(self.model), len(tokens))
            except CacheFileError as e:
                raise ValueError(f"{path} is a damaged saved chat: {e}") from e
            pc = PromptCache(self.model, cache, text, tokens, draft_model=self.draft_model)
        else:
            pc = PromptCache(self.model, draft_model=self.draft_model)
        self.messages, self._stats = messages, []
        self.system = meta.get("system") or None
        self.store.clear()
        self.store.keep(pc)
