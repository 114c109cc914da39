"""Safetensors files of cache arrays, read without trusting them and written atomically.

Cache files come from outside the process (a disk cache folder another process shares, a
saved chat, mlx-lm's ``--prompt-cache-file``), and MLX does not bounds-check what it is
handed, so nothing here passes a file to ``mx.load``. ``SafeTensors.open`` parses the
header itself: a sane header length, known dtypes, every tensor's byte range inside the
file, sized exactly by its shape, the ranges tiling the data section with no gap or
overlap. The caller then checks names, shapes and dtypes against what its model expects
(``expect``) before ``arrays()`` reads any data, which a ``sha256`` metadata entry, when
present, must match. Writes go to a temporary file in the same folder, then ``os.replace``:
a reader sees a whole file or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from ..model.cache import ConvCache, KVCache

MAX_HEADER = 16 << 20  # bytes of JSON header; ours are a few KiB, mlx-lm's too
# safetensors dtype name -> (numpy dtype of the raw bytes, MLX dtype)
DTYPES = {"F32": (np.float32, mx.float32), "F16": (np.float16, mx.float16), "BF16": (np.uint16, mx.bfloat16),
          "U32": (np.uint32, mx.uint32), "I32": (np.int32, mx.int32)}
NAMES = {m: n for n, (_, m) in DTYPES.items()}


class CacheFileError(ValueError):
    """A cache file that is not what it claims (truncated, corrupted, foreign or hostile)."""


def dtype_name(a: mx.array) -> str:
    if a.dtype not in NAMES:
        raise CacheFileError(f"cannot store arrays of {a.dtype}")
    return NAMES[a.dtype]


def _raw(a: mx.array) -> bytes:
    if a.dtype == mx.bfloat16:  # numpy has no bfloat16: move the bits
        a = a.view(mx.uint16)
    return np.array(a).tobytes()


def serialize(arrays: dict) -> list[tuple[str, str, tuple, bytes]]:
    """``(name, dtype, shape, raw bytes)`` per array: the device work of a write, done by
    the caller's thread (MLX arrays stay on the thread that made them)."""
    mx.eval(list(arrays.values()))
    return [(name, dtype_name(a), tuple(a.shape), _raw(a)) for name, a in arrays.items()]


def write(path, arrays, metadata: Optional[dict] = None, checksum: bool = True) -> int:
    """Write ``arrays`` (name -> mx.array, or ``serialize``'s list) and string ``metadata``
    atomically; returns the file's size. ``checksum`` adds ``sha256`` of the data section."""
    path = Path(path)
    entries = serialize(arrays) if isinstance(arrays, dict) else arrays
    header, at = {}, 0
    for name, dtype, shape, raw in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, at + len(raw)]}
        at += len(raw)
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    if checksum:
        h = hashlib.sha256()
        for *_, raw in entries:
            h.update(raw)
        meta["sha256"] = h.hexdigest()
    header["__metadata__"] = meta
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data section starts 8-aligned, as the format advises
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head)
            for *_, raw in entries:
                f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return 8 + len(head) + at


class SafeTensors:
    """A parsed, structurally valid safetensors file: ``tensors`` (name -> (dtype, shape)),
    ``metadata``; ``arrays()`` reads the data (checksum first, when there is one)."""

    def __init__(self, path: Path, data: bytes, start: int, tensors: dict, ranges: dict, metadata: dict):
        self.path, self._data, self._start = path, data, start
        self.tensors, self._ranges, self.metadata = tensors, ranges, metadata

    @classmethod
    def open(cls, path) -> "SafeTensors":
        path = Path(path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise CacheFileError(f"cannot read {path}: {e}") from e
        if len(data) < 8:
            raise CacheFileError(f"{path} is truncated ({len(data)} bytes)")
        (n,) = struct.unpack("<Q", data[:8])
        if n > MAX_HEADER or 8 + n > len(data):
            raise CacheFileError(f"{path}: header of {n} bytes does not fit a {len(data)}-byte file")
        try:
            header = json.loads(data[8 : 8 + n])
        except (UnicodeDecodeError, ValueError) as e:
            raise CacheFileError(f"{path}: unreadable header ({e})") from e
        if not isinstance(header, dict):
            raise CacheFileError(f"{path}: the header is not an object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CacheFileError(f"{path}: metadata must map names to strings")
        tensors, ranges = {}, {}
        for name, t in header.items():
            tensors[name], ranges[name] = _check_tensor(path, name, t)
        spans = sorted(ranges.values())
        at = 0
        for a, b in spans:  # the ranges tile the data section exactly
            if a != at:
                raise CacheFileError(f"{path}: tensor data overlaps or leaves a gap at byte {a}")
            at = b
        if 8 + n + at != len(data):
            raise CacheFileError(f"{path} is {len(data)} bytes, its header describes {8 + n + at}")
        return cls(path, data, 8 + n, tensors, ranges, metadata)

    def expect(self, want: dict) -> None:
        """Refuse the file unless its tensors are exactly ``want`` (name -> (dtype, shape))."""
        if self.tensors != want:
            extra = sorted(set(self.tensors) ^ set(want))[:4]
            bad = [k for k in want if k in self.tensors and self.tensors[k] != want[k]][:2]
            detail = (f"tensors {extra} unexpected or missing" if extra else
                      "; ".join(f"{k} is {self.tensors[k]}, expected {want[k]}" for k in bad))
            raise CacheFileError(f"{self.path} does not fit this model: {detail}")

    def verify(self) -> None:
        want = self.metadata.get("sha256")
        if want is not None and hashlib.sha256(memoryview(self._data)[self._start :]).hexdigest() != want:
            raise CacheFileError(f"{self.path}: checksum mismatch (the file is corrupted)")

    def int_scalar(self, name: str) -> int:
        """An I32 scalar's value, read without MLX (check its entry first)."""
        a, _ = self._ranges[name]
        return int(np.frombuffer(self._data, "<i4", count=1, offset=self._start + a)[0])

    def arrays(self) -> dict:
        self.verify()
        out = {}
        for name, (dtype, shape) in self.tensors.items():
            a, b = self._ranges[name]
            raw = np.frombuffer(self._data, DTYPES[dtype][0], offset=self._start + a,
                                count=(b - a) // np.dtype(DTYPES[dtype][0]).itemsize)
            arr = mx.array(raw.reshape(shape))
            out[name] = arr.view(mx.bfloat16) if dtype == "BF16" else arr
        return out


def _check_tensor(path, name, t) -> tuple:
    if not isinstance(t, dict) or set(t) != {"dtype", "shape", "data_offsets"}:
        raise CacheFileError(f"{path}: tensor {name!r:.40} has a malformed entry")
    dtype, shape, offsets = t["dtype"], t["shape"], t["data_offsets"]
    if dtype not in DTYPES:
        raise CacheFileError(f"{path}: tensor {name!r:.40} has dtype {dtype!r:.20}, expected one of {sorted(DTYPES)}")
    ok_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 48  # noqa: E731
    if not isinstance(shape, list) or len(shape) > 8 or not all(map(ok_int, shape)):
        raise CacheFileError(f"{path}: tensor {name!r:.40} has a malformed shape")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(ok_int, offsets)) or offsets[0] > offsets[1]:
        raise CacheFileError(f"{path}: tensor {name!r:.40} has malformed offsets")
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype][0]).itemsize
    if offsets[1] - offsets[0] != size:
        raise CacheFileError(f"{path}: tensor {name!r:.40} holds {offsets[1] - offsets[0]} bytes, its shape needs {size}")
    return (dtype, tuple(shape)), tuple(offsets)


# -- a model cache as named arrays: "k.i"/"v.i" (attention layer i's K/V rows) and "c.i@o"
# (conv layer i's state at offset o). ``layout`` says what this model's arrays look like,
# ``cache_spec`` what a file must then hold, before any of its data is read.

def layout(model) -> list[tuple]:
    """Per layer, what its arrays look like in this process: ``("kv", dtype, H, Dk, Dv)`` or
    ``("conv", dtype, K - 1, D)``, from one token through a fresh cache."""
    cache = model.make_cache()
    model(mx.array([[0]], dtype=mx.uint32), cache=cache)
    out = []
    for c in cache:
        if isinstance(c, KVCache):
            k, v = c.state
            out.append(("kv", dtype_name(k), k.shape[1], k.shape[3], v.shape[3]))
        else:
            (s,) = c.state
            out.append(("conv", dtype_name(s), s.shape[1], s.shape[2]))
    return out


def cache_spec(layout: list, rows: int, conv_at: list[int]) -> dict:
    """name -> (dtype, shape) of ``rows`` K/V positions and the conv states at ``conv_at``."""
    want = {}
    for i, spec in enumerate(layout):
        if spec[0] == "kv":
            _, dt, H, dk, dv = spec
            want[f"k.{i}"], want[f"v.{i}"] = (dt, (1, H, rows, dk)), (dt, (1, H, rows, dv))
        else:
            _, dt, k1, d = spec
            want.update({f"c.{i}@{o}": (dt, (1, k1, d)) for o in conv_at})
    return want


def cache_slice(cache: list, start: int, end: int, conv_at: list[int]) -> Optional[dict]:
    """The arrays of positions ``[start, end)`` and the conv states at ``conv_at`` (each
    the current offset or a kept checkpoint); None if the cache does not hold them all."""
    out = {}
    for i, c in enumerate(cache):
        if isinstance(c, KVCache):
            if c.keys is None or c.offset < end:
                return None
            out[f"k.{i}"], out[f"v.{i}"] = c.keys[..., start:end, :], c.values[..., start:end, :]
            continue
        for o in conv_at:
            state = c.conv_state if c.offset == o else c.checkpoints.get(o)
            if state is None:
                return None  # this offset's state was not kept
            out[f"c.{i}@{o}"] = state
    return out


def cache_from_arrays(layout: list, arrays: dict, n: int, conv_at: list[int]) -> list:
    """A cache holding ``n`` tokens from arrays that passed ``cache_spec`` (``n`` in ``conv_at``:
    the conv states there; the others become checkpoints)."""
    cache = []
    for i, spec in enumerate(layout):
        if spec[0] == "kv":
            cache.append(KVCache.from_state((arrays[f"k.{i}"], arrays[f"v.{i}"]), n))
        else:
            c = ConvCache.from_state((arrays[f"c.{i}@{n}"],), n)
            c.checkpoints = {o: arrays[f"c.{i}@{o}"] for o in conv_at}
            cache.append(c)
    return cache


# -- mlx-lm's prompt-cache files (``mlx_lm.cache_prompt``, ``mlx_lm.generate --prompt-cache-file``)
# mlx-lm flattens ``[c.state for c in cache]``: a KVCache is ``(keys, values, offset)`` ("i.0",
# "i.1", "i.2"; older files lack the offset), an LFM2 conv layer an ArraysCache ``([state],
# None, None)`` ("i.0.0", "i.1", "i.2"); the metadata flattens ``[user metadata, class names,
# scalar markers]`` into "0.*", "1.*" and "2.*" keys.
MLX_LM_CLASSES = {"KVCache": "kv", "ArraysCache": "conv"}
FLOATS = ("F32", "F16", "BF16")


def save_mlx_lm(path, cache: list, metadata: Optional[dict] = None) -> int:
    arrays, meta, scalars = {}, {f"0.{k}": str(v) for k, v in (metadata or {}).items()}, []
    for i, c in enumerate(cache):
        if isinstance(c, KVCache):
            arrays[f"{i}.0"], arrays[f"{i}.1"] = c.state
            arrays[f"{i}.2"] = mx.array(c.offset, dtype=mx.int32)
            scalars.append((f"{i}.2", "scalar"))
        else:
            arrays[f"{i}.0.0"] = c.conv_state
            for j in (1, 2):  # left_padding, lengths: None
                arrays[f"{i}.{j}"] = mx.array([], dtype=mx.float32)
                scalars.append((f"{i}.{j}", "none"))
        meta[f"1.{i}"] = "KVCache" if isinstance(c, KVCache) else "ArraysCache"
    meta["2.0"] = ""
    for j, (name, kind) in enumerate(scalars, start=1):
        meta[f"2.{j}.0"], meta[f"2.{j}.1"] = name, kind
    return write(path, arrays, meta, checksum=False)  # a top-level key would break mlx-lm's reader


def load_mlx_lm(path, layout: list, max_tokens: int) -> tuple[list, dict]:
    """A cache from an mlx-lm prompt-cache file, checked against ``layout`` (see
    ``disk_cache.layout``) before any array is read; returns ``(cache, user metadata)``."""
    f = SafeTensors.open(path)
    classes = [f.metadata.get(f"1.{i}") for i in range(len(layout))]
    kinds = [MLX_LM_CLASSES.get(c) for c in classes]
    if kinds != [spec[0] for spec in layout] or f"1.{len(layout)}" in f.metadata:
        raise CacheFileError(f"{path} holds caches {classes}, this model's layers need "
                             f"{['KVCache' if s[0] == 'kv' else 'ArraysCache' for s in layout]}")
    want, offsets = {}, []
    for i, spec in enumerate(layout):
        if spec[0] == "kv":
            _, _, H, dk, dv = spec
            got = f.tensors.get(f"{i}.0", ("?", ()))
            T = got[1][2] if len(got[1]) == 4 else -1
            if not 0 <= T <= max_tokens or got[0] not in FLOATS:
                raise CacheFileError(f"{path}: layer {i} keys are {got}, expected [1, {H}, T, {dk}] floats")
            want[f"{i}.0"], want[f"{i}.1"] = (got[0], (1, H, T, dk)), (got[0], (1, H, T, dv))
            if f"{i}.2" in f.tensors:
                want[f"{i}.2"] = ("I32", ())
                offsets.append(f.int_scalar(f"{i}.2") if f.tensors[f"{i}.2"] == ("I32", ()) else -1)
            else:
                offsets.append(T)
            if not 0 <= offsets[-1] <= T:
                raise CacheFileError(f"{path}: layer {i} offset {offsets[-1]} is outside its {T} positions")
        else:
            _, _, k1, d = spec
            got = f.tensors.get(f"{i}.0.0", ("?", ()))
            want[f"{i}.0.0"] = (got[0] if got[0] in FLOATS else "F32", (1, k1, d))
            for j in (1, 2):
                if f"{i}.{j}" in f.tensors:
                    want[f"{i}.{j}"] = ("F32", (0,))
    f.expect(want)
    if len(set(offsets)) > 1:
        raise CacheFileError(f"{path}: its layers hold different numbers of tokens {sorted(set(offsets))}")
    n = offsets[0] if offsets else 0
    arrays, cache = f.arrays(), []
    for i, spec in enumerate(layout):
        dt = DTYPES[spec[1]][1]
        if spec[0] == "kv":
            k, v = (arrays[f"{i}.{j}"][..., :n, :].astype(dt) for j in (0, 1))
            cache.append(KVCache.from_state((k, v), n))
        else:
            cache.append(ConvCache.from_state((arrays[f"{i}.0.0"].astype(dt),), n))
    user = {k[2:]: v for k, v in f.metadata.items() if k.startswith("0.")}
    return cache, user


# -- a conversation's cache (chat.py /save): every position, and the conv states at the
# checkpoints (turn ends, block boundaries) so a loaded chat can still rewind to them.

def save_session(path, cache: list, metadata: dict) -> int:
    n = cache[0].offset if cache else 0
    conv = [c for c in cache if isinstance(c, ConvCache)]
    kept = set.intersection(*(set(c.checkpoints) for c in conv)) if conv else set()
    conv_at = sorted({o for o in kept if 0 < o < n} | ({n} if n else set()))
    arrays = cache_slice(cache, 0, n, conv_at) if n else {}
    if arrays is None:
        raise ValueError("this cache does not hold every position it has seen")
    return write(path, arrays, {**metadata, "conv_at": json.dumps(conv_at)})


def session_cache(f: SafeTensors, layout: list, n: int) -> list:
    """The cache of a saved session of ``n`` tokens, its arrays checked before they are read."""
    try:
        conv_at = json.loads(f.metadata.get("conv_at", "null"))
    except ValueError:
        conv_at = None
    ok = (isinstance(conv_at, list) and all(type(o) is int and 0 < o <= n for o in conv_at)
          and conv_at == sorted(set(conv_at)) and len(conv_at) <= ConvCache.max_checkpoints + 1
          and (n == 0) == (not conv_at) and (n == 0 or conv_at[-1] == n))
    if not ok:
        raise CacheFileError(f"{f.path}: its list of conv states is malformed")
    f.expect(cache_spec(layout, n, conv_at) if n else {})
    if n == 0:
        return [KVCache() if s[0] == "kv" else ConvCache() for s in layout]
    return cache_from_arrays(layout, f.arrays(), n, conv_at)
