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


def write(path, arrays: dict, metadata: Optional[dict] = None, checksum: bool = True) -> int:
    """Write ``arrays`` (name -> mx.array) and string ``metadata`` atomically; returns the size.

    ``checksum`` adds ``sha256`` of the data section to the metadata.
    """
    path = Path(path)
    mx.eval(list(arrays.values()))
    header, blobs, at = {}, [], 0
    for name, a in arrays.items():
        raw = _raw(a)
        header[name] = {"dtype": dtype_name(a), "shape": list(a.shape), "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    if checksum:
        h = hashlib.sha256()
        for b in blobs:
            h.update(b)
        meta["sha256"] = h.hexdigest()
    header["__metadata__"] = meta
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data section starts 8-aligned, as the format advises
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head)
            for b in blobs:
                f.write(b)
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
