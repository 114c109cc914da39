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

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Optional

import mlx.core as mx

from ..model.cache import KVCache, checkpoint, copy_cache, load_cache, reachable, rewind, save_cache
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


def _cache_problem(model, cache: list, n_tokens: int) -> Optional[str]:
    """What is wrong with a loaded cache for ``model`` holding ``n_tokens`` tokens, or None."""
    a = model.args
    for i, c in enumerate(cache):
        if c.offset != n_tokens:
            return f"layer {i} holds {c.offset} positions, the transcript {n_tokens} tokens"
        if not c.state:
            if n_tokens:
                return f"layer {i} has no state"
            continue
        if isinstance(c, KVCache):
            want = [(1, a.num_key_value_heads, n_tokens, a.head_dim)] * 2
        else:
            want = [(1, a.conv_L_cache - 1, a.hidden_size)]
        if [tuple(x.shape) for x in c.state] != want:
            return f"layer {i} arrays are {[tuple(x.shape) for x in c.state]}, expected {want}"
    return None


def _mismatch(saved: dict, ours: dict) -> str:
    diffs = [k for k in ours if k != "config_hash" and saved.get(k) != ours[k]]
    if diffs:
        return "; ".join(f"{k} {saved.get(k)!r:.60} there vs {ours[k]!r:.60} here" for k in diffs)
    return f"config hash {saved.get('config_hash')} there vs {ours['config_hash']} here"


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
        """How many cached tokens ``prompt_text`` could reuse (what ``new_tokens`` keeps).

        A shared prefix must agree on the untrusted-content spans too: the same characters
        typed by a user and written by the template are different tokens.
        """
        if self.offset != len(self.tokens) or not self.tokens:
            return 0

        def same(n: int) -> bool:  # the first n characters: same text, same untrusted spans
            return prompt_text.startswith(self.text[:n]) and plain_spans(prompt_text[:n]) == plain_spans(self.text[:n])

        if len(prompt_text) > len(self.text) and same(len(self.text)):
            return len(self.tokens)

        def fits(p: int) -> bool:
            prefix = tokenizer.decode(self.tokens[:p])
            return len(prefix) < len(prompt_text) and self.text.startswith(prefix) and same(len(prefix))

        # The longest token prefix that spells a proper prefix of the prompt (binary search),
        # then the nearest offset below it that every layer can rewind to.
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
        self.trim(tokenizer, prompt_text)
        return tokenizer.encode(prompt_text[len(self.text):], add_special_tokens=False)

    def trim(self, tokenizer, prompt_text: str) -> None:
        """Keep only what ``prompt_text`` can reuse: rewind to the longest common prefix the
        cache can reach, or reset."""
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
            self.text = prompt_text[: len(tokenizer.decode(self.tokens))]  # keeps the spans

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
        self._stats: list[tuple[int, GenerationResponse]] = []  # (index of the reply in messages, its stats)

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
        tok, pc = self.tokenizer, self.prompt_cache
        prompt = tok.apply_chat_template(self.messages, tools=self.tools, add_generation_prompt=True)
        snapshot = pc.copy()
        ids = pc.new_tokens(tok, prompt)
        reply, generated, finished, latest = "", [], False, None
        try:
            spec = dict(self.speculative, draft_model=self.draft_model, draft_cache=pc.draft_cache)
            for latest in stream_generate(self.model, tok, ids, cache=pc.cache, **spec,
                                          **{**self.sampling, **overrides}):
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
            else:  # interrupted inside a step: the cache may be half-updated
                self.prompt_cache = snapshot

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
        self.prompt_cache.trim(self.tokenizer, rest)
        return dropped

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
        problem = _cache_problem(self.model, cache, len(tokens))
        if problem:  # the cache's offsets index its arrays: a damaged file must not reach them
            raise ValueError(f"{path} is a damaged saved chat: {problem}")
        self.messages, self._stats = messages, []
        self.system = meta.get("system") or None
        self.prompt_cache = PromptCache(self.model, cache, text, tokens, draft_model=self.draft_model)
