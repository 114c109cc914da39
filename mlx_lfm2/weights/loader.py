"""``load(path_or_repo_id) -> (model, tokenizer)``: local folders and hub repos."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx

from ..model import device
from ..model.config import ConfigError, ModelArgs
from ..model.blocks import Model
from ..model.layers import specialize
from ..model.pipeline import PipelineModel, launched, layer_of, plan_stages, read_header
from .hub import hub_error
from .layouts import load_into, safetensors_files

# What a model folder needs; nothing else is downloaded.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt"]
# The text side of a model folder, copied along by conversion.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "generation_config.json",
)


def resolve(path_or_repo: Union[str, Path], revision: Optional[str] = None, flag: str = "--model") -> Path:
    """A local folder as is; otherwise a hub repo id fetched (or found in the HF cache).
    ``flag``: the command's option for a folder, named in the hub's error (``hub.hub_error``)."""
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
        raise hub_error(name, e, flag) from e


def links_outside(folder: Path, paths) -> list[Path]:
    """Those of ``paths`` (names in ``folder``) that resolve outside it: symlinks out, ``../``.
    A hub snapshot's links into its repo's ``blobs/`` count as inside (the repo cache is the root)."""
    folder = Path(folder).resolve()
    root = folder.parent.parent if folder.parent.name == "snapshots" else folder
    return [Path(p) for p in paths if os.path.lexists(p) and not Path(p).resolve().is_relative_to(root)]


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
               compute_dtype: Union[mx.Dtype, None, str] = "auto",
               pipeline: Optional[bool] = None, adapter_path: Union[str, Path, None] = None,
               fuse: Optional[bool] = None, adapters: Optional[dict] = None) -> Model:
    """``pipeline``: this rank's stage of the model (see ``model.pipeline``); None: when launched
    by ``mlx.launch`` with more than one process. ``adapter_path``: an adapter folder (mlx-lm's
    layout or PEFT's, see ``weights.adapters``) added to the model, which then stays unfused.
    ``fuse``: the fused runtime layout (None: ``device.fuse_matmuls()``; training wants False).
    ``adapters``: ``{name: folder}`` kept resident side by side, chosen per batch row
    (``model.lora_rows``; ``{}``: none yet, more added later), the model unfused and uncompiled."""
    if adapters is not None and adapter_path is not None:
        raise ValueError("give one adapter to apply (adapter_path) or several to keep resident (adapters), not both")
    folder = Path(folder)
    args = ModelArgs.from_dict(load_config(folder))
    if pipeline or (pipeline is None and launched()):
        model = load_stage(folder, args, dtype)
    else:
        model = Model(args)
        load_into(model, safetensors_files(folder), args, dtype=dtype)
    model.compute_dtype = default_compute_dtype(args) if compute_dtype == "auto" else compute_dtype
    if adapter_path is not None:
        from .adapters import load_adapters

        load_adapters(model, adapter_path)
    # The device's layer variants; a model with adapters stays unfused (LoRA wraps q/k/v, w1/w3).
    resident = adapters is not None
    specialize(model, evaluate=not lazy, fuse=False if adapter_path is not None or resident else fuse,
               compile_=False if resident else None)
    if resident:
        from ..model.lora_rows import attach
        from .adapters import add_resident

        aset = attach(model)
        aset.reserve(len(adapters))  # stacks made once at their size, not grown load by load
        for name, path in adapters.items():
            add_resident(aset, name, path)
    if not lazy:
        mx.eval(model.parameters())
    model.sync_ranks()  # a pipeline: wait for the slowest rank's load before any recv
    model.eval()
    return model


_SAFETENSORS_DTYPES = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}


def load_stage(folder: Path, args: ModelArgs, dtype: Optional[mx.Dtype] = None, group=None) -> PipelineModel:
    """This rank's pipeline stage: only the shards and tensors of its layers are opened."""
    group = group or mx.distributed.init()
    files = safetensors_files(folder)
    headers = {f: read_header(f) for f in files}
    stages = plan_stages({k: h for hs in headers.values() for k, h in hs.items()}, args, group.size())
    # The activations' dtype (without compute_dtype) is the embedding's output dtype: every
    # rank must know it to receive them, so it comes from the header, not from the tensor.
    embed = {k.rsplit(".", 1)[1]: h for hs in headers.values() for k, h in hs.items() if "embed_tokens" in k}
    wire = dtype or _SAFETENSORS_DTYPES[embed.get("scales", embed["weight"])["dtype"]]
    model = PipelineModel(args, group, stages, wire)
    owned, first, last = model.owned, model.is_first, model.is_last

    def keep(key: str) -> bool:
        i = layer_of(key)
        if i is not None:
            return i in owned
        if "embed_tokens" in key:
            return first or (last and args.tie_word_embeddings)
        return last  # final norm, untied head

    load_into(model, [f for f in files if any(map(keep, headers[f]))], args, dtype=dtype, keep=keep)
    return model


def load(path_or_repo: Union[str, Path], dtype: Optional[mx.Dtype] = None, lazy: bool = False,
         revision: Optional[str] = None, compute_dtype: Union[mx.Dtype, None, str] = "auto",
         pipeline: Optional[bool] = None, adapter_path: Union[str, Path, None] = None,
         fuse: Optional[bool] = None, adapters: Optional[dict] = None):
    """Load a model folder or hub repo; returns ``(model, tokenizer)``.

    ``dtype`` casts floating weights (the router's expert_bias stays float32); ``lazy``
    leaves weights unread until first used; ``compute_dtype`` sets the activation dtype
    ("auto": ``default_compute_dtype``); ``pipeline`` loads only this rank's layers (default:
    whenever ``mlx.launch`` started several processes; False opts out); ``adapter_path`` adds
    a LoRA/DoRA adapter folder (mlx-lm's layout or PEFT's); ``adapters`` ``{name: folder}``
    keeps several LoRAs resident, chosen per batch row (``model.lora_rows``).
    """
    from ..text.tokenizer import load_tokenizer

    folder = resolve(path_or_repo, revision)
    model = load_model(folder, dtype=dtype, lazy=lazy, compute_dtype=compute_dtype, pipeline=pipeline,
                       adapter_path=adapter_path, fuse=fuse, adapters=adapters)
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


def load_draft(path: Optional[Union[str, Path]], target, prompt_lookup: bool = False):
    """The draft model for speculative decoding (None without ``path``): an LFM2 sharing the
    target's tokenizer, so every id one produces is a row of the other's embedding."""
    if path is None:
        return None
    if prompt_lookup:
        raise ValueError("a draft model and prompt lookup exclude each other: pick one")
    draft = load_model(resolve(path), pipeline=False)  # drafting is off under the pipeline anyway
    if draft.args.vocab_size != target.args.vocab_size:
        raise ValueError(f"its vocabulary ({draft.args.vocab_size}) differs from the target's "
                         f"({target.args.vocab_size}): use a draft with the same tokenizer")
    return draft
