"""Reading a user's jsonl file (training data, calibration text): one JSON object a line.

A leaf module (standard library only) that the training and the conversion readers share:
rows stream as they are read, each error names ``file:line``, and the caller says which
exception type its users see.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional, Type


def objects(path, error: Type[Exception] = ValueError, limit: Optional[int] = None) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` of each non-blank line of ``path``, validated as it is read
    (the file opens, each line is UTF-8 holding a JSON object; at most ``limit`` rows), or
    ``error`` naming the file and the line."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from e
    count = 0
    with f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise error(f"{path}:{n}: not UTF-8 text") from None
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise error(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise error(f"{path}:{n}: expected a JSON object on each line, not {type(row).__name__}")
            count += 1
            if limit is not None and count > limit:
                raise error(f"{path}: more than {limit} rows")
            yield n, row
