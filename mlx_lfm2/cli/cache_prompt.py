"""``python -m mlx_lfm2.cache_prompt``: prefill a prompt once, save its cache (mlx-lm's command).

Same flags and file as ``mlx_lm.cache_prompt``: the prompt becomes an unfinished user message
of the chat template (or plain text without one), its cache is written in mlx-lm's format
(``engine.cache_files.save_mlx_lm``), and ``mlx_lm.generate --prompt-cache-file F`` or ours
continues it with a question. The file also records this model's digest, so our readers
refuse a file made from other weights (mlx-lm ignores the entry).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..text.chat_template import split_template  # noqa: F401  (cli.generate uses it from here)


def parse_args(argv=None):
    from ..command import parser

    p = parser("mlx_lfm2.cache_prompt", "Prefill a prompt once and save its cache, to be continued by "
               "mlx_lfm2.generate or mlx_lm.generate --prompt-cache-file (mlx_lm.cache_prompt's flags and file).")
    p.add_argument("--model", default="mlx_model", help="model folder or hub repo id")
    p.add_argument("--prompt-cache-file", required=True, help="the file to save the prompt cache in")
    p.add_argument("--prompt", required=True, help="message to be processed by the model ('-' reads stdin)")
    p.add_argument("--trust-remote-code", action="store_true", help="accepted for mlx-lm's scripts (no effect)")
    p.add_argument("--eos-token", help="end of sequence token, recorded for mlx_lm.generate")
    p.add_argument("--prefill-step-size", type=int, help="prompt tokens per prefill chunk (default: the device's)")
    for flag in ("--adapter-path", "--max-kv-size", "--kv-bits"):
        p.add_argument(flag, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def cached_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """What mlx-lm caches: the prompt as an unfinished user message (or plain text)."""
    if not tokenizer.chat_template:
        return tokenizer.encode(prompt, add_special_tokens=True)
    before, _ = split_template(tokenizer, [{"role": "user", "content": prompt}], False)
    return tokenizer.encode(before + prompt, add_special_tokens=False)


def main(argv=None) -> None:
    args = parse_args(argv)
    for flag in ("adapter_path", "max_kv_size", "kv_bits"):
        if getattr(args, flag) is not None:
            raise SystemExit(f"error: --{flag.replace('_', '-')} is not supported by mlx_lfm2.cache_prompt")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    import mlx.core as mx

    from ..engine.cache_files import save_mlx_lm
    from ..engine.disk_cache import model_digest
    from ..engine.decode import prefill
    from ..weights.loader import load

    try:
        model, tokenizer = load(args.model)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    ids = cached_prompt_ids(tokenizer, prompt)
    cache, start = model.make_cache(), time.perf_counter()
    prefill(model, mx.array(ids, dtype=mx.uint32), cache, args.prefill_step_size)
    print(f"Processed {len(ids):6d} tokens ({len(ids) / (time.perf_counter() - start):6.2f} tok/s)")
    print(f"Peak memory: {mx.get_peak_memory() / 1e9:.3f} GB")
    print("Saving...")
    config = {"trust_remote_code": args.trust_remote_code}
    if args.eos_token is not None:
        config["eos_token"] = args.eos_token
    meta = {"model": args.model, "tokenizer_config": json.dumps(config),
            "mlx_lfm2_model": model_digest(model, tokenizer)}
    try:
        save_mlx_lm(args.prompt_cache_file, cache, meta)
    except OSError as e:
        raise SystemExit(f"error: cannot write {args.prompt_cache_file}: {e}")


if __name__ == "__main__":
    main()
