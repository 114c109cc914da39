"""The HTTP boundary shared by every API: what a request must be before it reaches the
scheduler, how errors are answered, and how the server treats slow, large or vanished clients.

* ``APIError``: the one HTTP error type (status, message, OpenAI's type/param/code); each API
  renders it in its own shape through ``error_response``.
* ``read_body``: only ``application/json`` (415), at most ``MAX_BODY`` bytes counted while the
  body arrives (413; a chunked upload is cut off, not buffered), within a deadline (408),
  strict JSON at most 64 deep (400, ``loads``).
* ``validate``: the pydantic request models, told the vocabulary so token ids are checked (422).
* ``watch``: a plain (non-streaming) reply's client is polled while its job runs; hanging up
  stops the job.
* ``make_server``: uvicorn with a deadline for request heads, keep-alive and graceful-shutdown
  timeouts, and SIGTERM/SIGINT stopping the scheduler's jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from typing import Any, Callable, Optional

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

MAX_BODY = 4 * 1024 * 1024
MAX_DEPTH = 64  # JSON nesting: tool schemas in the wild stay far below; thousands exhaust the stack
BODY_TIMEOUT = 30.0  # seconds to receive a whole body: a stalled upload must not hold a slot
HEADER_TIMEOUT = 30.0  # seconds from connecting (or the last response) to a complete request head


class APIError(Exception):
    """An HTTP error: ``status`` and ``message``, with OpenAI's ``type``/``param``/``code``
    (``body()`` is OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``; other
    APIs map ``type`` onto theirs)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def internal_error(e: Exception) -> APIError:
    """What a client is told of a fault of ours (the details go to the log, not the reply)."""
    return APIError(500, f"internal error: {type(e).__name__}", type_="server_error")


def error_response(e: APIError, render: Callable[[APIError], tuple[int, dict]] = lambda e: (e.status, e.body())
                   ) -> JSONResponse:
    """``e`` answered in an API's shape (``render``: status and body). A 408 or 413 leaves the
    rest of the body unread, so the connection is closed after the answer."""
    status, body = render(e)
    response = JSONResponse(body, status_code=status)
    if e.status in (408, 413):
        response.headers["connection"] = "close"
    return response


def exception_handlers(render: Callable[[APIError], tuple[int, dict]] = lambda e: (e.status, e.body())) -> dict:
    """The handlers an API's app is mounted with: its own errors, Starlette's (no such route,
    wrong method) and any fault of ours (logged by uvicorn), all answered in its shape."""

    async def api_error(request, exc: APIError):
        return error_response(exc, render)

    async def http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind),
                              render)

    async def crash(request, exc: Exception):
        return error_response(internal_error(exc), render)

    return {APIError: api_error, HTTPException: http_error, Exception: crash}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def loads(text, what: str = "the body") -> Any:
    """JSON from a client: strict (no NaN/Infinity), at most ``MAX_DEPTH`` deep, strings of
    real characters (``"\\ud800"`` is valid JSON but no text the tokenizer can take), else a 400."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise APIError(400, f"{what} nests deeper than {MAX_DEPTH} levels", code="invalid_json")
    except ValueError as e:
        raise APIError(400, f"{what} is not valid JSON: {e}", code="invalid_json")
    _check_tree(value, what)
    return value


def _check_tree(value, what: str) -> None:
    """Depth and strings of parsed JSON, without recursion."""
    todo = [(value, 1)]
    while todo:
        v, depth = todo.pop()
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    raise APIError(400, f"{what} holds a string with a lone surrogate escape ({v[:40]!r})",
                                   code="invalid_json")
        elif isinstance(v, (dict, list)):
            if depth > MAX_DEPTH:
                raise APIError(400, f"{what} nests deeper than {MAX_DEPTH} levels", code="invalid_json")
            items = [*v.keys(), *v.values()] if isinstance(v, dict) else v
            todo.extend((x, depth + 1) for x in items)


async def read_body(request: Request, timeout: float = BODY_TIMEOUT) -> dict:
    """The JSON object a POST carries. Only ``application/json``: a web page can send a
    ``text/plain`` POST to a loopback server without a CORS preflight, never a JSON one."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise APIError(415, f"the body must be sent as Content-Type: application/json (got {kind or 'none'!r})",
                       code="unsupported_media_type")
    size = request.headers.get("content-length")
    if size and size.isdigit() and int(size) > MAX_BODY:
        raise APIError(413, f"request body over {MAX_BODY} bytes", code="body_too_large")

    async def read() -> bytes:  # counted as it arrives: a chunked body has no length to check
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > MAX_BODY:
                raise APIError(413, f"request body over {MAX_BODY} bytes", code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        raw = await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the body did not arrive within {timeout:g} s", code="request_timeout")
    body = await run_in_threadpool(loads, raw)  # a 4 MiB body parses off the event loop
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    return body


def validate(model_cls, body: dict, vocab: int):
    try:
        return model_cls.model_validate(body, context={"vocab": vocab})
    except ValidationError as e:
        # Of a union's alternatives, report the one that got furthest into the value.
        err = max(e.errors(), key=lambda err: len(err["loc"]))
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise APIError(422, f"{where}: {msg}" if where else msg, param=where or None, code="invalid_value")


@contextlib.asynccontextmanager
async def watch(request: Request, job, every: float = 0.2):
    """While the handler waits on ``job``, poll the client: one that hangs up stops the job
    even while tokens keep arriving (a non-streaming reply would otherwise run to its end)."""

    async def poll():
        while not job.stop.is_set():
            if await request.is_disconnected():
                job.stop.set()
                return
            await asyncio.sleep(every)

    task = asyncio.ensure_future(poll())
    try:
        yield
    finally:
        task.cancel()


def no_reply(scheduler) -> APIError:
    """What a handler answers when its job ended without a token."""
    if scheduler.closed:
        return APIError(503, "the server is shutting down", type_="server_error", code="shutting_down")
    return APIError(499, "client closed the request")


def _h11_with_header_deadline(timeout: float):
    """uvicorn's h11 protocol, plus a deadline for each request head: uvicorn closes idle
    keep-alive connections, but not one that sends half a request line and stalls."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm(None)

        def on_response_complete(self) -> None:
            done = self.cycle
            super().on_response_complete()
            if self.cycle is done:  # no pipelined request started: the next head is awaited
                self._arm(done)

        def _arm(self, cycle) -> None:
            def expire():
                if self.cycle is cycle and not self.transport.is_closing():
                    self.transport.close()

            self.loop.call_later(timeout, expire)

    return Protocol


def make_server(scheduler, app, host: str = "127.0.0.1", port: int = 8080,
                header_timeout: float = HEADER_TIMEOUT, keep_alive: int = 5, graceful: int = 5):
    """A uvicorn server whose SIGTERM/SIGINT also stop the scheduler's jobs; requests still
    open ``graceful`` seconds later are cancelled, so a signal always ends the process."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # Not inline: the signal may interrupt the event loop while it holds the queue's lock.
            threading.Thread(target=scheduler.close, daemon=True).start()
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None) -> None:
            await super().shutdown(sockets)
            # Before uvicorn re-raises the signal that ends the process: the blocks the
            # disk prompt cache still has queued are written (off the loop).
            await asyncio.to_thread(scheduler.finish_writes)

    return Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                 http=_h11_with_header_deadline(header_timeout),
                                 timeout_keep_alive=keep_alive, timeout_graceful_shutdown=graceful))
