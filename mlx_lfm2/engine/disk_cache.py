"""The disk tier of the prompt cache: prefixes kept as fixed blocks that survive restarts.

A token sequence is cut into blocks of ``BLOCK`` (256) tokens. Block ``i`` is stored once,
in ``blk-<key>.safetensors``, under a key that hashes the model's identity and every token
up to the block's end (a chain: ``key_i = sha256(key_{i-1} || tokens of block i)``), so two
prompts share exactly the blocks of their common prefix. A block holds what an exact
restart needs from there: each attention layer's K/V rows of its 256 positions, and each
conv layer's state at its end (``ConvCache`` keeps the state at every block boundary, see
``model/cache.py``). ``lookup`` walks the longest chain of stored blocks and builds a cache
that a fresh prefill of those tokens would have built; the caller prefills the rest.

Files are untrusted on the way in (``cache_files``): the header is checked against the
shapes and dtypes this model makes, the key, the model identity and the block's own tokens
against the request, and the data against its sha256, before any byte reaches MLX. A file
that fails is skipped with a log line and the chain ends there (the block is rewritten by
the next save). Writes are atomic (temporary file, then rename), so a process killed
mid-write leaves at most a ``.tmp-`` file, never a half block under a block's name; two
processes sharing the folder at worst write the same block twice (the same bytes).

The folder is bounded by bytes: after a save the least recently used blocks go first,
pinned ones (``pin``: a prefix a client asked to keep) last, and a chain is touched from
its end back to its root, so eviction shortens chains from the end instead of orphaning
them. Only files named like ours, in our folder, are ever removed.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import queue
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..model.cache import ConvCache, rewind
from .cache_files import (CacheFileError, SafeTensors, cache_from_arrays, cache_slice, cache_spec, layout,
                          serialize, write)

FORMAT = "mlx_lfm2.prompt_block/1"
BLOCK = ConvCache.block
DEFAULT_BYTES = 8 << 30
STALE_TMP_S = 600  # a temporary file this old is a dead writer's
log = logging.getLogger("mlx_lfm2.disk_cache")


def model_digest(model, tokenizer=None) -> str:
    """A digest of what a cached block depends on: the configuration (quantization
    included), the weights themselves (a strided sample of every tensor, adapters
    included, at the dtype they run in) and the chat template."""
    h = hashlib.sha256(FORMAT.encode())
    args = model.args
    config = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(vars(args))
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    params = sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0])
    samples = []
    for _, a in params:
        flat = a.reshape(-1)
        samples.append(flat[:: max(1, flat.size // 64)][:64])
    mx.eval(samples)
    for (name, a), s in zip(params, samples):
        h.update(f"{name}:{a.dtype}:{a.shape}".encode())
        h.update(np.array(s.view(mx.uint16) if s.dtype == mx.bfloat16 else s).tobytes())
    h.update(str(getattr(model, "compute_dtype", None)).encode())
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()


def block_keys(identity: str, tokens, block: int = BLOCK, namespace: str = "") -> list[str]:
    """The chain of keys of the full blocks of ``tokens`` (``namespace``: what else the cache
    depends on, an adapter say; "" is the base model)."""
    h, keys = hashlib.sha256(f"{identity}\0{namespace}".encode()).digest(), []
    for s in range(0, len(tokens) - block + 1, block):
        h = hashlib.sha256(h + np.asarray(tokens[s : s + block], dtype="<u4").tobytes()).digest()
        keys.append(h.hex())
    return keys


class BlockStore:
    """Blocks of one model in ``folder`` (shared with other processes and models)."""

    def __init__(self, folder, model, tokenizer=None, max_bytes: int = DEFAULT_BYTES, block: int = BLOCK,
                 background: bool = False):
        if block != ConvCache.block:
            raise ValueError(f"blocks must be ConvCache.block ({ConvCache.block}) tokens: "
                             "conv states are kept at those boundaries only")
        self.folder = Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.model, self.max_bytes, self.block = model, int(max_bytes), block
        self.identity = model_digest(model, tokenizer)
        self._layout: Optional[list] = None
        self._refused: set[str] = set()  # keys whose file failed a read: the next save rewrites them
        # background: files are hashed and written by a thread (``flush`` waits for it); the
        # caller's thread only copies the arrays out, so a server's next step is not held up.
        self._writes: Optional[queue.Queue] = None
        self._pending: set[str] = set()  # keys queued for the writer
        if background:
            self._writes = queue.Queue()
            threading.Thread(target=self._writer, daemon=True, name="mlx_lfm2-disk-cache").start()
        self.stats = {"blocks_read": 0, "blocks_written": 0, "blocks_skipped": 0, "blocks_evicted": 0}

    @property
    def layout(self) -> list:
        """Made on first use, by the thread that runs the model (a server's worker: MLX's
        CPU streams belong to the thread that made them)."""
        if self._layout is None:
            self._layout = layout(self.model)
        return self._layout

    def path(self, key: str) -> Path:
        return self.folder / f"blk-{key}.safetensors"

    def _pin_path(self, key: str) -> Path:
        return self.folder / f"pin-{key}"

    # -- reading ---------------------------------------------------------------------------

    def _read(self, key: str, index: int, tokens) -> Optional[dict]:
        """Block ``index``'s arrays, or None (missing, or refused with a log line)."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            f = SafeTensors.open(path)
            m = f.metadata
            if m.get("format") != FORMAT:
                raise CacheFileError(f"{path}: format {m.get('format')!r:.40}, expected {FORMAT!r}")
            if m.get("model") != self.identity:
                raise CacheFileError(f"{path} was written for another model")
            if m.get("key") != key or m.get("index") != str(index):
                raise CacheFileError(f"{path} holds another block")
            if m.get("tokens") != json.dumps(list(tokens)):
                raise CacheFileError(f"{path} holds other tokens than its key says")
            f.expect(cache_spec(self.layout, self.block, [(index + 1) * self.block]))
            return f.arrays()
        except CacheFileError as e:
            if path.exists():  # gone meanwhile: another process evicted it, a plain miss
                self.stats["blocks_skipped"] += 1
                self._refused.add(key)
                log.warning("prompt cache: skipped a block: %s", e)
            return None

    def chain_length(self, tokens, namespace: str = "") -> int:
        """Tokens of ``tokens`` covered by stored blocks (without reading them)."""
        n = 0
        for key in block_keys(self.identity, tokens, self.block, namespace):
            if not self.path(key).exists():
                break
            n += self.block
        return n

    def lookup(self, tokens, limit: Optional[int] = None, namespace: str = "") -> tuple[Optional[list], int]:
        """``(cache, n)``: a cache holding the first ``n`` tokens of ``tokens`` (``n <= limit``,
        a multiple of the block), from the longest valid stored chain; ``(None, 0)`` if none."""
        limit = len(tokens) if limit is None else min(limit, len(tokens))
        keys = block_keys(self.identity, tokens[:limit], self.block, namespace)
        blocks = []
        for i, key in enumerate(keys):
            arrays = self._read(key, i, tokens[i * self.block : (i + 1) * self.block])
            if arrays is None:
                break
            blocks.append(arrays)
        if not blocks:
            return None, 0
        self.stats["blocks_read"] += len(blocks)
        self._touch(keys[: len(blocks)])
        return self._assemble(blocks), len(blocks) * self.block

    def _assemble(self, blocks: list[dict]) -> list:
        ends = [(j + 1) * self.block for j in range(len(blocks))]
        merged = {}
        for b in blocks:
            for name, a in b.items():
                merged.setdefault(name, []).append(a)
        arrays = {k: mx.concatenate(v, axis=2) if k[0] in "kv" else v[0] for k, v in merged.items()}
        cache = cache_from_arrays(self.layout, arrays, ends[-1], ends)
        mx.eval([c.state for c in cache])
        return cache

    # -- writing ---------------------------------------------------------------------------

    def save(self, tokens, cache: list, pin: bool = False, namespace: str = "") -> int:
        """Store the full blocks of ``tokens`` (what ``cache`` consumed) not stored yet;
        returns how many were written. ``pin``: keep them past unpinned blocks."""
        return len(self.save_blocks(tokens, cache, pin, namespace))

    def save_blocks(self, tokens, cache: list, pin: bool = False, namespace: str = "") -> list[int]:
        """``save``, returning the indices of the blocks it writes."""
        held = min(len(tokens), min((c.offset for c in cache), default=0))
        keys = block_keys(self.identity, tokens[:held], self.block, namespace)
        jobs, budget, written = [], self.max_bytes, []
        for i, key in enumerate(keys):
            path = self.path(key)
            if key in self._pending:
                continue
            if key not in self._refused:
                try:
                    budget -= path.stat().st_size
                    continue
                except OSError:
                    pass  # not stored (or evicted just now): write it
            arrays = cache_slice(cache, i * self.block, (i + 1) * self.block, [(i + 1) * self.block])
            if arrays is None:
                keys = keys[:i]
                break
            meta = {"format": FORMAT, "model": self.identity, "key": key, "index": str(i),
                    "tokens": json.dumps(list(tokens[i * self.block : (i + 1) * self.block]))}
            size = sum(a.nbytes for a in arrays.values())
            if size > budget:  # the chain would not fit the folder's bound
                keys = keys[:i]
                break
            budget -= size
            jobs.append((path, serialize(arrays), meta))
            written.append(i)
            self._pending.add(key)
            self._refused.discard(key)
        self.stats["blocks_written"] += len(jobs)
        if self._writes is not None:
            self._writes.put((jobs, keys, pin))
        else:
            self._write(jobs, keys, pin)
        return written

    def _write(self, jobs: list, keys: list[str], pin: bool) -> None:
        try:
            for path, entries, meta in jobs:
                write(path, entries, meta)
        finally:
            self._pending.difference_update(m["key"] for _, _, m in jobs)
        if pin:
            for key in keys:
                self._pin_path(key).touch()
        self._touch(keys)
        if jobs:
            self.evict()

    def _writer(self) -> None:
        while True:
            job = self._writes.get()
            if job is None:  # ``close``
                self._writes.task_done()
                return
            try:
                self._write(*job)
            except OSError as e:  # a full disk, say: the blocks are simply not stored
                log.warning("prompt cache: could not write to %s: %s", self.folder, e)
            finally:
                self._writes.task_done()

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until every block saved so far is on disk (at most ``timeout`` seconds);
        whether they all are. A process about to exit calls it: the writer is a daemon
        thread, and blocks still queued would be lost, cutting the stored chain short."""
        if self._writes is None:
            return True
        done = self._writes.all_tasks_done
        with done:
            return done.wait_for(lambda: not self._writes.unfinished_tasks, timeout)

    def close(self) -> None:
        """Write what is pending, then end the writer thread (which holds this store, and so
        the model, until it ends)."""
        if self._writes is not None:
            self._writes.put(None)
            self._writes.join()
            self._writes = None

    def pin(self, tokens, namespace: str = "") -> None:
        """Mark the stored blocks of ``tokens`` as pinned (evicted after every other block)."""
        for key in block_keys(self.identity, tokens, self.block, namespace):
            if not self.path(key).exists():
                break
            self._pin_path(key).touch()

    def _touch(self, keys: list[str]) -> None:
        now = time.time()
        for j, key in enumerate(reversed(keys)):  # the root last: the newest, evicted last
            try:
                os.utime(self.path(key), (now + j * 1e-3, now + j * 1e-3))
            except OSError:
                pass  # evicted meanwhile by another process

    # -- eviction --------------------------------------------------------------------------

    @contextmanager
    def _locked(self):
        with open(self.folder / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("blk-*.safetensors"))

    def evict(self) -> int:
        """Delete least recently used blocks (pinned last) until the folder fits its bound."""
        removed = 0
        with self._locked():
            entries, now = [], time.time()
            for p in self.folder.iterdir():
                try:
                    st = p.stat()
                except OSError:
                    continue
                if p.name.startswith("blk-") and p.name.endswith(".safetensors"):
                    key = p.name[4:-12]
                    entries.append((self._pin_path(key).exists(), st.st_mtime, st.st_size, p, key))
                elif p.name.startswith(".tmp-blk-") and now - st.st_mtime > STALE_TMP_S:
                    p.unlink(missing_ok=True)
            total = sum(e[2] for e in entries)
            for pinned, _, size, p, key in sorted(entries, key=lambda e: (e[0], e[1])):
                if total <= self.max_bytes:
                    break
                p.unlink(missing_ok=True)
                self._pin_path(key).unlink(missing_ok=True)
                total -= size
                removed += 1
        self.stats["blocks_evicted"] += removed
        return removed



class DiskTier:
    """``BlockStore`` as the tier under the in-memory ``PromptCacheStore``
    (``engine/prompt_cache.py``): prompts in as text, ``PromptCache`` entries out."""

    def __init__(self, store: BlockStore, tokenizer, draft_model=None):
        self.blocks, self.tokenizer, self.draft_model = store, tokenizer, draft_model

    def lookup(self, namespace: str, text: str, longer_than: int = 0, ids: Optional[list] = None):
        """The longest stored prefix of ``text`` as a ``PromptCache`` (at least one token of
        ``text`` left to prefill), or None; ``longer_than``: characters a better entry
        already shares, so the blocks are read only when they beat it; ``ids``: ``text``'s
        ids when the caller has them (a long prompt takes a while to encode)."""
        from .prompt_cache import PromptCache

        tok = self.tokenizer
        if ids is None:
            ids = tok.encode(text, add_special_tokens=False)  # the template writes BOS itself
        block = self.blocks.block
        n = min(self.blocks.chain_length(ids, namespace), len(ids) - 1) // block * block
        prefix = tok.decode(ids[:n]) if n else ""
        if n == 0 or len(prefix) <= longer_than:
            return None  # nothing stored, or no more than memory holds: read nothing
        cache, got = self.blocks.lookup(ids, n, namespace)  # shorter if a block fails its checks
        if got != n:
            n, prefix = got, tok.decode(ids[:got])
        while n > 0 and not text.startswith(prefix):  # a character split at the end
            rewind(cache, block)
            n -= block
            prefix = tok.decode(ids[:n])
        if n == 0:
            return None
        return PromptCache(self.blocks.model, cache, text[: len(prefix)], ids[:n], draft_model=self.draft_model)

    def store(self, namespace: str, pc, pin: bool = False) -> list[tuple[int, int]]:
        """Store ``pc``'s blocks not stored yet; returns the token ranges written."""
        b = self.blocks.block
        return [(i * b, (i + 1) * b) for i in self.blocks.save_blocks(pc.tokens, pc.cache, pin=pin, namespace=namespace)]

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait for the queued writes (see ``BlockStore.flush``); a log line if some remain."""
        if self.blocks.flush(timeout):
            return True
        log.warning("prompt cache: still writing after %g s; the last blocks are not stored", timeout)
        return False


def default_folder() -> Path:
    """Where the server keeps blocks unless told otherwise: next to the models the first
    run downloads (``MLX_LFM2_HOME``, by default ``~/.cache/mlx_lfm2``)."""
    return Path(os.environ.get("MLX_LFM2_HOME", Path.home() / ".cache" / "mlx_lfm2")) / "prompt-cache"


def parse_bytes(text: str) -> int:
    """``"8G"``, ``"512M"``, ``"1000000"`` -> bytes (binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        n = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise ValueError(f"{text!r} is not a size: write e.g. 8G, 512M or a number of bytes") from None
    if n < 0:
        raise ValueError(f"{text!r}: a size cannot be negative")
    return int(n)
