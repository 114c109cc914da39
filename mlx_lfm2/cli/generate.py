"""``python -m mlx_lfm2.generate``: one completion from the command line, in mlx-lm's shape.

Same flags and output as ``mlx_lm.generate`` (the completion between ``==========`` lines,
then ``Prompt: N tokens, X tokens-per-sec``, ``Generation: ...``, ``Peak memory: X GB``),
so scripts written for it work here. Defaults are mlx-lm's too (greedy, 100 tokens), so the
same command gives directly comparable output; the model-card sampling is in ``chat.py``.
"""

from __future__ import annotations

import sys

SEPARATOR = "=" * 10


def str2bool(text: str) -> bool:
    return text.lower() not in ("false", "f")


def parse_args(argv=None):
    from ..command import parser, positive_int

    p = parser("mlx_lfm2.generate", "One completion from an LFM2 model, printed with its speed and memory: "
               "mlx_lm.generate's flags, defaults (greedy, 100 tokens) and output, so the same command line runs both.")
    p.add_argument("--model", required=True, help="model folder or hub repo id")
    p.add_argument("--prompt", "-p", default="hello", help="message for the model ('-' reads stdin)")
    p.add_argument("--system", "--system-prompt", dest="system", help="system prompt for the chat template")
    p.add_argument("--max-tokens", "-m", type=int, default=100, help="maximum number of tokens to generate")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below this fraction of the top one's (0: off)")
    p.add_argument("--repetition-penalty", type=float, help="penalty on tokens already in the context (default: off)")
    p.add_argument("--seed", type=int, help="PRNG seed (default: random)")
    p.add_argument("--ignore-chat-template", action="store_true",
                   help="use the raw prompt without the tokenizer's chat template")
    p.add_argument("--extra-eos-token", nargs="+", default=None, help="more tokens that end generation")
    p.add_argument("--prefill-step-size", type=positive_int, help="prompt tokens per prefill chunk (default: the device's)")
    p.add_argument("--draft-model", help="a small LFM2 with the same tokenizer for speculative decoding")
    p.add_argument("--adapter-path", help="a LoRA/DoRA adapter folder (mlx-lm's layout or PEFT's) to apply")
    p.add_argument("--num-draft-tokens", type=int, help="tokens drafted per step (default: adaptive from 3)")
    p.add_argument("--prompt-lookup", action="store_true",
                   help="speculative decoding with drafts from n-grams of the prompt (no draft model)")
    p.add_argument("--prompt-cache-file", help="continue a prompt cached by cache_prompt (ours or mlx-lm's): "
                   "the prompt is appended to the cached user message")
    p.add_argument("--verbose", type=str2bool, default=True,
                   help="'False'/'F': print only the completion, no separators or stats")
    return p.parse_args(argv)


def read_stdin() -> str:
    """The prompt piped in, as UTF-8 text (undecodable bytes: a clear exit, not a traceback)."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: the prompt on stdin is not UTF-8 text (byte {e.start} is "
                         f"{data[e.start:e.start + 1]!r}): convert it first, e.g. with iconv -t UTF-8") from None


def build_prompt(tokenizer, prompt: str, system, ignore_chat_template: bool) -> list[int]:
    """Token ids as mlx-lm builds them: the chat template unless asked not to (or absent)."""
    if ignore_chat_template or not tokenizer.chat_template:
        return tokenizer.encode(prompt, add_special_tokens=True)
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    messages.append({"role": "user", "content": prompt})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)  # the template writes BOS itself


def continue_cached(model, tokenizer, args, prompt: str):
    """mlx-lm's ``--prompt-cache-file``: the cache (validated) and the ids that follow it, the
    rest of a user message whose start is cached."""
    from ..engine.cache_files import CacheFileError, load_mlx_lm
    from ..engine.cache_files import layout
    from ..engine.disk_cache import model_digest
    from .cache_prompt import split_template

    try:
        cache, meta = load_mlx_lm(args.prompt_cache_file, layout(model), model.args.max_position_embeddings)
    except (CacheFileError, OSError) as e:
        raise SystemExit(f"error: --prompt-cache-file: {e}")
    if meta.get("mlx_lfm2_model", model_digest(model, tokenizer)) != model_digest(model, tokenizer):
        raise SystemExit(f"error: {args.prompt_cache_file} was made with other weights than {args.model}")
    if args.ignore_chat_template or not tokenizer.chat_template:
        return cache, tokenizer.encode(prompt, add_special_tokens=False)
    messages = ([{"role": "system", "content": args.system}] if args.system is not None else [])
    _, after = split_template(tokenizer, messages + [{"role": "user", "content": prompt}], True)
    return cache, tokenizer.encode(prompt + after, add_special_tokens=False)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.max_tokens < 1:
        raise SystemExit("error: --max-tokens must be at least 1")
    prompt = args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    from ..engine.distributed import group, leader

    if prompt == "-" and group() is not None:
        raise SystemExit("error: --prompt - cannot be used under mlx.launch, which forwards stdin but "
                         "never closes it: pass the prompt as --prompt TEXT")
    prompt = read_stdin() if prompt == "-" else prompt
    from ..engine.generation import stream_generate
    from ..engine.sample import SamplingParams
    from ..weights.loader import load, load_draft

    try:
        model, tokenizer = load(args.model, adapter_path=args.adapter_path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    for token in args.extra_eos_token or ():
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is None:
            raise SystemExit(f"error: --extra-eos-token {token!r} is not a token of this tokenizer")
        tokenizer.eos_token_ids = tokenizer.eos_token_ids | {tid}
    try:
        draft = load_draft(args.draft_model, model, args.prompt_lookup)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: draft model: {e}")
    cache = None
    if args.prompt_cache_file:
        cache, ids = continue_cached(model, tokenizer, args, prompt)
    else:
        ids = build_prompt(tokenizer, prompt, args.system, args.ignore_chat_template)
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p, top_k=args.top_k,
                              min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    speculative = dict(draft_model=draft, num_draft_tokens=args.num_draft_tokens, prompt_lookup=args.prompt_lookup)

    show = leader()  # under mlx.launch rank 0 alone prints the completion; every rank its stats
    if args.verbose and show:
        print(SEPARATOR)
    text, last = "", None
    try:
        for r in stream_generate(model, tokenizer, ids, sampling=sampling, prefill_step_size=args.prefill_step_size,
                                 cache=cache, **speculative):
            if args.verbose and show:
                print(r.text, end="", flush=True)
            text += r.text
            last = r
    except ValueError as e:  # a prompt over the context, say
        raise SystemExit(f"error: {e}")
    if not args.verbose:
        if show:
            print(text)
        return
    if show:
        print()
        print(SEPARATOR)
    if not text:
        if show:
            print("No text generated for this prompt")
        return
    print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec")
    print(f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec")
    print(f"Peak memory: {last.peak_memory:.3f} GB")


if __name__ == "__main__":
    main()
