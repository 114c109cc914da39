"""Conversations that keep their cache, so turn N prefills only turn N.

``Chat`` keeps its conversation's cache in a one-entry ``prompt_cache.PromptCacheStore``
(which extends it, or rewinds it to the longest common prefix it can reach) and works on a
copy each turn (arrays are immutable, the copy is cheap): a reply interrupted mid-step
(Ctrl-C) leaves the stored turn as it was, and the partial reply is kept in the transcript
for the next turn to prefill. ``retry()`` and ``undo()`` edit the transcript; the next
prompt then rewinds instead of prefilling the conversation again. ``save``/``load`` write
and check the transcript, cache and model identity; ``load`` also reads mlx-lm's
prompt-cache files, which hold a cache and no transcript (see ``Chat.head``).

With resident adapters (``model.lora_rows``), ``use_adapter(name)`` switches the adapter the
next replies use. A cache computed under one adapter is not valid under another, so the
store keeps one conversation cache per adapter (the base's included): a switch resumes from
what that adapter last cached of this conversation, and re-prefills the rest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Iterator, Optional

import mlx.core as mx

from ..model.cache import checkpoint, rewind
from ..model.lora_rows import adapter_set, namespace, select
from ..text.chat_template import split_template
from ..text.tokenizer import RenderedPrompt, plain_spans
from .cache_files import CacheFileError, SafeTensors, layout, load_mlx_lm, save_session, session_cache
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
        # Tokens a loaded mlx-lm prompt cache holds, of a text nobody recorded: the opening
        # of a first user message (``head_opening``) and part of its content. The messages
        # then continue it; the prompt spells those tokens with a placeholder (``head_text``).
        self.head = 0
        # One conversation: the store holds its cache as of the last whole turn (per adapter).
        resident = adapter_set(model)
        self.adapter: Optional[str] = None  # the resident adapter replies use (None: the base)
        self.store = PromptCacheStore(model, entries=1 + len(resident.loaded if resident else []),
                                      draft_model=draft_model)
        self.reset()

    def reset(self, system: Optional[str] = None) -> None:
        if system is not None:
            self.system = system
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.head = 0
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

    @property
    def head_text(self) -> str:
        """The placeholder text of the head's tokens (the pad token, as decoded)."""
        return self.tokenizer.decode([self.tokenizer.pad_token_id] * self.head) if self.head else ""

    def head_opening(self) -> str:
        """What an mlx-lm prompt cache holds before its text: a first user message's opening."""
        return split_template(self.tokenizer, [{"role": "user", "content": "x"}], False)[0]

    def render(self, messages: list, add_generation_prompt: bool = True) -> str:
        """The prompt of ``messages``; with a head, its placeholder then what follows the
        cached text (the first message's content continues it)."""
        if self.head and not messages:
            return self.head_text
        text = self.tokenizer.apply_chat_template(messages, tools=self.tools, add_generation_prompt=add_generation_prompt)
        if not self.head:
            return text
        opening = self.head_opening()
        if not text.startswith(opening):
            raise ValueError("this conversation continues a cached prompt (an mlx-lm prompt-cache file): "
                             "it starts with that user message, so it takes no system prompt or tools")
        return self.head_text + text[len(opening):]

    def _head_only(self) -> PromptCache:
        """The conversation's cache rewound to its head (where it was loaded)."""
        pc = self.prompt_cache.copy()
        rewind(pc._caches, pc.offset - self.head)  # the head's end is a checkpoint (load_mlx_lm)
        pc.tokens, pc.text = pc.tokens[: self.head], self.head_text
        return pc

    def reply(self, **overrides) -> Iterator[GenerationResponse]:
        tok = self.tokenizer
        prompt = self.render(self.messages)
        ns = namespace(self.model, self.adapter)
        select(self.model, [self.adapter])
        pc = self.store.take(prompt, ns)  # a copy: the stored turn stays as it was until this one ends
        if pc.offset < self.head:  # never re-prefill the placeholder: go back to the head
            pc = self._head_only()
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
                self.store.keep(pc, ns)
            # else: interrupted inside a step, the copy may be half-updated; the store keeps
            # the last whole turn, and the partial reply is prefilled with the next one.

    def use_adapter(self, name: Optional[str]) -> tuple[int, int]:
        """Reply with resident adapter ``name`` from now on (None: the base) -> ``(tokens of the
        conversation so far, of those cached under that adapter)``: the difference is what the
        next turn re-prefills."""
        select(self.model, [name])  # not loaded: KeyError (model.lora_rows.NotLoaded), nothing changed
        self.adapter = name
        if not self.messages:
            return 0, 0
        rest = self.render(self.messages, add_generation_prompt=False)
        pc = self.store.take(rest, namespace(self.model, name))  # a copy: what the next turn starts from
        fed = pc.new_tokens(self.tokenizer, rest)
        return pc.offset + len(fed), pc.offset

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
        rest = self.render(self.messages, add_generation_prompt=False) if self.messages or self.head else ""
        ns = namespace(self.model, self.adapter)
        if self.head and not self.messages:
            pc = self._head_only()
        else:
            pc = self.store.take(rest, ns)
            pc.trim(self.tokenizer, rest)
        self.store.clear()
        self.store.keep(pc, ns)  # (nothing when no token of it remains)
        return dropped

    @property
    def cached_tokens(self) -> int:
        return self.prompt_cache.offset

    def save(self, path) -> None:
        """Transcript, cache and model identity in one checksummed safetensors file, written
        atomically: a failed save (missing folder, a directory in the way, a full disk)
        leaves nothing. The adapter replies use is recorded, and the adapter the cache was
        computed under (its content's fingerprint), so ``load`` restores both."""
        path = Path(path).expanduser()
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder: give a file name, e.g. {path / 'chat.safetensors'}")
        if not path.parent.is_dir():
            raise FileNotFoundError(f"folder {path.parent} does not exist: create it first")
        pc = self.prompt_cache
        meta = {"messages": json.dumps(self.messages, ensure_ascii=False), "text": str(pc.text),
                "plain": json.dumps(plain_spans(pc.text)), "tokens": json.dumps(pc.tokens),
                "model": json.dumps(model_identity(self.model)), "weights": model_digest(self.model, self.tokenizer),
                "system": self.system or "", "head": str(self.head), "format": FORMAT,
                "adapter": self.adapter or "", "cache_namespace": self.store.latest_namespace()}
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

    def load(self, path, model_name: Optional[str] = None) -> None:
        """Replace the conversation by a saved one; refused (ValueError) if another model saved
        it. Saved by another copy of the same model (another quantization, say), the transcript
        loads and its cache does not: the next turn prefills it again, so replies stay exact.
        An mlx-lm prompt-cache file (``mlx_lm.cache_prompt``, ``mlx_lfm2.cache_prompt``) loads
        as a head with no transcript (``load_prompt_cache``)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no saved chat at {path}")
        try:
            f = SafeTensors.open(path)
        except CacheFileError as e:
            raise ValueError(f"{path} is not a saved mlx_lfm2 chat: {e}") from e
        meta = f.metadata
        if meta.get("format") is None and "1.0" in meta:  # mlx-lm's class names: "1.<layer>"
            return self.load_prompt_cache(path, model_name)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a saved mlx_lfm2 chat of this version "
                             f"(format {meta.get('format')!r:.40}, expected {FORMAT!r})")
        try:
            saved = json.loads(meta["model"])
            messages, tokens = json.loads(meta["messages"]), json.loads(meta["tokens"])
            text = RenderedPrompt(meta["text"], [(int(a), int(b)) for a, b in json.loads(meta.get("plain", "[]"))])
            head = int(meta.get("head", "0"))
            if not (isinstance(messages, list) and isinstance(tokens, list) and all(type(t) is int for t in tokens)):
                raise TypeError("messages or tokens of the wrong type")
            if not 0 <= head <= len(tokens) or tokens[:head] != [self.tokenizer.pad_token_id] * head:
                raise ValueError(f"a head of {head} tokens that the tokens do not start with")
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{path} is a damaged saved chat: {e}") from e
        self._check_transcript(path, messages, tokens, text)
        adapter = self._saved_adapter(path, meta)
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
        elif head:
            raise ValueError(f"{path} continues a cached prompt made with other weights: "
                             "load it with the model that saved it")
        else:
            pc = PromptCache(self.model, draft_model=self.draft_model)
        self.messages, self._stats, self.head = messages, [], head
        self.system = meta.get("system") or None
        self.adapter = adapter
        self.store.clear()
        # Filed under the adapter content it was computed with: reused only under that content.
        self.store.keep(pc, meta.get("cache_namespace") or "")

    def _saved_adapter(self, path, meta: dict) -> Optional[str]:
        """The adapter a saved chat replied with (None: the base); it must be resident here."""
        name = meta.get("adapter") or None
        resident = adapter_set(self.model)
        if name is not None and (resident is None or name not in resident):
            loaded = ", ".join(resident.loaded) if resident is not None else ""
            raise ValueError(f"{path} replies with adapter {name!r}, which is not loaded here "
                             f"(loaded: {loaded or 'none'}): start with --adapter {name}=PATH")
        return name

    def load_prompt_cache(self, path, model_name: Optional[str] = None) -> int:
        """Start a conversation from an mlx-lm prompt-cache file: its cache is the head (the
        opening of a user message and part of its content, as ``cache_prompt`` wrote it); the
        next message continues that content. Refused (ValueError) if its metadata names other
        weights (our digest), another model than ``model_name``, or an EOS token this tokenizer
        lacks. Returns the cached tokens."""
        try:
            cache, meta = load_mlx_lm(path, layout(self.model), self.model.args.max_position_embeddings)
        except CacheFileError as e:
            raise ValueError(f"{path} is not a prompt cache for this model: {e}") from e
        check_prompt_cache_meta(path, meta, self.model, self.tokenizer, model_name)
        n = cache[0].offset if cache else 0
        if n == 0 or self.tokenizer.pad_token_id is None:
            raise ValueError(f"{path} holds no cached tokens" if n == 0 else "this tokenizer has no pad token")
        checkpoint(cache)  # undo and retry can come back to the head's end
        self.messages, self._stats, self.system = [], [], None
        self.head = n
        self.store.clear()
        self.store.keep(PromptCache(self.model, cache, self.head_text, [self.tokenizer.pad_token_id] * n,
                                    draft_model=self.draft_model))
        return n


def check_prompt_cache_meta(path, meta: dict, model, tokenizer, model_name: Optional[str]) -> None:
    """An mlx-lm prompt-cache file's metadata against this model (see ``load_prompt_cache``)."""
    import os

    digest = meta.get("mlx_lfm2_model")  # written by mlx_lfm2.cache_prompt
    if digest is not None and digest != model_digest(model, tokenizer):
        raise ValueError(f"{path} was made with other weights than this model's")
    named = meta.get("model")
    if digest is None and named and model_name and named != model_name:
        same = os.path.exists(named) and os.path.exists(model_name) and os.path.samefile(named, model_name)
        if not same:
            raise ValueError(f"{path} was made with the model {named!r:.200}, not {model_name!r:.200}: "
                             "chat with --model set to that model")
    try:
        config = json.loads(meta.get("tokenizer_config", "{}"))
    except ValueError:
        raise ValueError(f"{path}: its tokenizer_config is not JSON") from None
    eos = config.get("eos_token") if isinstance(config, dict) else None
    if eos is not None and tokenizer.convert_tokens_to_ids(str(eos)) is None:
        raise ValueError(f"{path} was made with the EOS token {eos!r:.40}, which this tokenizer lacks")
