"""The server: ``python -m mlx_lfm2.server --model PATH_OR_REPO`` (OpenAI and Anthropic APIs).

Assembly only; each job has its module:

* ``scheduler``: the worker thread that owns the model (continuous batching, or one job at a
  time for speculative decoding and ``mlx.launch``), the job queue, the prompt caches;
* ``service``: what both APIs do with a request (auth, prepare, the reply assembler);
* ``openai`` (request models in ``openai_api``) and ``anthropic``: one module per API, each an
  app with its own routes and error shape;
* ``boundary``: the HTTP error type, bodies, validation, disconnects, the uvicorn server.

Limits (see README, "Security model", and ``boundary``): bodies are JSON of bounded size read
within a deadline, every value is validated before it reaches the worker, a reply is at most
``default_max_tokens`` unless the request asks for more (never past the context), and a client
that leaves stops its job.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..engine.distributed import leader
from . import anthropic, openai, responses
from .boundary import BODY_TIMEOUT, HEADER_TIMEOUT, make_server
from .scheduler import DEFAULT_MAX_TOKENS, Scheduler
from .service import Service


def create_app(scheduler: Scheduler, api_key: Optional[str] = None, body_timeout: float = BODY_TIMEOUT):
    """The ASGI app: each API's app under its path prefix (OpenAI's takes the rest, and
    ``/health``), over one service; starts the scheduler's worker."""
    service = Service(scheduler.start(), api_key, body_timeout)

    async def health(request: Request):
        import mlx.core as mx

        return JSONResponse({"status": "ok", "queued": scheduler.jobs.qsize(), **scheduler.stats,
                             "batch": scheduler.batch.status, "cached_prompts": len(scheduler.caches),
                             "mlx_active_mb": round(mx.get_active_memory() / 2**20, 1),
                             "mlx_cache_mb": round(mx.get_cache_memory() / 2**20, 1)})

    return ByPrefix(openai.app(service, routes=(Route("/health", health, methods=["GET"]),)),
                    {anthropic.PREFIX: anthropic.app(service), responses.PREFIX: responses.app(service)})


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


def served_name(model: str, given: Optional[str] = None) -> str:
    """The model's id in the API: a name, never a local path (which would tell every client
    where the server's files live): ``--served-model-name``, a folder's name, or the repo id."""
    if given:
        return given
    path = os.path.expanduser(model)
    return os.path.basename(os.path.normpath(os.path.abspath(path))) if os.path.exists(path) else model


def main(argv=None) -> None:
    from ..command import parser

    p = parser("mlx_lfm2.server", "Serve an LFM2 model over HTTP: the OpenAI API (/v1/chat/completions, "
               "/v1/completions, /v1/responses, /v1/models) and the Anthropic Messages API (/v1/messages), with continuous batching.")
    p.add_argument("--model", required=True, help="model folder or hub repo id")
    p.add_argument("--served-model-name", help="the model's name in the API (default: the folder's name or the repo id)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8080, help="TCP port")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or 'x-api-key: KEY')")
    p.add_argument("--queue-size", type=int, default=16, help="requests waiting before 429")
    p.add_argument("--max-context", type=int, help="context limit in tokens (default: the model's)")
    p.add_argument("--cache-entries", type=int, default=8, help="prompt caches kept for reuse")
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests decoded together in one batch (default 8; 1: one at a time)")
    p.add_argument("--default-max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"reply limit when a request gives no max_tokens (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT,
                   help=f"seconds to receive a request body (default {BODY_TIMEOUT:g})")
    p.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT,
                   help=f"seconds to receive a request head (default {HEADER_TIMEOUT:g})")
    p.add_argument("--draft-model", help="a small LFM2 with the same tokenizer for speculative decoding")
    p.add_argument("--num-draft-tokens", type=int, help="tokens drafted per step (default: adaptive)")
    p.add_argument("--prompt-lookup", action="store_true", help="speculative decoding from n-grams of the prompt")
    a = p.parse_args(argv)
    if a.host not in ("127.0.0.1", "localhost", "::1") and not a.api_key:
        print(f"warning: serving on {a.host} without --api-key: anyone who can reach this port can use the model",
              file=sys.stderr)
    from ..weights.loader import load, load_draft

    try:
        model, tokenizer = load(a.model)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if a.max_batch < 1:
        raise SystemExit("error: --max-batch must be at least 1")
    try:
        draft = load_draft(a.draft_model, model, a.prompt_lookup)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: draft model: {e}")
    scheduler = Scheduler(model, tokenizer, served_name(a.model, a.served_model_name), a.queue_size, a.cache_entries, a.max_context,
                          a.default_max_tokens, a.max_batch, draft, a.prompt_lookup, a.num_draft_tokens)
    if not leader():  # mlx.launch: rank 0 serves HTTP, the others serve their layers
        return scheduler.follow()
    app = create_app(scheduler, a.api_key, a.body_timeout)
    make_server(scheduler, app, a.host, a.port, a.header_timeout).run()


if __name__ == "__main__":
    main()
