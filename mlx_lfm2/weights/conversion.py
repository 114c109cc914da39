"""Hub checkpoint -> MLX folder (optionally quantized) that mlx-lm and LM Studio load.

The conversion streams: tensors are read lazily from the source safetensors, then one
layer at a time is stacked (experts), cast, quantized, evaluated and written, so peak
memory is about one projection's experts plus one output shard, whatever the checkpoint's
size (measured: 1.97 GB converting the 47.7 GB LFM2-24B-A2B file). Output goes to a hidden
folder beside the target and is renamed into place only when complete (``output_folder``).

    python convert.py --hf-path LiquidAI/LFM2-24B-A2B --mlx-path lfm2-24b-4bit -q
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..model.config import ModelArgs
from .loader import TOKENIZER_FILES, links_outside, load_config, resolve
from ..model.blocks import Block, Model
from .publish import compatible_config, convert_command, upload_to_hub, write_model_card
from .layouts import load_group, load_safetensors, safetensors_files, to_mlx_lm_name
from .output_folder import (PROGRESS, ConversionError, check_replaceable, clean_leftovers, partial_folder, replace,
                            resume_partial, write_json)
from .quantize import MODES, RECIPES, recipe_predicate, spec

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
# round-to-nearest; activation-aware scales (weights/awq.py); GPTQ's error compensation
# (weights/gptq.py); both, AWQ's scales first
METHODS = ("rtn", "awq", "gptq", "awq-gptq")


def quant_predicate(bits: int, group_size: int, recipe: str = "uniform", mode: str = "affine") -> Callable:
    """Our-path -> False | choice dict: the per-path quantization of the fixed recipes."""
    return recipe_predicate(spec(bits, group_size, mode), recipe)


class ShardWriter:
    """Collects evaluated tensors and writes ``model-XXXXX.safetensors`` shards as they fill."""

    def __init__(self, folder: Path, max_bytes: int, shards=(), total: int = 0, on_flush=None):
        self.folder, self.max_bytes, self.on_flush = folder, max_bytes, on_flush
        self.pending: dict = {}
        self.pending_bytes = 0
        self.shards: list[dict] = list(shards)  # from a resumed run, already on disk
        self.total = total

    def add(self, tensors: dict) -> None:
        for k, v in tensors.items():
            self.pending[k] = v
            self.pending_bytes += v.nbytes
            self.total += v.nbytes
        if self.pending_bytes >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            name = f"model-{len(self.shards) + 1:05d}.safetensors"
            mx.save_safetensors(str(self.folder / name), self.pending, metadata={"format": "mlx"})
            self.shards.append({"file": name, "keys": list(self.pending)})
            self.pending, self.pending_bytes = {}, 0
            if self.on_flush:
                self.on_flush()

    def finish(self) -> None:
        self.flush()
        n = len(self.shards)
        weight_map = {}
        for i, shard in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
            os.rename(self.folder / shard["file"], self.folder / final)
            weight_map.update({k: final for k in shard["keys"]})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _groups(keys, n_layers: int) -> list[tuple[str, list[str]]]:
    """Source keys by layer (``model.layers.{i}.``), then the rest (embeddings, head)."""
    by_layer = {i: [] for i in range(n_layers)}
    rest = []
    for k in keys:
        if k.startswith("model.layers."):
            i = int(k.split(".")[2])
            if i not in by_layer:
                raise ConversionError(f"weight {k} belongs to layer {i}, but the config has {n_layers} layers")
            by_layer[i].append(k)
        else:
            rest.append(k)
    return [(f"model.layers.{i}.", ks) for i, ks in by_layer.items()] + [("", rest)]


def _convert_group(module: nn.Module, prefix: str, weights: dict, args: ModelArgs, dtype,
                   predicate: Optional[Callable], default: dict, overrides: dict, hooks=None) -> dict:
    """Load one layer's (or the globals') weights into ``module``, quantize, return mlx-lm names.

    Consumes ``weights``: afterwards the lazy source tensors live only in the graph, so each
    output tensor, evaluated on its own, frees its sources (one projection's experts at a time).
    ``hooks`` (a calibrated method, ``layerwise.LayerwiseQuantizer``) see the group before and
    after quantization.
    """
    load_group(module, prefix, weights, args, dtype)
    if hooks is not None:
        hooks.before(module, prefix)
    if predicate is not None:
        def full(path, m):
            choice = predicate(prefix + path, m)
            if isinstance(choice, dict) and choice != default:
                overrides[to_mlx_lm_name(prefix + path, args.model_type)] = recorded(choice)
            return choice

        nn.quantize(module, default["group_size"], default["bits"], mode=default["mode"], class_predicate=full)
    if hooks is not None:
        hooks.after(module, prefix)
    out = {to_mlx_lm_name(prefix + k, args.model_type): v for k, v in tree_flatten(module.parameters())}
    for v in out.values():
        mx.eval(v)
    return out


def recorded(choice: dict) -> dict:
    """A choice as config.json records it: affine ones without ``mode``, as mlx-lm writes them
    (and as loaders older than the other modes read them)."""
    return {k: v for k, v in choice.items() if not (k == "mode" and v == "affine")}


def convert(hf_path: Union[str, Path], mlx_path: Union[str, Path], quantize: bool = False,
            q_bits: Optional[int] = None, q_group_size: Optional[int] = None, dtype: str = "bfloat16",
            quant_recipe: str = "uniform", force: bool = False, revision: Optional[str] = None,
            max_shard_gb: float = 1.0, progress: bool = True, command: Optional[str] = None,
            q_mode: str = "affine", q_method: str = "rtn", target_bpw: Optional[float] = None,
            calibration: Optional[Union[str, Path]] = None, calibration_tokens: int = 1024,
            measure: bool = False) -> Path:
    """Convert a hub checkpoint (repo id or folder) into an MLX folder; returns its path.

    Quantization (``quantize``): ``q_mode`` one of ``quantize.MODES`` (bits and group size
    default to the mode's); ``q_method`` "rtn" (round-to-nearest, as ``mlx_lm.convert -q``) or
    "awq" (activation-aware scales); ``target_bpw``: sensitivity-driven bits per path under
    that many bits per weight. The calibrated ones (and ``measure``) read ``calibration``
    (a jsonl file; None: the bundled multilingual sample) and report KL on its held-out rows.
    The folder's README.md names ``command`` as how it was made (default: the equivalent
    ``convert.py`` command line).
    """
    mlx_path = Path(mlx_path).expanduser().resolve()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
    default = spec(q_bits, q_group_size, q_mode) if quantize else None
    if q_method not in METHODS:
        raise ValueError(f"unknown quantization method {q_method!r}; choose from {', '.join(METHODS)}")
    if quantize and "gptq" in q_method and default["mode"] != "affine":
        raise ValueError(f"--q-method {q_method} quantizes affine grids: use --q-mode affine (or --q-method awq)")
    calibrated = quantize and (q_method != "rtn" or target_bpw is not None or measure)
    if target_bpw is not None and not 2 < target_bpw <= 16:
        raise ValueError(f"target bits per weight must be above 2 and at most 16, not {target_bpw}")
    clean_leftovers(mlx_path)
    if mlx_path.exists() and not force:
        raise FileExistsError(f"{mlx_path} exists: pick another --mlx-path or pass --force to replace it")
    if mlx_path.exists():  # early, before any download; a local source is known already
        local = Path(hf_path).expanduser()
        check_replaceable(mlx_path, local if local.is_dir() else None)
    predicate = recipe_predicate(default, quant_recipe) if quantize else None

    src = resolve(hf_path, revision, flag="--hf-path")
    if mlx_path.exists():
        check_replaceable(mlx_path, src)  # before hours of work, and again before the swap
    _check_confined(src)
    config = load_config(src)
    args = ModelArgs.from_dict(config)
    if args.quantization:
        raise ConversionError(f"{src} is already quantized: convert from the original checkpoint")
    files = safetensors_files(src)
    source = {}
    for f in files:
        source.update(load_safetensors(f))
    hooks, plan = None, None
    if calibrated:
        from .layerwise import prepare

        hooks, predicate, plan = prepare(src, args, files, DTYPES[dtype], predicate, q_method, target_bpw,
                                         calibration, calibration_tokens, default)

    mlx_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_folder(mlx_path)
    shutil.rmtree(tmp, ignore_errors=True)
    options = dict(source=str(src), files=[[f.name, f.stat().st_size] for f in files], dtype=dtype,
                   quantize=quantize, quantization=default, recipe=quant_recipe, max_shard_gb=max_shard_gb)
    if calibrated:  # never resumed (nor resumes another run): the calibration streams are not saved
        options["run"] = os.getpid()
    state = resume_partial(mlx_path, tmp, options)
    try:
        done, added = set(state["done"]), list(state["done"])
        overrides: dict = state["overrides"]

        def checkpoint():  # after each shard: everything added so far is on disk
            write_json(tmp / PROGRESS, dict(options=options, done=added, overrides=overrides,
                                             shards=writer.shards, total=writer.total))

        writer = ShardWriter(tmp, int(max_shard_gb * 1e9), state["shards"], state["total"], checkpoint)
        groups = _groups(list(source), args.num_hidden_layers)
        total = sum(source[k].nbytes for k in source)
        with _progress(progress, total) as advance:
            for prefix, keys in groups:
                weights = {k: source.pop(k) for k in keys}
                nbytes = sum(w.nbytes for w in weights.values())
                if prefix in done:  # converted by the run we resume
                    del weights
                    advance(nbytes, prefix or "embeddings")
                    continue
                if prefix:
                    module = Block(args, int(prefix.split(".")[2]))
                else:
                    module = Model(dataclasses.replace(args, num_hidden_layers=0, layer_types=[]))
                try:
                    out = _convert_group(module, prefix, weights, args, DTYPES[dtype], predicate,
                                         default, overrides, hooks)
                except (RuntimeError, ValueError) as e:
                    raise ConversionError(f"converting {prefix or 'embeddings/head'} failed: {e}") from e
                del weights, module
                added.append(prefix)
                writer.add(out)
                del out
                advance(nbytes, prefix or "embeddings")
        writer.finish()
        (tmp / PROGRESS).unlink(missing_ok=True)
        _write_config(tmp, config, dtype, default, overrides)
        params = sum(v.size for v in load_sizes(files))
        quality = dict(method=_method_name(q_method, target_bpw), bits_per_weight=writer.total * 8 / params,
                       **(hooks.result if hooks else {}),
                       **({"calibration": hooks.calib.source} if hooks else {}))
        _write_card(tmp, src, hf_path, mlx_path, default, dtype, quant_recipe, revision, command, quality,
                    dict(q_method=q_method, target_bpw=target_bpw, calibration=calibration, measure=measure))
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copyfile(src / name, tmp / name)
        if mlx_path.exists():  # it may have appeared or changed while we converted
            if not force:
                raise FileExistsError(f"{mlx_path} appeared during the conversion: not replacing it")
            check_replaceable(mlx_path, src)
        replace(tmp, mlx_path)
    except (KeyboardInterrupt, SystemExit):
        if not (tmp / PROGRESS).exists():  # nothing worth resuming yet
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return mlx_path


def _check_confined(src: Path) -> None:
    """Refuse a source whose files (read, or copied into the output) link outside it."""
    names = ["config.json", "model.safetensors.index.json", *TOKENIZER_FILES]
    outside = links_outside(src, [src / n for n in names])
    outside = outside or links_outside(src, safetensors_files(src))
    if outside:
        raise ConversionError(f"{outside[0]} resolves to {outside[0].resolve()}, outside the source "
                              f"folder {src}: copy the file into the folder to convert it")


def load_sizes(files) -> list:
    """The source tensors (lazy: only their shapes are read)."""
    return [w for f in files for w in load_safetensors(f).values()]


def _method_name(method: str, target_bpw: Optional[float]) -> str:
    return method if target_bpw is None else f"dynamic-{method}" if method != "rtn" else "dynamic"


def _write_config(folder: Path, config: dict, dtype: str, default: Optional[dict], overrides: dict) -> None:
    config = {k: v for k, v in compatible_config(config).items() if k not in ("quantization", "quantization_config")}
    config["torch_dtype"] = dtype
    if default:
        q = {**default, **dict(sorted(overrides.items()))}
        config["quantization"] = q
        config["quantization_config"] = q
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _write_card(folder: Path, src: Path, hf_path, mlx_path, default, dtype, recipe, revision, command, quality,
                method: dict) -> None:
    config = json.loads((folder / "config.json").read_text())
    command = command or convert_command(hf_path, mlx_path, default, dtype, recipe, revision, **method)
    write_model_card(folder, Path(mlx_path).name, src, hf_path, config, config.get("quantization"), recipe, dtype,
                     command, quality if default else None)


class _progress:
    """A rich progress bar over source bytes (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda n, what: None
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn)

        self.bar = Progress(TextColumn("[bold]converting[/] {task.description}"), BarColumn(),
                            DownloadColumn(), TimeRemainingColumn())
        self.bar.start()
        task = self.bar.add_task("", total=self.total)
        return lambda n, what: self.bar.update(task, advance=n, description=what)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()


def main(argv=None) -> None:
    from ..command import parser

    p = parser("mlx_lfm2.weights.conversion", "Convert an LFM2 checkpoint (a hub repo or a folder) into an MLX folder "
               "in mlx-lm's layout, optionally quantized, with a model card: mlx_lfm2, mlx-lm and LM Studio load it.")
    p.add_argument("--hf-path", required=True, help="hub repo id or local folder")
    p.add_argument("--mlx-path", required=True, help="output folder")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize (default 4-bit affine, group 64)")
    p.add_argument("--q-mode", default="affine", choices=list(MODES),
                   help="affine: 2-8 bits, groups 32/64/128; mxfp4 (group 32), nvfp4 (group 16): 4-bit floats; "
                        "mxfp8: 8-bit floats (group 32)")
    p.add_argument("--q-bits", type=int, choices=[2, 3, 4, 5, 6, 8],
                   help="bits per quantized weight (default: 4); mxfp4/nvfp4 take 4, mxfp8 8")
    p.add_argument("--q-group-size", type=int, choices=[16, 32, 64, 128],
                   help="weights sharing one scale (default: 64); mxfp4/mxfp8 take 32, nvfp4 16")
    p.add_argument("--quant-recipe", default="uniform", choices=sorted(RECIPES),
                   help="uniform: all at --q-bits; mixed_6/mixed_8: experts at --q-bits, the rest at 6/8")
    p.add_argument("--q-method", default="rtn", choices=METHODS,
                   help="rtn: round to nearest (as mlx_lm.convert -q); awq: activation-aware scales fitted on "
                        "calibration text, per expert; gptq: rounding error compensated from calibration "
                        "Hessians, per expert; awq-gptq: both (the best; affine mode)")
    p.add_argument("--target-bpw", type=float,
                   help="sensitivity-driven mixed precision: choose each weight's bits from calibration so the "
                        "model averages this many bits per weight (e.g. 4.5)")
    p.add_argument("--calibration", help="jsonl of {\"text\": ...} or {\"messages\": [...]} rows for "
                                         "awq/--target-bpw (default: a bundled sample in the model's 9 languages)")
    p.add_argument("--calibration-tokens", type=int, default=1024, help="calibration tokens to read")
    p.add_argument("--measure-kl", action="store_true",
                   help="measure KL(unquantized || quantized) on held-out calibration text for the model card")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="dtype of the weights not quantized")
    p.add_argument("--revision", help="hub revision: branch, tag or commit (default: main)")
    p.add_argument("--max-shard-gb", type=float, default=1.0,
                   help="output shard size; conversion holds at most one shard in memory")
    p.add_argument("--force", action="store_true", help="replace an existing --mlx-path")
    p.add_argument("--upload-repo", help="then upload the folder to this hub repo (created if needed)")
    p.add_argument("--private", action="store_true", help="with --upload-repo: create the repo private")
    a = p.parse_args(argv)
    command = shlex.join(["python", "convert.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        out = convert(a.hf_path, a.mlx_path, a.quantize, a.q_bits, a.q_group_size, a.dtype, a.quant_recipe,
                      a.force, a.revision, a.max_shard_gb, command=command, q_mode=a.q_mode, q_method=a.q_method,
                      target_bpw=a.target_bpw, calibration=a.calibration, calibration_tokens=a.calibration_tokens,
                      measure=a.measure_kl)
    except (FileNotFoundError, FileExistsError, ValueError, ConversionError) as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {out}")
    if a.upload_repo:
        try:
            print(f"uploaded to {upload_to_hub(out, a.upload_repo, a.private)}")
        except Exception as e:  # auth, network, a repo of someone else's
            raise SystemExit(f"error: upload to {a.upload_repo} failed ({type(e).__name__}: {e}); the folder "
                             f"is complete at {out}: retry with `hf upload {a.upload_repo} {out}`")


if __name__ == "__main__":
    main()
