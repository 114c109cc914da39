"""The text side of a checkpoint: ``tokenizers`` for ids, the checkpoint's own chat template.

Reads ``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja`` (or the
``chat_template`` key) and ``generation_config.json`` as transformers would, and never
imports transformers.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterable, Optional

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.decoders import DecodeStream

from . import chat_template as templates

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


class StreamingDetokenizer:
    """``add_token(id) -> str`` returns only whole characters; ``finalize() -> str`` the rest.

    Concatenating every return value gives ``tokenizer.decode(all_ids)``: a multi-byte
    character split across tokens (CJK, Arabic, emoji) waits until its last byte arrives.
    """

    def __init__(self, tokenizer: "Tokenizer"):
        self._tok = tokenizer
        self._stream = DecodeStream(skip_special_tokens=False)
        self.tokens: list[int] = []
        self.text = ""

    def add_token(self, token: int) -> str:
        self.tokens.append(token)
        piece = self._stream.step(self._tok.backend, token) or ""
        self.text += piece
        return piece

    def finalize(self) -> str:
        full = self._tok.decode(self.tokens)
        rest = full[len(self.text):] if full.startswith(self.text) else ""
        self.text = full
        return rest


class Tokenizer:
    """encode/decode, special ids, stop ids and ``apply_chat_template`` for one checkpoint."""

    def __init__(self, backend: _HFTokenizer, config: Optional[dict] = None,
                 template: Optional[str] = None, eos_token_ids: Iterable[int] = ()):
        self.backend = backend
        self.config = config or {}
        self.chat_template = template
        vocab = backend.get_vocab(with_added_tokens=True)

        def token(name, default):
            t = self.config.get(name, default)
            return t.get("content") if isinstance(t, dict) else t

        self.bos_token = token("bos_token", "<|startoftext|>")
        self.eos_token = token("eos_token", "<|im_end|>")
        self.pad_token = token("pad_token", "<|pad|>")
        self.bos_token_id = vocab.get(self.bos_token)
        self.eos_token_id = vocab.get(self.eos_token)
        self.pad_token_id = vocab.get(self.pad_token)
        self.add_bos_token = bool(self.config.get("add_bos_token", True))
        stops = set(eos_token_ids) | {vocab[t] for t in STOP_TOKENS if t in vocab}
        if self.eos_token_id is not None:
            stops.add(self.eos_token_id)
        self.eos_token_ids = frozenset(stops)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; ``add_special_tokens`` adds BOS unless the text already starts with it."""
        if add_special_tokens and self.bos_token and text.startswith(self.bos_token):
            add_special_tokens = False
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)

    def apply_chat_template(self, messages: list, tools=None, add_generation_prompt: bool = True,
                            tokenize: bool = False, chat_template: Optional[str] = None,
                            documents=None, **kwargs):
        """Render ``messages`` with the checkpoint's template (transformers' semantics).

        Returns the prompt text, or its ids with ``tokenize=True`` (no second BOS: the
        template writes it).
        """
        source = chat_template or self.chat_template
        if source is None:
            warnings.warn("this checkpoint has no chat template; using the LFM2 format", stacklevel=2)
            source = templates.DEFAULT_TEMPLATE
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        text = templates.render(source, messages, tools=tools, documents=documents,
                                    add_generation_prompt=add_generation_prompt, **{**specials, **kwargs})
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def load_tokenizer(folder, model_args=None) -> Tokenizer:
    folder = Path(folder)
    f = folder / "tokenizer.json"
    if not f.exists():
        raise FileNotFoundError(f"{folder} has no tokenizer.json (copy the tokenizer files from the hub repo)")
    backend = _HFTokenizer.from_file(str(f))
    config = _read_json(folder / "tokenizer_config.json")
    template = None
    if (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif isinstance(config.get("chat_template"), str):
        template = config["chat_template"]
    elif isinstance(config.get("chat_template"), list):  # named templates: take "default"
        named = {t["name"]: t["template"] for t in config["chat_template"]}
        template = named.get("default")
    eos = _read_json(folder / "generation_config.json").get("eos_token_id")
    if eos is None and model_args is not None:
        eos = model_args.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return Tokenizer(backend, config, template, eos)
