"""``load(path_or_repo_id) -> (model, tokenizer)``: local folders and hub repos."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx

from ..model import device
from ..model.config import ConfigError, ModelArgs
from ..model.blocks import Model
from .layouts import load_into, safetensors_files

# What a model folder needs; nothing else is downloaded.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt"]
# The text side of a model folder, copied along by conversion.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "generation_config.json",
)


def resolve(path_or_repo: Union[str, Path], revision: Optional[str] = None) -> Path:
    """A local folder as is; otherwise a hub repo id fetched (or found in the HF cache)."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(
            f"{name!r} is neither a model folder nor a hub repo id like 'LiquidAI/LFM2-24B-A2B'"
        )
    from huggingface_hub import snapshot_download  # only when we really go to the hub

    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:
        raise FileNotFoundError(
            f"could not fetch {name!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Check the repo id and your network, or pass a local folder."
        ) from e


def load_config(folder: Path) -> dict:
    f = folder / "config.json"
    if not f.exists():
        raise FileNotFoundError(f"{folder} has no config.json: is this a model folder?")
    try:
        return json.loads(f.read_text())
    except ValueError as e:
        raise ConfigError(f"{f} is not valid JSON: {e}") from e


def default_compute_dtype(args: ModelArgs) -> Optional[mx.Dtype]:
    """float32 activations for quantized models on the CPU backend; the weights' dtype elsewhere."""
    return device.compute_dtype(bool(args.quantization))


def load_model(folder: Union[str, Path], dtype: Optional[mx.Dtype] = None, lazy: bool = False,
               compute_dtype: Union[mx.Dtype, None, str] = "auto") -> Model:
    folder = Path(folder)
    args = ModelArgs.from_dict(load_config(folder))
    model = Model(args)
    load_into(model, safetensors_files(folder), args, dtype=dtype)
    model.compute_dtype = default_compute_dtype(args) if compute_dtype == "auto" else compute_dtype
    if device.fuse_gate_up():
        model.fuse_gate_up(evaluate=not lazy)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model


def load(path_or_repo: Union[str, Path], dtype: Optional[mx.Dtype] = None, lazy: bool = False,
         revision: Optional[str] = None, compute_dtype: Union[mx.Dtype, None, str] = "auto"):
    """Load a model folder or hub repo; returns ``(model, tokenizer)``.

    ``dtype`` casts floating weights (the router's expert_bias stays float32); ``lazy``
    leaves weights unread until first used; ``compute_dtype`` sets the activation dtype
    ("auto": ``default_compute_dtype``).
    """
    from ..text.tokenizer import load_tokenizer

    folder = resolve(path_or_repo, revision)
    model = load_model(folder, dtype=dtype, lazy=lazy, compute_dtype=compute_dtype)
    tokenizer = load_tokenizer(folder, model.args)
    check_vocab(tokenizer, model.args.vocab_size, folder)
    return model, tokenizer


def check_vocab(tokenizer, rows: int, folder: Path) -> None:
    """The tokenizer's ids against the embedding's rows: stop ids must fit; a larger vocabulary
    is allowed (the extra ids are refused per prompt, by ``check_token_ids``) but said once."""
    bad = sorted(i for i in tokenizer.eos_token_ids if not 0 <= i < rows)
    if bad:
        raise ConfigError(f"{folder}: stop token ids {bad} are outside the model's {rows} embedding rows "
                          "(check eos_token_id in generation_config.json / config.json)")
    if tokenizer.vocab_size > rows:
        warnings.warn(f"{folder}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                      f"{rows} embedding rows; text that encodes to ids >= {rows} will be refused",
                      stacklevel=3)
