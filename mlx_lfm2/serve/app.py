"""The server: ``python -m mlx_lfm2.server --model PATH_OR_REPO [--model NAME=PATH ...]``
(OpenAI, Anthropic and Ollama APIs).

Assembly only; each job has its module:

* ``models``: the served models by name, loaded on first use, unloaded to a budget or when idle;
* ``scheduler``: the worker thread that owns a loaded model (continuous batching, or one job at
  a time for speculative decoding and ``mlx.launch``), the job queue, the prompt caches;
* ``service``: what both APIs do with a request (auth, model names, prepare, the reply assembler);
* ``adapters``: resident adapters by name (``--adapter``), hot load and unload;
* ``openai`` (request models in ``openai_api``), ``responses`` (OpenAI's Responses API) and
  ``anthropic``: one module per API, each an app with its own routes and error shape;
* ``boundary``: the HTTP error type, bodies, validation, disconnects, the uvicorn server.

Limits (see README, "Security model", and ``boundary``): bodies are JSON of bounded size read
within a deadline, every value is validated before it reaches the worker, a reply is at most
``default_max_tokens`` unless the request asks for more (never past the context), and a client
that leaves stops its job.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..command import adapters_by_name, named_adapter
from ..engine.distributed import group, leader
from ..engine.memory import budget_bytes
from . import anthropic, ollama, openai, responses
from .adapters import DEFAULT_MAX_ADAPTERS, AdapterTable, routes as adapter_routes
from .admission import Admission
from .boundary import BODY_TIMEOUT, HEADER_TIMEOUT, make_server
from .metrics import Metrics, Observer, configure
from .models import DEFAULT_LOAD_TIMEOUT, Holds, Models
from .outbox import MAX_ITEMS, STALL_TIMEOUT
from .scheduler import DEFAULT_MAX_TOKENS, Scheduler
from .service import Service


def create_app(served, api_key: Optional[str] = None, body_timeout: float = BODY_TIMEOUT, log=None,
               adapters: Optional[AdapterTable] = None):
    """The ASGI app: each API's app under its path prefix (OpenAI's takes the rest, ``/health``,
    ``/metrics`` and the adapter routes), over one service, each request logged (``log(line)``,
    default the ``mlx_lfm2.server`` logger) and counted. ``served``: the models
    (``models.Models``), or one model's ``Scheduler``. ``adapters``: the table behind
    ``/v1/load_lora_adapter`` (default: one with hot loading off, on a model loaded at startup)."""
    models = served if isinstance(served, Models) else Models.single(served)
    service = Service(models, api_key, body_timeout)
    loaded = models.loaded()
    adapters = adapters or (AdapterTable(loaded[0].scheduler) if loaded else None)
    metrics = Metrics(models)

    async def health(request: Request):
        import mlx.core as mx

        loaded = models.loaded()
        first = scheduler_health(loaded[0].scheduler) if loaded else {}
        return JSONResponse({"status": "ok", **first, "models": {e.name: scheduler_health(e.scheduler) for e in loaded},
                             "mlx_active_mb": round(mx.get_active_memory() / 2**20, 1),
                             "mlx_cache_mb": round(mx.get_cache_memory() / 2**20, 1)})

    routes = (Route("/health", health, methods=["GET"]), Route("/metrics", metrics.endpoint(), methods=["GET"]),
              *(adapter_routes(service, adapters) if adapters is not None else ()))
    return Holds(Observer(ByPrefix(openai.app(service, routes=routes),
                                   {anthropic.PREFIX: anthropic.app(service), responses.PREFIX: responses.app(service),
                                    ollama.PREFIX: ollama.app(service)}),
                          metrics, log), models)


def scheduler_health(s: Scheduler) -> dict:
    """One loaded model's part of ``/health``."""
    return {"queued": s.jobs.qsize(), **s.stats, "batch": s.batch.status, "cached_prompts": len(s.caches),
            "prompt_cache_disk": dict(s.disk.blocks.stats) if s.disk else None,
            "adapters": s.adapters.loaded if s.adapters is not None else None,
            "memory": s.admission.status(s.reserved, s.held is not None) if s.admission is not None else None}


class ByPrefix:
    """Requests whose path is a prefix (or under it) go to that prefix's app, the rest to
    ``default``; lifespan events go to ``default``."""

    def __init__(self, default, prefixed: dict):
        self.default, self.prefixed = default, prefixed

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        for prefix, app in self.prefixed.items():
            if path == prefix or path.startswith(prefix + "/"):
                return await app(scope, receive, send)
        return await self.default(scope, receive, send)


def disk_tier(a, model, tokenizer, draft):
    """The disk prompt cache the flags ask for (None: memory only, and under mlx.launch,
    whose ranks hold parts of the model). Several models share the folder (blocks are keyed
    by the model)."""
    from ..engine.disk_cache import BlockStore, DiskTier, default_folder

    if a.prompt_cache_limit == 0 or group() is not None:
        return None
    folder = a.prompt_cache_dir or default_folder()
    try:
        return DiskTier(BlockStore(folder, model, tokenizer, a.prompt_cache_limit, background=True), tokenizer, draft)
    except OSError as e:
        raise OSError(f"--prompt-cache-dir {folder}: {e} (choose another folder, "
                      "or --prompt-cache-bytes 0 for a memory-only cache)") from e


def served_name(model: str, given: Optional[str] = None) -> str:
    """The model's id in the API: a name, never a local path (which would tell every client
    where the server's files live): ``--served-model-name``, a folder's name, or the repo id."""
    if given:
        return given
    path = os.path.expanduser(model)
    return os.path.basename(os.path.normpath(os.path.abspath(path))) if os.path.exists(path) else model


def model_paths(models: list[str], models_dir: Optional[str], given: Optional[str] = None) -> dict:
    """``--model`` (``NAME=PATH``, or a folder or repo id named by ``served_name``) and every
    model folder (one with a config.json) under ``--models-dir`` -> ``{name: path}``, in order."""
    pairs = []
    for m in models:
        name, sep, path = m.partition("=")
        if sep and name and "/" not in name and not os.path.exists(os.path.expanduser(m)):
            pairs.append((name, path))
        else:
            pairs.append((served_name(m, given), m))
    if models_dir:
        folder = Path(models_dir).expanduser()
        if not folder.is_dir():
            raise ValueError(f"--models-dir {models_dir}: not a folder")
        pairs += [(d.name, str(d)) for d in sorted(folder.iterdir()) if (d / "config.json").is_file()]
    paths: dict = {}
    for name, path in pairs:
        if name in paths:
            raise ValueError(f"two models are named {name!r} ({paths[name]} and {path}): "
                             "name one of them with --model NAME=PATH")
        paths[name] = path
    if not paths:
        raise ValueError(f"--models-dir {models_dir}: no model folders (folders with a config.json) in it")
    return paths


def build_scheduler(a, name: str, path: str) -> Scheduler:
    """Load the model at ``path`` and its scheduler, as the flags ``a`` say (OSError, ValueError)."""
    from ..weights.loader import load, load_draft

    model, tokenizer = load(path, adapter_path=a.adapter_path, adapters=a.resident_adapters)
    try:
        draft = load_draft(a.draft_model, model, a.prompt_lookup)
    except (OSError, ValueError) as e:
        raise ValueError(f"draft model: {e}") from e
    scheduler = Scheduler(model, tokenizer, name, a.queue_size, a.cache_entries, a.max_context, a.default_max_tokens,
                          a.max_batch, draft, a.prompt_lookup, a.num_draft_tokens, disk_tier(a, model, tokenizer, draft),
                          a.stall_timeout, a.max_buffered_tokens)
    scheduler.admission = Admission(model, a.memory_budget, scheduler.max_context, scheduler.caches)
    return scheduler


def check_single_model_flags(a, paths: dict) -> None:
    """The flags that serve one model, and the adapters' (``a.resident_adapters``: the
    ``--adapter`` folders by name, {} for ``--adapter-dir`` alone, None without)."""
    named = adapters_by_name(a.adapter)
    resident = bool(named) or a.adapter_dir is not None
    if len(paths) > 1 and (a.served_model_name or a.draft_model or a.adapter_path or a.prompt_lookup or resident):
        raise SystemExit("error: --served-model-name, --draft-model, --adapter-path, --prompt-lookup, --adapter and "
                         "--adapter-dir serve one model: name several with --model NAME=PATH")
    if len(paths) > 1 and group() is not None:
        raise SystemExit("error: under mlx.launch the server serves one model")
    if resident and (a.adapter_path or a.draft_model or a.prompt_lookup or group() is not None):
        raise SystemExit("error: --adapter/--adapter-dir serve adapters side by side in one batch: they exclude "
                         "--adapter-path, speculative decoding and mlx.launch")
    if a.adapter_dir is not None and not os.path.isdir(os.path.expanduser(a.adapter_dir)):
        raise SystemExit(f"error: --adapter-dir {a.adapter_dir}: not a folder")
    if len(named) > a.max_adapters:
        raise SystemExit(f"error: {len(named)} --adapter given, more than --max-adapters {a.max_adapters}")
    if next(iter(paths)) in named:
        raise SystemExit("error: an --adapter has the base model's name: give it another (or --served-model-name)")
    a.resident_adapters = named if resident else None


def registry(a) -> Models:
    """The served models from the flags; the first ``--model`` loaded now (a folder that does
    not load is an error at startup, as with one model), the rest on first use. A model
    serving adapters stays loaded (the adapter table is its scheduler's)."""
    from ..engine.disk_cache import parse_bytes

    try:
        a.prompt_cache_limit = parse_bytes(a.prompt_cache_bytes)
        paths = model_paths(a.model or [], a.models_dir, a.served_model_name)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    check_single_model_flags(a, paths)
    models = Models(paths, lambda name, path: build_scheduler(a, name, path), a.max_loaded_models, a.memory_budget,
                    a.idle_unload, a.load_timeout)
    models.max_context = a.max_context  # /api/show of a model not loaded
    if a.model:
        name = next(iter(paths))
        try:
            models.adopt(name, build_scheduler(a, name, paths[name]), pinned=a.resident_adapters is not None)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: {e}")
    return models


def arguments(argv=None):
    from ..command import non_negative_float, parser, positive_int

    p = parser("mlx_lfm2.server", "Serve LFM2 models over HTTP: the OpenAI API (/v1/chat/completions, "
               "/v1/completions, /v1/responses, /v1/models), the Anthropic Messages API (/v1/messages) and "
               "Ollama's (/api/chat, /api/generate), with continuous batching.")
    p.add_argument("--model", action="append", help="model folder or hub repo id, or NAME=PATH; repeat it to serve "
                   "several (the first loads at startup, the others on first use)")
    p.add_argument("--models-dir", help="serve every model folder under DIR by its folder name (loaded on first use)")
    p.add_argument("--max-loaded-models", type=positive_int, help="models loaded at once (default: as the budget allows)")
    p.add_argument("--idle-unload", type=non_negative_float, metavar="SECONDS",
                   help="unload a model idle this long (default: never; a request's keep_alive overrides it)")
    p.add_argument("--load-timeout", type=non_negative_float, default=DEFAULT_LOAD_TIMEOUT, metavar="SECONDS",
                   help=f"how long a request waits for its model to load (default {DEFAULT_LOAD_TIMEOUT:g}; then 503)")
    p.add_argument("--served-model-name", help="the model's name in the API (default: the folder's name or the repo id)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8080, help="TCP port")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or 'x-api-key: KEY')")
    p.add_argument("--queue-size", type=int, default=16, help="requests waiting before 429")
    p.add_argument("--max-context", type=int, help="context limit in tokens (default: the model's)")
    p.add_argument("--cache-entries", type=int, default=8, help="prompt caches kept for reuse")
    p.add_argument("--prompt-cache-dir", help="folder of the disk prompt cache, shared by servers "
                   "(default: prompt-cache under MLX_LFM2_HOME, ~/.cache/mlx_lfm2)")
    p.add_argument("--prompt-cache-bytes", default="8G",
                   help="bound of the disk prompt cache, e.g. 20G or 512M (default 8G; 0: memory only)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests decoded together in one batch (default 8; 1: one at a time)")
    p.add_argument("--default-max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"reply limit when a request gives no max_tokens (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT,
                   help=f"seconds to receive a request body (default {BODY_TIMEOUT:g})")
    p.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT,
                   help=f"seconds to receive a request head (default {HEADER_TIMEOUT:g})")
    p.add_argument("--max-buffered-tokens", type=int, default=MAX_ITEMS,
                   help=f"tokens a stream may hold unsent before its row pauses (default {MAX_ITEMS})")
    p.add_argument("--stall-timeout", type=float, default=STALL_TIMEOUT,
                   help=f"seconds a paused stream waits for its reader before it is cancelled (default {STALL_TIMEOUT:g})")
    p.add_argument("--draft-model", help="a small LFM2 with the same tokenizer for speculative decoding")
    p.add_argument("--adapter-path", help="a LoRA/DoRA adapter folder (mlx-lm's layout or PEFT's) to apply")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", type=named_adapter,
                   help="a LoRA adapter served as model NAME next to the base (repeat for more; mlx-lm's layout "
                        "or PEFT's); rows on different adapters decode in one batch")
    p.add_argument("--adapter-dir", help="folder that POST /v1/load_lora_adapter may load adapters from")
    p.add_argument("--max-adapters", type=int, default=DEFAULT_MAX_ADAPTERS,
                   help=f"resident adapters at most (default {DEFAULT_MAX_ADAPTERS})")
    p.add_argument("--num-draft-tokens", type=int, help="tokens drafted per step (default: adaptive)")
    p.add_argument("--prompt-lookup", action="store_true", help="speculative decoding from n-grams of the prompt")
    p.add_argument("--memory-budget", help="memory the server may use, weights included, e.g. 24G: a request "
                   "whose predicted peak cannot fit is refused (400), one that fits later waits, a model that "
                   "does not fit beside the loaded ones unloads the least recently used idle one "
                   "(default: the GPU's recommended working set, else system memory)")
    p.add_argument("--log-content", action="store_true",
                   help="log each request's prompt and reply (default: counts and timings only)")
    a = p.parse_args(argv)
    if not a.model and not a.models_dir:
        p.error("give --model PATH_OR_REPO (repeatable) or --models-dir DIR")
    try:
        a.memory_budget = budget_bytes(a.memory_budget)
    except ValueError as e:
        raise SystemExit(f"error: --memory-budget: {e}")
    if a.max_batch < 1:
        raise SystemExit("error: --max-batch must be at least 1")
    if a.max_buffered_tokens < 2 or not a.stall_timeout > 0:
        raise SystemExit("error: --max-buffered-tokens must be at least 2 and --stall-timeout above 0")
    return a


def main(argv=None) -> None:
    a = arguments(argv)
    configure(a.log_content)
    if a.host not in ("127.0.0.1", "localhost", "::1") and not a.api_key:
        print(f"warning: serving on {a.host} without --api-key: anyone who can reach this port can use the model",
              file=sys.stderr)
    models = registry(a)
    if not leader():  # mlx.launch: rank 0 serves HTTP, the others serve their layers
        return models.loaded()[0].scheduler.follow()
    table = AdapterTable(models.loaded()[0].scheduler, a.adapter_dir, a.max_adapters) if a.model else None
    app = create_app(models, a.api_key, a.body_timeout, adapters=table)
    server = make_server(models, app, a.host, a.port, a.header_timeout)
    import asyncio
    asyncio.run(_serve(server, startup_line(a.host, a.port, models, a.max_batch)))


async def _serve(server, line: str) -> None:
    """Run ``server``, printing ``line`` once it listens."""
    import asyncio

    async def announce():
        while not server.started and not server.should_exit:
            await asyncio.sleep(0.05)
        if server.started:
            print(line, file=sys.stderr, flush=True)

    task = asyncio.create_task(announce())
    await server.serve()
    task.cancel()


def startup_line(host: str, port: int, models: Models, max_batch: int) -> str:
    """``listening on http://127.0.0.1:8080 model=NAME weights=.. GB mlx_active=.. GB`` (several
    models: ``models=A,B loaded=A``)."""
    import mlx.core as mx

    shown = f"[{host}]" if ":" in host else host
    loaded = models.loaded()
    names = (f"model={models.names[0]}" if len(models.names) == 1 else
             f"models={','.join(models.names)} loaded={','.join(e.name for e in loaded) or '-'}")
    adapters = [n for e in loaded if e.scheduler.adapters is not None for n in e.scheduler.adapters.loaded]
    return (f"listening on http://{shown}:{port} {names} weights={sum(e.size for e in loaded) / 2**30:.2f} GB "
            f"mlx_active={mx.get_active_memory() / 2**30:.2f} GB max_batch={max_batch}"
            + (f" adapters={','.join(adapters) or '-'}" if any(e.scheduler.adapters is not None for e in loaded) else ""))


if __name__ == "__main__":
    main()
