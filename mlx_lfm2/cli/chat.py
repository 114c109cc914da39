"""``python chat.py``: a streaming chat REPL (rich) over ``session.Chat``.

With no ``--model`` it uses the largest LFM2 model that fits this machine (LFM2-24B-A2B where
it does), fetched and converted once to 4-bit into a local cache. The REPL is ``cli/repl.py``.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import time
from importlib.machinery import SourceFileLoader
from pathlib import Path

from rich.markup import escape

from .repl import HELP, Repl, loaded_line

DEFAULT_REPO = "LiquidAI/LFM2-24B-A2B"
HOME = Path(os.environ.get("MLX_LFM2_HOME", Path.home() / ".cache" / "mlx_lfm2"))

SAMPLING = "default: the model card's, from generation_config.json"


def parse_args(argv=None):
    from ..command import named_adapter, parser
    from ..weights.provision import ASK_GB

    p = parser("mlx_lfm2.cli.chat", "Chat with an LFM2 model in the terminal: replies stream as Markdown, the "
               "conversation's cache is kept between turns, the model may call your tools (--tools).\n"
               "With no --model, the first run picks the largest LFM2 that fits this machine, asks before "
               f"a download over {ASK_GB:g} GB, and converts it once to 4-bit in {HOME}.", epilog=HELP)
    p.add_argument("--model", help=f"model folder or hub repo id (default: {DEFAULT_REPO} at 4 bits where it fits this "
                   "machine's memory, else LFM2-8B-A1B)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-tokens", type=int, default=2048, help="longest reply, in tokens")
    p.add_argument("--temperature", type=float, help=f"sampling temperature, 0 for greedy ({SAMPLING})")
    p.add_argument("--top-p", type=float, help=f"nucleus sampling mass ({SAMPLING})")
    p.add_argument("--top-k", type=int, help=f"sample among the k likeliest tokens ({SAMPLING})")
    p.add_argument("--min-p", type=float, help=f"drop tokens below this fraction of the top one's probability ({SAMPLING})")
    p.add_argument("--repetition-penalty", type=float, help=f"penalty on tokens already in the context ({SAMPLING})")
    p.add_argument("--seed", type=int, help="PRNG seed (default: random)")
    p.add_argument("--tools", type=Path, help="a Python file whose public functions the model may call")
    p.add_argument("--no-markdown", action="store_true", help="print replies as plain text")
    p.add_argument("--json-schema", type=Path, metavar="FILE",
                   help="a JSON schema file: every reply is JSON that validates against it")
    p.add_argument("--draft-model", help="a small LFM2 with the same tokenizer for speculative decoding")
    p.add_argument("--adapter-path", help="a LoRA/DoRA adapter folder (mlx-lm's layout or PEFT's) to apply")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", type=named_adapter,
                   help="a LoRA adapter kept resident to switch to with /adapter NAME (repeat for more)")
    p.add_argument("--num-draft-tokens", type=int, help="tokens drafted per step (default: adaptive from 3)")
    p.add_argument("--prompt-lookup", action="store_true",
                   help="speculative decoding with drafts from n-grams of the conversation (no draft model)")
    p.add_argument("--prompt-cache-file", type=Path, metavar="FILE",
                   help="start from a saved chat (/save) or a prompt cached by mlx_lm.cache_prompt or "
                   "mlx_lfm2.cache_prompt: the first message continues its cached text")
    p.add_argument("--yes", action="store_true",
                   help=f"download a model over {ASK_GB:g} GB without asking (needed when stdin is not a terminal)")
    return p.parse_args(argv)


def default_model(console, yes: bool = False) -> Path:
    """The largest LFM2 model that fits this machine (see ``weights/provision.py``), fetched
    and converted on first use: experts at 4 bits, the rest at 8 (recipe mixed_8)."""
    from ..weights import provision

    entry, line = provision.choose_default(provision.machine())
    console.print(line, markup=False)
    note = provision.cpu_note(entry)
    if note:
        console.print(note, style="yellow", markup=False)
    return provision.provision(entry, HOME, console, confirm=_confirm(console), yes=yes, command=yes_command())


def check_model(console, name: str, yes: bool = False) -> None:
    """``--model``: the same memory check as the default, as a warning; a hub repo not yet in
    the cache is a download, confirmed first when large."""
    from ..weights import provision

    path = Path(name).expanduser()
    size = provision.local_weights_gb(path) if path.is_dir() else provision.hub_weights_gb(name)
    warning = size and provision.fit_warning(name, size, provision.machine())
    if warning:
        console.print(warning, style="yellow", markup=False)
    if size and not path.is_dir():
        provision.confirm_download(name, provision.missing_gb(name, size), _confirm(console), yes, yes_command())


def yes_command() -> str:
    """This command line with ``--yes``: what confirms a download when nobody can be asked."""
    import shlex
    import sys

    from ..command import invocation

    return shlex.join([*invocation("mlx_lfm2.cli.chat"), *(a for a in sys.argv[1:] if a != "--yes"), "--yes"])


def _confirm(console):
    import sys

    if not sys.stdin.isatty():
        return None  # never ask (or delete) without a person at the keyboard
    return lambda question: console.input(escape(question)).strip().lower() in ("y", "yes")


def load_tools(path: Path) -> dict:
    """Public functions defined in a Python file (their docstrings describe them to the model)."""
    if not path.exists():
        raise SystemExit(f"error: no tools file at {path}")
    if not path.is_file():
        raise SystemExit(f"error: --tools takes a Python file, and {path} is a folder")
    spec = importlib.util.spec_from_file_location(path.stem, path, loader=SourceFileLoader(path.stem, str(path)))
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's code: whatever it raises, say where and stop cleanly
        raise SystemExit(f"error: importing the tools file {path} failed: {type(e).__name__}: {e}") from None
    return {name: fn for name, fn in vars(module).items()
            if inspect.isfunction(fn) and fn.__module__ == module.__name__ and not name.startswith("_")}


def read_schema(path: Path, tokenizer) -> dict:
    """A JSON schema file, checked (compiled once) before the first turn."""
    import json

    from ..text.constraints import ConstraintError, make_constraint

    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
        make_constraint(tokenizer, json_schema=schema)
    except OSError as e:
        raise SystemExit(f"error: cannot read the schema: {e}")
    except (ValueError, ConstraintError) as e:
        raise SystemExit(f"error: {path} is not a usable JSON schema: {e}")
    return schema


def main(argv=None) -> None:
    t0 = time.perf_counter()
    args = parse_args(argv)
    from rich.console import Console

    console = Console(highlight=False)
    tools = load_tools(args.tools) if args.tools else {}
    from ..weights.loader import load, load_draft
    from ..engine.distributed import from_leader, group, leader
    from ..engine.generation import default_sampling
    from ..engine.sample import SamplingParams
    from ..engine.session import Chat

    t_load = time.perf_counter()
    if group() is not None and not args.model:
        raise SystemExit("error: under mlx.launch pass --model (the same folder on every machine)")
    try:
        if args.model:
            check_model(console, args.model, args.yes)
        source = args.model or default_model(console, args.yes)
        from ..command import adapters_by_name

        named = adapters_by_name(args.adapter)
        model, tokenizer = load(source, adapter_path=args.adapter_path, adapters=named or None)
    except (OSError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}")
    load_s = time.perf_counter() - t_load
    if group() is not None:  # mlx.launch: rank 0 reads and prints, the others follow its input
        console.input = lambda *a, **k: from_leader(Console.input, console, *a, **k)
        console.quiet = not leader()
    sampling = {k: v for k, v in dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                      min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                                      seed=args.seed).items() if v is not None}
    if args.json_schema:
        sampling["json_schema"] = read_schema(args.json_schema, tokenizer)
    sampling = SamplingParams(**default_sampling(model)).replace(**sampling)  # parsed once, here
    try:
        draft = load_draft(args.draft_model, model, args.prompt_lookup)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: draft model: {e}")
    chat = Chat(model, tokenizer, system=args.system, tools=list(tools.values()) or None, draft_model=draft,
                num_draft_tokens=args.num_draft_tokens, prompt_lookup=args.prompt_lookup, sampling=sampling)
    startup = time.perf_counter() - t0 - load_s
    console.print(f"[bold]mlx_lfm2[/] · {escape(args.model or Path(source).name)} · weights {load_s:.1f}s · "
                  f"start-up {startup:.2f}s · /help for commands"
                  + (f" · tools: {escape(', '.join(tools))}" if tools else "")
                  + (f" · replies follow {escape(str(args.json_schema))}" if args.json_schema else ""))
    repl = Repl(chat, console, tools, markdown=not args.no_markdown, max_tokens=args.max_tokens)
    repl.model_name = str(source)
    if args.prompt_cache_file:
        try:
            chat.load(args.prompt_cache_file, repl.model_name)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --prompt-cache-file: {e}")
        console.print(f"[dim]{loaded_line(chat, str(args.prompt_cache_file))}[/]")
    repl.run()


if __name__ == "__main__":
    main()
