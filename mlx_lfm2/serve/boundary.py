"""The HTTP boundary shared by the OpenAI and Anthropic routes: what a request must be
before it reaches the engine, and how the server treats slow, large or vanished clients.

* ``read_body``: only ``application/json`` (415), at most ``MAX_BODY`` bytes counted while the
  body arrives (413; a chunked upload is cut off, not buffered), within a deadline (408),
  strict JSON at most 64 deep (400, ``openai_api.loads``).
* ``validate``: the pydantic request models, told the vocabulary so token ids are checked (422).
* ``watch``: a plain (non-streaming) reply's client is polled while its job runs; hanging up
  stops the job. ``sse_events``: a failure after a stream began is sent as an error event.
* ``make_server``: uvicorn with a deadline for request heads, keep-alive and graceful-shutdown
  timeouts, and SIGTERM/SIGINT stopping the engine's jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from .openai_api import APIError, loads

MAX_BODY = 4 * 1024 * 1024
BODY_TIMEOUT = 30.0  # seconds to receive a whole body: a stalled upload must not hold a slot
HEADER_TIMEOUT = 30.0  # seconds from connecting (or the last response) to a complete request head


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


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
    body = loads(raw)
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


async def sse_events(events):
    """Server-sent events; a failure after the 200 was sent becomes an error event (the
    shape OpenAI streams), so a client always learns why its stream ended."""
    try:
        async for event in events:
            yield event
    except APIError as e:
        yield json.dumps(e.body())
    except Exception as e:
        yield json.dumps(APIError(500, f"internal error: {type(e).__name__}", type_="server_error").body())


def no_reply(engine) -> APIError:
    """What a handler answers when its job ended without a token."""
    if engine.closed:
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


def make_server(engine, app, host: str = "127.0.0.1", port: int = 8080,
                header_timeout: float = HEADER_TIMEOUT, keep_alive: int = 5, graceful: int = 5):
    """A uvicorn server whose SIGTERM/SIGINT also stop the engine's jobs; requests still
    open ``graceful`` seconds later are cancelled, so a signal always ends the process."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # Not inline: the signal may interrupt the event loop while it holds the queue's lock.
            threading.Thread(target=engine.close, daemon=True).start()
            super().handle_exit(sig, frame)

    return Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                 http=_h11_with_header_deadline(header_timeout),
                                 timeout_keep_alive=keep_alive, timeout_graceful_shutdown=graceful))
