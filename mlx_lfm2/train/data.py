"""Training data: mlx-lm's jsonl formats as token ids plus which tokens are trained.

A data folder holds ``train.jsonl``, ``valid.jsonl`` and ``test.jsonl`` (any may be missing);
a hub dataset id is fetched into the Hugging Face cache. Each line is one of:

* ``{"messages": [...], "tools": [...]}``: a chat rendered by the checkpoint's template
  (assistant ``tool_calls`` become LFM2 call text when the template does not render them);
* ``{"prompt": "...", "completion": "..."}``: a user turn and an assistant turn;
* ``{"text": "..."}``: plain text (EOS appended);
* ``{"prompt", "chosen", "rejected"}``: a DPO pair (``--train-mode dpo``).

``mask_prompt``: train only the assistant turns, every one of them in a multi-turn chat
(mlx-lm trains only the last): the tokens from the end of each turn's generation prompt to
the end of the turn. Bad lines are errors naming the file and line.

``Example.weights[i]`` is 1 where token ``i`` is a target (predicted from tokens ``< i``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..jsonl import objects
from ..text.tools import format_pythonic_call

SPLITS = ("train", "valid", "test")
ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A data file or line we cannot train on; the message names the file and line."""


@dataclass
class Example:
    tokens: list[int]
    weights: list[int]  # per token: 1 = trained target

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class Pair:
    """A DPO pair: the same prompt with a chosen and a rejected answer."""

    chosen: Example
    rejected: Example

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))


def read_jsonl(path: Path, limit: int = 10_000_000) -> list[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line."""
    return list(objects(path, DataError, limit))


def resolve_data(data: str) -> Path:
    """A local folder, else a hub dataset id fetched with its jsonl files."""
    path = Path(data).expanduser()
    if path.is_dir():
        return path
    if path.exists() or data.count("/") != 1 or data.startswith((".", "/", "~")):
        raise DataError(f"--data {data!r} is neither a folder with train.jsonl / valid.jsonl nor a hub dataset id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(data, repo_type="dataset", allow_patterns=["*.jsonl", "*/*.jsonl"]))
    except Exception as e:
        raise DataError(f"could not fetch dataset {data!r} from the hub ({type(e).__name__}: {e}); "
                        "pass a local folder instead") from e


def split_file(folder: Path, split: str) -> Optional[Path]:
    for f in (folder / f"{split}.jsonl", folder / "data" / f"{split}.jsonl"):
        if f.exists():
            return f
    return None


class Encoder:
    """Rows -> ``Example`` / ``Pair`` with one tokenizer and template."""

    def __init__(self, tokenizer, mask_prompt: bool = False, max_seq_length: int = 2048):
        self.tok, self.mask_prompt, self.max_len = tokenizer, mask_prompt, max_seq_length
        self.renders_tool_calls = "tool_calls" in (tokenizer.chat_template or "")

    def chat_ids(self, messages: list, tools, add_generation_prompt: bool) -> list[int]:
        return list(self.tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                                 tokenize=True))

    def chat(self, messages: list, tools, where: str) -> Example:
        messages = [self.message(m, i, where) for i, m in enumerate(messages)]
        tokens = self.chat_ids(messages, tools, False)
        if not self.mask_prompt:
            return Example(tokens, [0] + [1] * (len(tokens) - 1))
        weights = [0] * len(tokens)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(self.chat_ids(messages[:i], tools, True)) if i else 0
            end = len(self.chat_ids(messages[: i + 1], tools, False))
            if end > len(tokens) or start > end:
                raise DataError(f"{where}: the chat template does not render this conversation's turns as "
                                "prefixes of the whole; use it without --mask-prompt")
            weights[start:end] = [1] * (end - start)
        if not any(weights):
            raise DataError(f"{where}: no assistant turn to train on (--mask-prompt trains only assistant turns)")
        return Example(tokens, weights)

    def message(self, m, i: int, where: str) -> dict:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(f"{where}: messages[{i}] must be an object with a role in {ROLES}")
        content = m.get("content")
        if content is None:
            content = ""
        if not isinstance(content, (str, list)):
            raise DataError(f"{where}: messages[{i}].content must be a string or a list of parts")
        out = {**m, "content": content}
        calls = m.get("tool_calls")
        if calls and not self.renders_tool_calls:
            out.pop("tool_calls")
            out["content"] = "<|tool_call_start|>[" + ", ".join(self.call_text(c, i, where) for c in calls) + \
                "]<|tool_call_end|>" + (content if isinstance(content, str) else json.dumps(content))
        return out

    @staticmethod
    def call_text(call, i: int, where: str) -> str:
        fn = call.get("function", call) if isinstance(call, dict) else None
        args = fn.get("arguments", {}) if isinstance(fn, dict) else None
        if isinstance(args, str):
            try:
                args = json.loads(args or "{}")
            except ValueError:
                args = None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(args, dict):
            raise DataError(f"{where}: messages[{i}].tool_calls entries need a function name and JSON-object "
                            "arguments")
        return format_pythonic_call(fn["name"], args)

    def text(self, text: str) -> Example:
        tokens = self.tok.encode(text)
        eos = self.tok.eos_token_id
        if eos is not None and (not tokens or tokens[-1] != eos):
            tokens.append(eos)
        return Example(tokens, [0] + [1] * (len(tokens) - 1))

    def encode(self, row: dict, where: str):
        def need_str(*keys):
            for k in keys:
                if not isinstance(row.get(k), str):
                    raise DataError(f"{where}: {k!r} must be a string")

        tools = row.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise DataError(f"{where}: 'tools' must be a list of tool schemas")
        if "chosen" in row or "rejected" in row:
            need_str("prompt", "chosen", "rejected")
            prompt = [{"role": "user", "content": row["prompt"]}]
            pair = [self.chat(prompt + [{"role": "assistant", "content": row[k]}], tools, where)
                    for k in ("chosen", "rejected")]
            for e in pair:  # DPO scores the answer only
                e.weights = self.answer_weights(prompt, tools, e)
            return Pair(*(self.clip(e) for e in pair))
        if "messages" in row:
            if not isinstance(row["messages"], list) or not row["messages"]:
                raise DataError(f"{where}: 'messages' must be a non-empty list")
            ex = self.chat(row["messages"], tools, where)
        elif "prompt" in row or "completion" in row:
            need_str("prompt", "completion")
            ex = self.chat([{"role": "user", "content": row["prompt"]},
                            {"role": "assistant", "content": row["completion"]}], tools, where)
        elif "text" in row:
            need_str("text")
            ex = self.text(row["text"])
        else:
            raise DataError(f"{where}: a row needs 'messages', 'prompt' and 'completion', 'text', or "
                            "'prompt', 'chosen' and 'rejected'")
        return self.clip(ex)

    def answer_weights(self, prompt: list, tools, e: Example) -> list[int]:
        start = len(self.chat_ids(prompt, tools, True))
        return [0] * start + [1] * (len(e.tokens) - start)

    def clip(self, e: Example) -> Example:
        return Example(e.tokens[: self.max_len], e.weights[: self.max_len])


def load_split(folder: Path, split: str, encoder: Encoder) -> list:
    f = split_file(folder, split)
    if f is None:
        return []
    return [encoder.encode(row, f"{f}:{n}") for n, row in read_jsonl(f)]


def load_datasets(data: str, tokenizer, mask_prompt: bool = False, max_seq_length: int = 2048,
                  splits=SPLITS) -> dict:
    """``{split: [Example | Pair, ...]}`` for the splits present in the folder / dataset."""
    folder = resolve_data(data)
    encoder = Encoder(tokenizer, mask_prompt, max_seq_length)
    out = {s: load_split(folder, s, encoder) for s in splits}
    if not any(out.values()):
        raise DataError(f"{folder} holds none of {', '.join(s + '.jsonl' for s in splits)}")
    return out
