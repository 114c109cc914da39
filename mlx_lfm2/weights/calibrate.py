"""Calibration text for the calibrated quantizers, as token batches.

The text comes from the bundled multilingual sample (``data/calibration.jsonl``: original
paragraphs in the model's nine languages, English, Arabic, Chinese, French, German, Japanese,
Korean, Spanish and Portuguese, interleaved so that any prefix covers all of them) or from a
user's jsonl file, one object a line: ``{"text": "..."}`` or ``{"messages": [{"role", "content"}...]}``
(chat rows are calibrated on their contents joined by newlines). Files are read a line at a time
and only until enough tokens are collected; a bad row stops with its file and line.

Every fourth row (rows 3, 7, 11, ...) is held out: the calibration never sees it and the
KL(unquantized || quantized) written to the model card is measured on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

from ..jsonl import objects

BUNDLED = Path(__file__).parent / "data" / "calibration.jsonl"
HELD_OUT_EVERY = 4


class CalibrationError(ValueError):
    """Calibration text that cannot be used; the message names the file and line."""


@dataclass
class CalibrationSet:
    calibration: np.ndarray  # [B, L] token ids the quantizers are fitted on
    held_out: np.ndarray  # [B2, L2] ids never seen by them, for the reported KL
    source: str  # "bundled" or the file's path


def rows(path: Union[str, Path]) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line of a jsonl file, validated as it is read."""
    for n, row in objects(path, CalibrationError):
        yield n, _row_text(row, f"{path}:{n}")


def _row_text(row: dict, where: str) -> str:
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise CalibrationError(f"{where}: \"text\" must be a non-empty string")
        return row["text"]
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise CalibrationError(f"{where}: expected a JSON object with \"text\" (a string) or \"messages\" "
                               "(a list of {\"role\", \"content\"})")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
            raise CalibrationError(f"{where}: messages[{i}] must be an object with string \"role\" and \"content\"")
    return "\n".join(m["content"] for m in messages)


def load_calibration(tokenizer, vocab_size: int, path: Optional[Union[str, Path]] = None,
                     tokens: int = 1024, held_out_tokens: int = 512, seq_len: int = 256) -> CalibrationSet:
    """Token batches from ``path`` (None: the bundled sample), read only as far as needed."""
    source = Path(path) if path is not None else BUNDLED
    fit, held = [], []
    for i, (line, text) in enumerate(rows(source)):
        ids = tokenizer.encode(text)
        if ids and max(ids) >= vocab_size:
            raise CalibrationError(f"{source}:{line}: the tokenizer gives id {max(ids)}, beyond the model's "
                                   f"{vocab_size} embedding rows (is this the model's own tokenizer?)")
        (held if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else fit).extend(ids)
        if len(fit) >= tokens and len(held) >= held_out_tokens:
            break
    batches = []
    for ids, want, what in ((fit, tokens, "calibration"), (held, held_out_tokens, "held-out")):
        ids = ids[:want]
        L = min(seq_len, len(ids))
        if L < 16:
            raise CalibrationError(f"{source}: too little text: {len(ids)} {what} tokens (every "
                                   f"{HELD_OUT_EVERY}th row is held out); give at least a few dozen rows")
        batches.append(np.array(ids[: len(ids) // L * L], dtype=np.int32).reshape(-1, L))
    return CalibrationSet(batches[0], batches[1], "bundled" if path is None else str(source))
