"""Observability: one log line per request and ``GET /metrics`` (Prometheus text format).

``Observer`` is an ASGI wrapper around the whole app. For each HTTP request it opens a
``Record`` (an id, the route, the status) that ``Service.prepare`` finds through a context
variable and fills with the request's job; when the response ends it logs one line (the
``mlx_lfm2.server`` logger, stderr under the command: id, route, model, prompt/cached/generated
tokens, TTFT, tok/s, status) and updates
the counters and histograms. Content (the prompt, the reply) is logged only when asked
(``--log-content``). Gauges (queue depth, batch occupancy, resident models and their bytes,
MLX active/peak memory) are read when ``/metrics`` is scraped.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.responses import Response

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_current: contextvars.ContextVar = contextvars.ContextVar("mlx_lfm2_request", default=None)
_ids = itertools.count(1)
log_request = logging.getLogger("mlx_lfm2.server")  # one line per request (``configure`` shows them)
ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/messages",
                    "/v1/messages/count_tokens", "/v1/responses", "/health", "/metrics", "/api/chat",
                    "/api/generate", "/api/tags", "/api/show", "/api/ps", "/api/version"})


@dataclass
class Record:
    """What one HTTP request did: its jobs (a request may queue several, e.g. ``n`` > 1)."""

    id: str
    route: str
    started: float = field(default_factory=time.perf_counter)
    status: int = 0
    jobs: list = field(default_factory=list)
    model: str = "-"  # the served model it was routed to


def note_model(name: str) -> None:
    """The model the HTTP request being served was routed to (no-op outside one)."""
    record = _current.get()
    if record is not None:
        record.model = name


def track(job) -> None:
    """Attach ``job`` to the HTTP request being served (no-op outside one); it then times its
    tokens (``Job.emit``) and, with ``--log-content``, keeps its reply's text."""
    record = _current.get()
    if record is not None:
        job.timing = JobTiming(keep_text=_Settings.log_content)
        record.jobs.append(job)


@dataclass
class JobTiming:
    """A job's token times, written by the worker thread as it emits tokens."""

    keep_text: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first: Optional[float] = None
    last: Optional[float] = None
    tokens: int = 0
    gaps: list = field(default_factory=list)  # seconds between consecutive tokens
    text: list = field(default_factory=list)

    def token(self, text: str) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        else:
            self.gaps.append(now - self.last)
        self.last, self.tokens = now, self.tokens + 1
        if self.keep_text:
            self.text.append(text)


class _Settings:
    log_content = False


class Metrics:
    """The registry, the per-request counters and histograms, and the scrape-time gauges."""

    def __init__(self, models):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mlx_lfm2_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.ttft = Histogram("mlx_lfm2_time_to_first_token_seconds", "seconds from queueing to the first token",
                              registry=r, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.inter_token = Histogram("mlx_lfm2_inter_token_seconds", "seconds between a reply's tokens",
                                     registry=r, buckets=(.001, .0025, .005, .01, .02, .04, .08, .16, .32, .64, 1.5))
        self.prompt_tokens = Counter("mlx_lfm2_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("mlx_lfm2_prompt_cache_hit_tokens", "prompt tokens reused from the prompt cache",
                                     registry=r)
        self.generated = Counter("mlx_lfm2_generation_tokens", "tokens generated", registry=r)
        r.register(_Gauges(models))

    def observe(self, record: Record) -> None:
        # A label per path a client sends would grow without bound: unknown paths are "other".
        path = record.route.split(" ", 1)[-1]
        self.requests.labels(path if path in ROUTES else "other", str(record.status)).inc()
        for job in record.jobs:
            t = getattr(job, "timing", None)
            self.prompt_tokens.inc(job.prompt_tokens)
            self.cached_tokens.inc(job.cached_tokens)
            if t is None or t.first is None:
                continue
            self.generated.inc(t.tokens)
            self.ttft.observe(t.first - t.submitted)
            for gap in list(t.gaps):
                self.inter_token.observe(gap)

    def endpoint(self):
        async def metrics(request):
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE)

        return metrics


class _Gauges:
    """Values read at scrape time from the loaded models' schedulers (``models.Models``) and MLX."""

    def __init__(self, models):
        self.models = models

    def collect(self):
        import mlx.core as mx

        loaded = self.models.loaded()

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            return g

        schedulers = [e.scheduler for e in loaded]
        yield gauge("mlx_lfm2_queue_depth", "requests waiting for the workers", sum(s.jobs.qsize() for s in schedulers))
        yield gauge("mlx_lfm2_batch_occupancy", "requests decoding in the batches",
                    sum(len(s.live) or int(s.current is not None) for s in schedulers))
        yield gauge("mlx_lfm2_batch_capacity", "rows of the batches", sum(s.batch.max_batch for s in schedulers))
        g = GaugeMetricFamily("mlx_lfm2_resident_model_bytes", "bytes of each loaded model's weights", labels=["model"])
        for e in loaded:
            g.add_metric([e.name], e.size)
        yield g
        yield gauge("mlx_lfm2_resident_models", "models loaded", len(loaded))
        admitting = [s for s in schedulers if getattr(s, "admission", None) is not None]
        if admitting:
            yield gauge("mlx_lfm2_memory_budget_bytes", "the memory budget (--memory-budget)", admitting[0].admission.budget)
            yield gauge("mlx_lfm2_memory_reserved_bytes", "predicted peak bytes of the requests running",
                        sum(s.reserved for s in admitting))
            yield gauge("mlx_lfm2_memory_waiting_requests", "requests waiting for memory",
                        sum(s.held is not None for s in admitting))
        yield gauge("mlx_lfm2_mlx_active_memory_bytes", "MLX active memory", mx.get_active_memory())
        yield gauge("mlx_lfm2_mlx_peak_memory_bytes", "MLX peak memory", mx.get_peak_memory())
        yield gauge("mlx_lfm2_mlx_cache_memory_bytes", "MLX buffer cache", mx.get_cache_memory())


def model_bytes(model) -> int:
    """Bytes of ``model``'s weights (0 for a stand-in without parameters, as tests use)."""
    from mlx.utils import tree_flatten

    parameters = getattr(model, "parameters", None)
    return sum(v.nbytes for _, v in tree_flatten(parameters())) if parameters is not None else 0


def log_line(record: Record) -> str:
    """One request's line: never its content unless ``--log-content``."""
    elapsed = time.perf_counter() - record.started
    parts = [f"request {record.id}", record.route, f"status={record.status}", f"model={record.model}"]
    jobs = record.jobs
    if jobs:
        timings = [j.timing for j in jobs if getattr(j, "timing", None) is not None]
        generated = sum(t.tokens for t in timings)
        parts += [f"prompt={sum(j.prompt_tokens for j in jobs)}", f"cached={sum(j.cached_tokens for j in jobs)}",
                  f"generated={generated}"]
        firsts = [t.first - t.submitted for t in timings if t.first is not None]
        if firsts:
            parts.append(f"ttft={min(firsts) * 1000:.0f}ms")
        spans = [t.last - t.first for t in timings if t.first is not None and t.tokens > 1]
        if spans and max(spans) > 0:
            parts.append(f"tok/s={sum(t.tokens - 1 for t in timings if t.tokens > 1) / max(spans):.1f}")
    parts.append(f"time={elapsed * 1000:.0f}ms")
    line = " ".join(parts)
    if _Settings.log_content and jobs:
        for j in jobs:
            reply = "".join(j.timing.text) if getattr(j, "timing", None) else ""
            line += f"\n  prompt: {j.prompt_text!r}\n  reply: {reply!r}"
    return line


class Observer:
    """ASGI wrapper: a ``Record`` per HTTP request, logged and counted when it ends."""

    def __init__(self, app, metrics: Metrics, log=None):
        self.app, self.metrics = app, metrics
        self.log = log or log_request.info

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        record = Record(f"req-{next(_ids)}", f"{scope.get('method', '')} {scope.get('path', '')}")
        token = _current.set(record)

        async def sending(message):
            if message["type"] == "http.response.start":
                record.status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            _current.reset(token)
            record.status = record.status or 500
            if scope.get("path") not in ("/metrics", "/health"):  # scrapes and probes: counted, not logged
                self.log(log_line(record))
            self.metrics.observe(record)


def configure(log_content: bool) -> None:
    """The command's settings: the request lines go to stderr (a library user, or a test,
    gets them through ``logging`` as ``mlx_lfm2.server``, shown nowhere unless configured)."""
    _Settings.log_content = log_content
    if not log_request.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log_request.addHandler(handler)
        log_request.setLevel(logging.INFO)
