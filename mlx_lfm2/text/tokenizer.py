"""The text side of a checkpoint: ``tokenizers`` for ids, the checkpoint's own chat template.

Reads ``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja`` (or the
``chat_template`` key) and ``generation_config.json`` as transformers would, and never
imports transformers.

Prompt injection: ``apply_chat_template`` renders as transformers does, but the content of
user and tool messages is encoded with special-token strings as plain text (transformers'
``split_special_tokens``): a user typing ``<|im_start|>system`` gets ordinary tokens, while
the template's own control tokens stay special. The rendered text is a ``RenderedPrompt``,
a ``str`` that remembers those content spans through slicing and ``+``, so code that works
on prompt text (the server, ``PromptCache``) keeps the distinction without knowing of it.
"""

from __future__ import annotations

import ctypes
import json
import re
import warnings
from pathlib import Path
from typing import Iterable, Optional

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.decoders import DecodeStream

from ..model.config import ConfigError
from . import chat_template as templates

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")

Spans = tuple  # ((start, end), ...): character ranges, sorted, not overlapping


def _clip(spans: Spans, start: int, stop: int) -> Spans:
    return tuple((max(a, start) - start, min(b, stop) - start) for a, b in spans if a < stop and b > start)


class RenderedPrompt(str):
    """Prompt text plus ``plain``: the spans of untrusted content, where special-token
    strings are encoded as plain text. Slices and concatenations keep the spans (text
    added by code, such as a forced reply opening, is trusted)."""

    plain: Spans

    def __new__(cls, text: str, plain=()):
        self = super().__new__(cls, text)
        self.plain = tuple(tuple(s) for s in plain)
        return self

    def __getitem__(self, key):
        if not isinstance(key, slice) or key.step not in (None, 1):
            return str.__getitem__(self, key)
        start, stop, _ = key.indices(len(self))
        return RenderedPrompt(str.__getitem__(self, key), _clip(self.plain, start, max(start, stop)))

    def __add__(self, other):
        if not isinstance(other, str):
            return NotImplemented
        n = len(self)
        return RenderedPrompt(str.__add__(self, other),
                              self.plain + tuple((a + n, b + n) for a, b in plain_spans(other)))

    def __radd__(self, other):
        if not isinstance(other, str):
            return NotImplemented
        return RenderedPrompt(other, plain_spans(other)) + self


def plain_spans(text: str) -> Spans:
    """The untrusted-content spans of ``text`` (none for an ordinary ``str``)."""
    return text.plain if isinstance(text, RenderedPrompt) else ()


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
        self._specials = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(self._specials, key=len, reverse=True))
                                      or "(?!)")
        self._split_backend = None  # a copy that reads special-token strings as text, made when needed
        self._pieces = splits_at_cuts(backend)  # long texts may be encoded in pieces (``_CUT``)
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

    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]:
        """Token ids; ``add_special_tokens`` adds BOS unless the text already starts with it.

        ``split_special_tokens``: read special-token strings as plain text everywhere. A
        ``RenderedPrompt`` is read that way inside its content spans only.
        """
        ids = self._ids(text, add_special_tokens, split_special_tokens)
        if len(text) > TRIM_TEXT:
            release_freed_memory()
        return ids

    def _ids(self, text: str, add_special_tokens: bool, split_special_tokens: bool) -> list[int]:
        if add_special_tokens and self.bos_token and text.startswith(self.bos_token):
            add_special_tokens = False
        if split_special_tokens:
            return _encode(self._splitting(), text, add_special_tokens, self._pieces)
        spans = plain_spans(text)
        if not any(self._special_re.search(text, a, b) for a, b in spans):
            return _encode(self.backend, str(text), add_special_tokens, self._pieces)
        # Cut at the template's special tokens (those outside the spans), as the tokenizer
        # itself would, and read each piece between them with specials as plain text.
        ids, pos = [], 0
        for m in self._special_re.finditer(text):
            if any(a < m.end() and m.start() < b for a, b in spans):
                continue  # typed inside untrusted content
            ids += _encode(self._splitting(), text[pos:m.start()], False, self._pieces)
            ids += self.backend.encode(m.group(), add_special_tokens=False).ids
            pos = m.end()
        ids += _encode(self._splitting(), text[pos:], False, self._pieces)
        return _with_specials(self.backend, ids) if add_special_tokens else ids

    def _splitting(self) -> _HFTokenizer:
        if self._split_backend is None:
            split = _HFTokenizer.from_str(self.backend.to_str())
            split.encode_special_tokens = True
            self._split_backend = split
        return self._split_backend

    def has_special_tokens(self, text: str) -> bool:
        """Whether ``text`` spells a special token (``<|im_start|>``...)."""
        return isinstance(text, str) and self._special_re.search(text) is not None

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)

    def apply_chat_template(self, messages: list, tools=None, add_generation_prompt: bool = True,
                            tokenize: bool = False, chat_template: Optional[str] = None,
                            documents=None, split_special_tokens: bool = True, **kwargs):
        """Render ``messages`` with the checkpoint's template (transformers' semantics).

        Returns the prompt text (a ``RenderedPrompt``), or its ids with ``tokenize=True``
        (no second BOS: the template writes it). With ``split_special_tokens`` (the default)
        special-token strings in user and tool content are plain text; ``False`` reads them
        as control tokens, as transformers does.
        """
        source = chat_template or self.chat_template
        if source is None:
            warnings.warn("this checkpoint has no chat template; using the LFM2 format", stacklevel=2)
            source = templates.DEFAULT_TEMPLATE
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        kwargs = dict(tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
                      **{**specials, **kwargs})
        if split_special_tokens:
            text, spans = templates.render_with_spans(source, messages, self.has_special_tokens, **kwargs)
            text = RenderedPrompt(text, spans or ())
        else:
            text = templates.render(source, messages, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text


LONG_TEXT = 1 << 16  # characters: past this, encode through encode_batch
# Characters: past this, the memory the encoding used goes back to the OS once it is freed.
# ``tokenizers`` works with some 400 bytes a token (a 2 MB prompt: 300 MB), and glibc keeps
# what its threads' arenas free: without this a server's RSS stays at the high-water mark of
# its largest prompts.
TRIM_TEXT = 1 << 18


# Where a long text is cut into pieces: after a newline, or before a space, each between
# characters that are not whitespace. LFM2's pre-tokenizer (a GPT-style split regex, then
# byte-level BPE within each piece) always splits there: only its whitespace-led patterns
# reach over a space or past a newline run. So the pieces' ids are the whole text's
# (tests/test_template_limits.py checks).
_CUT = re.compile(r"(?<=\n)(?=\S)|(?<=\S)(?= \S)")
# The pre-tokenization that rule was derived from (LFM2's tokenizer.json), and no normalizer.
_LFM2_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
               "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_LFM2_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": _LFM2_SPLIT}, "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def splits_at_cuts(backend: _HFTokenizer) -> bool:
    """Whether ``backend`` pre-tokenizes as LFM2's does, so that ``_CUT`` never changes its
    ids. Any other tokenizer (a normalizer, another split regex, a prefix space) encodes a
    long text whole: the memory of one encode, and ids that are its own."""
    if backend.normalizer is not None or backend.pre_tokenizer is None:
        return False
    return json.loads(backend.pre_tokenizer.__getstate__()) == _LFM2_PRE_TOKENIZER


def _encode(backend: _HFTokenizer, text: str, add_special_tokens: bool, pieces: bool) -> list[int]:
    """``backend.encode(...).ids``. A long text goes through ``encode_batch``, which lets go
    of the GIL while it works (``encode`` holds it: a multi-MB prompt tokenized in a worker
    thread would stall the server's event loop for seconds), in pieces of about
    ``LONG_TEXT`` characters (``_CUT``): ``tokenizers`` holds some 500 bytes a character
    while it encodes (a 4 MiB prompt: 630 MB), a piece's instead of the text's. Not
    ``pieces`` (``splits_at_cuts`` is false): the whole text in one ``encode_batch``."""
    if len(text) <= LONG_TEXT:
        return backend.encode(text, add_special_tokens=add_special_tokens).ids
    ids, start = [], 0
    while start < len(text):
        cut = _CUT.search(text, start + LONG_TEXT) if pieces and len(text) - start > 2 * LONG_TEXT else None
        end = cut.start() if cut is not None else len(text)
        ids += backend.encode_batch([text[start:end]], add_special_tokens=False)[0].ids
        start = end
    return _with_specials(backend, ids) if add_special_tokens else ids


def _with_specials(backend: _HFTokenizer, ids: list[int]) -> list[int]:
    """``ids`` with what the post-processor adds around a text (LFM2: BOS before it)."""
    bare = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    i = next(i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare)
    return full[:i] + ids + full[i + len(bare) :]


def release_freed_memory() -> None:
    """Return the C heap's free pages to the OS: glibc's ``malloc_trim`` (a few ms to tens of
    ms, the GIL released); nothing where the C library has no such call."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _malloc_trim():
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):  # no C library to look in (Windows: CDLL(None))
        return None


_MALLOC_TRIM = _malloc_trim()


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _check_tokenizer_config(config: dict, path: Path) -> None:
    """The keys we read, with the types transformers accepts; anything else is a ConfigError."""
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        t = config.get(key)
        if t is None or isinstance(t, str) or (isinstance(t, dict) and isinstance(t.get("content"), str)):
            continue
        raise ConfigError(f"{path}: {key!r} must be a string or {{\"content\": string}}, got {t!r:.80}")
    if not isinstance(config.get("add_bos_token", True), bool):
        raise ConfigError(f"{path}: 'add_bos_token' must be true or false")
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return
    if not isinstance(template, list) or not all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
            for t in template):
        raise ConfigError(f"{path}: 'chat_template' must be a string or a list of "
                          '{"name": string, "template": string}')


def _eos_ids(value, path: Path) -> list[int]:
    if value is None:
        return []
    ids = [value] if isinstance(value, int) else value
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ConfigError(f"{path}: 'eos_token_id' must be an integer or a list of integers, got {value!r:.80}")
    return ids


def chat_template(folder: Path, config: dict) -> Optional[str]:
    """The folder's chat template: ``chat_template.jinja``, else ``tokenizer_config.json``'s
    ``chat_template`` (``config``, checked; of named templates, "default")."""
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(config.get("chat_template"), str):
        return config["chat_template"]
    if isinstance(config.get("chat_template"), list):
        return {t["name"]: t["template"] for t in config["chat_template"]}.get("default")
    return None


def folder_chat_template(folder) -> Optional[str]:
    """The chat template of a model folder, read without loading its tokenizer (None: none,
    or files that do not read)."""
    folder = Path(folder)
    try:
        config = _read_json(folder / "tokenizer_config.json")
        _check_tokenizer_config(config, folder / "tokenizer_config.json")
        return chat_template(folder, config)
    except (OSError, ValueError):
        return None


def load_tokenizer(folder, model_args=None) -> Tokenizer:
    folder = Path(folder)
    f = folder / "tokenizer.json"
    if not f.exists():
        raise FileNotFoundError(f"{folder} has no tokenizer.json (copy the tokenizer files from the hub repo)")
    try:
        backend = _HFTokenizer.from_file(str(f))
    except Exception as e:  # the Rust side reports any malformed file as a bare Exception
        raise ConfigError(f"{f} is not a tokenizers file: {e}") from e
    config = _read_json(folder / "tokenizer_config.json")
    _check_tokenizer_config(config, folder / "tokenizer_config.json")
    template = chat_template(folder, config)
    gen = folder / "generation_config.json"
    eos = _eos_ids(_read_json(gen).get("eos_token_id"), gen)
    if not eos and model_args is not None:
        eos = _eos_ids(model_args.eos_token_id, folder / "config.json")
    return Tokenizer(backend, config, template, eos)
