"""The output folder of a conversion: what ``--force`` may replace, and how it is replaced.

A conversion writes into a hidden folder beside the target, ``.NAME.partial-PID``, renamed into
place only when complete; an old target (``--force``) is first renamed ``.NAME.old-PID`` and
removed only after the swap. Nothing here deletes what a conversion did not write:

* ``check_replaceable``: ``--force`` replaces only a folder that is recognisably a converted
  LFM2 model (the files in ``MODEL_FOLDER_FILES``), never the source, the working folder, the
  home folder or a folder holding one of them;
* ``clean_leftovers``: folders a killed run left (its PID no longer running) are put back (an
  old target whose replacement never arrived) or removed (partial output that cannot resume);
* ``resume_partial``: a killed run's partial folder with a ``PROGRESS`` file and the same
  options is adopted, so the conversion continues where it stopped.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional


class ConversionError(RuntimeError):
    pass


# What a folder written by this tool or by mlx-lm holds; --force replaces nothing else.
MODEL_FOLDER_FILES = (
    "config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "*.jinja", "generation_config.json", "README.md",
    ".DS_Store",
)
PROGRESS = "progress.json"  # in a partial folder: what a killed run can resume from


def partial_folder(target: Path) -> Path:
    """Where this process writes ``target``'s content until it is complete."""
    return target.parent / f".{target.name}.partial-{os.getpid()}"


def check_replaceable(target: Path, source: Optional[Path] = None) -> None:
    """Raise ConversionError unless ``--force`` may delete ``target``: an existing folder that
    is recognisably a converted LFM2 model, and neither the source, an ancestor of it, the
    working folder, the home folder nor one of their ancestors."""
    target = target.resolve()
    protected = [(Path.cwd().resolve(), "the current folder"), (Path.home().resolve(), "your home folder")]
    if source is not None:
        protected.insert(0, (source.resolve(), "the source checkpoint"))
    for place, what in protected:
        if target == place:
            raise ConversionError(f"refusing to replace {target}: it is {what}")
        if target in place.parents:
            raise ConversionError(f"refusing to replace {target}: it contains {what} ({place})")
    if not target.is_dir():
        raise ConversionError(f"refusing to replace {target}: it is not a folder")
    entries = list(target.iterdir())
    unexpected = [p.name for p in entries
                  if not p.is_file() or not any(fnmatch.fnmatch(p.name, pat) for pat in MODEL_FOLDER_FILES)]
    if unexpected:
        raise ConversionError(f"refusing to replace {target}: it holds files a converted model does not "
                              f"({', '.join(sorted(unexpected)[:5])}); move them or pick another --mlx-path")
    try:
        model_type = json.loads((target / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if model_type not in ("lfm2", "lfm2_moe") or not any(p.suffix == ".safetensors" for p in entries):
        raise ConversionError(f"refusing to replace {target}: it is not an LFM2 model folder "
                              "(config.json with model_type lfm2/lfm2_moe and *.safetensors)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _leftovers(target: Path, kinds: str):
    """``(path, kind)`` of the folders beside ``target`` that a run no longer running left."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.({kinds})-(\d+)")
    for p in sorted(target.parent.iterdir()):
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and not _pid_alive(int(m.group(2))):
            yield p, m.group(1)


def clean_leftovers(target: Path) -> None:
    """Folders a killed conversion left beside ``target`` (``.NAME.partial-PID``,
    ``.NAME.old-PID``, PID no longer running): partial output is removed unless it can be
    resumed (it has a ``PROGRESS`` file: ``convert`` resumes or removes it); an old target
    that never got replaced is put back first if the target is missing."""
    if not target.parent.is_dir():
        return
    for p, kind in _leftovers(target, "partial|old"):
        if kind == "old" and not target.exists():
            os.rename(p, target)
        elif not (p / PROGRESS).exists():
            shutil.rmtree(p, ignore_errors=True)


def resume_partial(target: Path, tmp: Path, options: dict) -> dict:
    """Adopt a killed run's partial folder for ``target`` if it converted the same source with
    the same options (it becomes ``tmp``); others are removed. Returns what it had done."""
    fresh, adopted = dict(done=[], overrides={}, shards=[], total=0), False
    for p, _ in _leftovers(target, "partial"):
        if p == tmp:
            continue
        try:
            state = json.loads((p / PROGRESS).read_text())
            usable = state["options"] == options and all((p / s["file"]).exists() for s in state["shards"])
        except (OSError, ValueError, KeyError, TypeError):
            usable = False
        if usable and not adopted:
            os.rename(p, tmp)
            fresh, adopted = {k: state[k] for k in fresh}, True
        else:
            shutil.rmtree(p, ignore_errors=True)
    tmp.mkdir(exist_ok=True)
    return fresh


def write_json(path: Path, value) -> None:
    """``path`` holds ``value`` as JSON, atomically (a reader sees the old file or the new one)."""
    part = path.with_suffix(".tmp")
    part.write_text(json.dumps(value))
    os.replace(part, path)


def replace(tmp: Path, target: Path) -> None:
    """Move the finished folder into place; an old target (--force) goes only after."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
