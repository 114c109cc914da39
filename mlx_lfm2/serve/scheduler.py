"""The scheduler: one worker thread owns the model, so the event loop never blocks on MLX.

It takes jobs in arrival order from a bounded queue (full: 429) and runs them in one of two
modes, chosen once in ``start``:

* batched (the default): a continuous batch of up to ``max_batch`` (engine/batch.py): every
  active request decodes in the same forward, each with its own sampling, stops and limit,
  and a newcomer's prefill is interleaved with the others' decode steps;
* serial: one job at a time through ``stream_generate``, for speculative decoding
  (``--draft-model``, ``--prompt-lookup``) and under ``mlx.launch``, whose ranks must run the
  same steps (rank 0 broadcasts each job; the other ranks ``follow``).

Tokens travel back to each job (``serve.job``) through its bounded ``outbox.Outbox``; a client
that disconnects sets its job's stop event, which takes its row out of the batch at the next
step. A client that stops reading fills its outbox: its row is parked (out of the forward, the
others decode on) until the client reads again, and cancelled after ``stall_timeout`` s
(``outbox.Backpressure``). With a memory budget (``serve.admission``) the queue's head joins
the batch only when its predicted peak fits beside the running rows; until then it is ``held``.

Prompt reuse (``engine.prompt_cache``): after each request the worker keeps its cache in
the store; a later prompt takes a copy of the one that shares the longest prefix with it,
which extends, or rewinds to the longest common prefix it can reach, and prefills the rest.
A job may name a resident adapter (``model.lora_rows``): its row decodes with it, and its
caches are filed under that adapter's namespace (never reused by another adapter or the base).
Work that must not race a forward (loading an adapter) is handed to the worker (``call``,
``serve.controls``), which runs it between two steps.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from ..engine.batch import BatchGenerator
from ..engine.decode import default_prefill_step
from ..engine.distributed import broadcast, group
from ..engine.generation import TextStream, default_sampling, stream_request
from ..engine.request import build_request
from ..engine.sample import SamplingParams
from ..engine.prompt_cache import PromptCache, PromptCacheStore
from ..engine.score import score_prompt
from ..model.lora_rows import NotLoaded, adapter_set, namespace, select
from .boundary import APIError
from .controls import Controls
from .job import DONE, Job, failed, logprob_entry, refused
from .outbox import MAX_ITEMS, STALL_TIMEOUT, Backpressure

DEFAULT_MAX_TOKENS = 2048
STOP = object()  # in the job queue: the worker ends there (``shutdown``)
WAKE = object()  # put in the job queue to wake an idle worker for ``call``ed work


class Scheduler:
    """The model, its worker thread (``start``), the job queue and the prompt caches."""

    def __init__(self, model, tokenizer, model_id: str, queue_size: int = 16, cache_entries: int = 8,
                 max_context: Optional[int] = None, default_max_tokens: int = DEFAULT_MAX_TOKENS,
                 max_batch: int = 8, draft_model=None, prompt_lookup: bool = False,
                 num_draft_tokens: Optional[int] = None, disk=None, stall_timeout: float = STALL_TIMEOUT,
                 max_buffered: int = MAX_ITEMS):
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.draft_model = draft_model
        self.speculative = dict(prompt_lookup=prompt_lookup, num_draft_tokens=num_draft_tokens)
        self.max_context = min(max_context or 1 << 62, model.args.max_position_embeddings)
        self.default_max_tokens = default_max_tokens
        # Ids from requests must index both the tokenizer and the embedding rows.
        rows = getattr(model.args, "vocab_size", None)
        self.vocab = min(tokenizer.vocab_size, rows) if rows else tokenizer.vocab_size
        self.live: dict = {}  # uid -> _Live: the requests in the batch
        self.current: Optional[Job] = None  # the job of the serial mode
        self.batch = BatchGenerator(model, max_batch)
        self.closed = False
        self.defaults = SamplingParams(**default_sampling(model))
        self.jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self.controls = Controls(self._wake)  # work run by the worker between steps
        self.disk = disk  # engine.disk_cache.DiskTier under the memory entries, or None
        self.caches = PromptCacheStore(model, cache_entries, draft_model, lower=disk)
        self.stats = {"completed": 0, "cancelled": 0, "active": 0, "peak_batch": 0, "paused": 0, "stalled": 0}
        self.backpressure = Backpressure(stall_timeout, self.stats)
        self.max_buffered = max_buffered  # tokens a job's outbox holds before its row is parked
        self.template_renders_tool_calls = "tool_calls" in (tokenizer.chat_template or "")
        self._worker: Optional[threading.Thread] = None
        self._stopping = False  # the worker took STOP: it ends once the batch is empty
        self.admission = None  # serve.admission.Admission: requests join when their memory fits
        self.held: Optional[Job] = None  # the queue's head, waiting for memory

    @property
    def serial(self) -> bool:
        """Speculative decoding and mlx.launch ranks run one job at a time."""
        return self.draft_model is not None or self.speculative["prompt_lookup"] or group() is not None

    def start(self) -> "Scheduler":
        """Start the worker thread (once; later calls do nothing)."""
        if self._worker is None:
            work = self._work_serial if self.serial else self._work_batched
            self._worker = threading.Thread(target=work, daemon=True, name="mlx_lfm2-worker")
            self._worker.start()
        return self

    @property
    def adapters(self):
        """The model's resident adapters (``model.lora_rows.AdapterSet``), None without."""
        return adapter_set(self.model)

    def call(self, fn):
        """Run ``fn()`` on the worker between two steps (never during a forward) -> its future."""
        return self.controls.call(fn)

    def _wake(self) -> None:
        """Wake the worker if it waits for a job (a full queue: it is busy, and looks anyway)."""
        try:
            self.jobs.put_nowait(WAKE)
        except queue.Full:
            pass

    def in_use(self, adapter: str) -> int:
        """How many requests, running or queued, use ``adapter`` (call on the worker)."""
        with self.jobs.mutex:
            queued = list(self.jobs.queue)
        return (sum(isinstance(j, Job) and j.adapter == adapter for j in queued)
                + sum(l.job.adapter == adapter for l in self.live.values()))

    def submit(self, job: Job) -> None:
        if self.closed:
            raise APIError(503, "the server is shutting down", type_="server_error", code="shutting_down")
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(429, "the server is busy: too many queued requests, retry shortly",
                           type_="rate_limit_error", code="queue_full")

    def shutdown(self) -> None:
        """End the worker once the jobs in hand are done (``serve.models`` unloading the model):
        new jobs are refused, and the thread lets go of the model when it returns."""
        self.closed = True
        if self._worker is not None:
            self.jobs.put(STOP)
            self._worker.join()
            self._worker = None

    def close(self) -> None:
        """Stop the running job and drop the queued ones (on SIGTERM/SIGINT): their handlers
        return at once, so the server's graceful shutdown does not wait on generation."""
        self.closed = True
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is STOP or job is WAKE:  # the worker gets its STOP below
                continue
            job.stop.set()
            job.emit(DONE)
        for live in self.live.copy().values():  # copy(): atomic while the worker changes it
            live.job.stop.set()
        if self.held is not None:
            self.held.stop.set()
        if self.current is not None:
            self.current.stop.set()
        try:  # the worker ends, once its rows have (an idle one at once)
            self.jobs.put_nowait(STOP)
        except queue.Full:  # a submit raced the drain: the worker still finds STOP after it
            self.jobs.put(STOP)

    # Prompt caches --------------------------------------------------------------------------

    def _request(self, job: Job):
        """The cached conversation sharing the most of the job's prompt, and the request for
        the ids still to feed (built and checked by the engine's one request builder)."""
        pc = self.caches.take(job.prompt_text, namespace(self.model, job.adapter), ids=job.ids)
        grid = default_prefill_step() if job.params.seed is not None else None  # reproducible hit or miss
        ids = pc.new_tokens(self.tokenizer, job.prompt_text, job.ids, grid=grid)
        # A sampled reply need not be tokenized as its text re-encodes: a cache holding one can
        # overflow the context where the fresh prompt fits. Keep less of it until it fits.
        excess = pc.offset + len(ids) + 1 - self.max_context
        while excess > 0 and pc.offset > 0:
            ids = pc.new_tokens(self.tokenizer, job.prompt_text, job.ids, at_most=pc.offset - excess, grid=grid)
            excess = pc.offset + len(ids) + 1 - self.max_context
        exact = job.exact_ids and pc.tokens + ids != list(job.ids)  # a text match, other ids: not these
        if not ids or exact:  # a cache that consumed this whole prompt leaves nothing to sample from
            pc = self.caches.fresh()
            ids = pc.new_tokens(self.tokenizer, job.prompt_text, job.ids)
        request = build_request(self.model, self.tokenizer, ids, job.params, held=pc.offset,
                                context=self.max_context, constraint=job.constraint)
        job.cached_tokens = pc.offset
        job.prompt_tokens = pc.offset + len(ids)
        return pc, request

    def _keep(self, pc: PromptCache, job: Job) -> None:
        ns = namespace(self.model, job.adapter)
        written = self.caches.keep(pc, ns)
        if job.pin and self.disk is not None:  # cache_control / prompt_cache_key: evicted last
            written += self.disk.store(ns, pc, pin=True)
        job.cache_written = sum(max(0, min(e, job.prompt_tokens) - s) for s, e in written)

    def finish_writes(self, timeout: float = 120.0) -> None:
        """At exit: let the disk tier's queued blocks land (the replies that made them are
        sent; without this a restart finds the chain cut where the writer thread was)."""
        if self.disk is not None:
            self.disk.flush(timeout)

    def _emit(self, job: Job, r) -> None:
        """One response to its job, with its logprob entry when the job asked for logprobs."""
        job.started = True
        entry = None
        if job.top_logprobs is not None and r.logprobs is not None and not r.finish_reason:
            entry = logprob_entry(self.tokenizer, r.token, r.logprobs, job.top_logprobs)
        # Without its vocabulary-sized row: the queue holds only what the reply needs.
        job.emit((dataclasses.replace(r, logprobs=None) if r.logprobs is not None else r, entry))

    # Batched mode ---------------------------------------------------------------------------

    def _work_batched(self) -> None:
        while not (self._stopping and not self.live):
            self.controls.run()
            self._admit()
            for uid, live in list(self.live.items()):
                if live.job.stop.is_set():  # its client left: out of the batch now
                    self._end(uid, self.batch.remove(uid), [live.text.end("cancelled")])
            if not self.live:
                continue
            self.backpressure.rows(self.live, self.batch)
            if not self.batch.rows and self.batch.prefilling is None and not self.batch.waiting:
                time.sleep(0.01)  # every row waits on its reader
                continue
            try:
                tokens = self.batch.step()
                self.stats["peak_batch"] = max(self.stats["peak_batch"], len(tokens))
            except Exception as e:  # report it to every request in the batch; the worker lives on
                for live in self.live.values():
                    live.job.emit(failed(e))
                    live.job.emit(DONE)
                self.live.clear()
                self.batch = BatchGenerator(self.model, self.batch.max_batch)
                self.stats["active"] = 0
                continue
            for t in tokens:
                live = self.live[t.uid]
                out = live.text.feed(t.token, t.logprobs, t.finish_reason)
                if out[-1].finish_reason:
                    cache = t.cache if t.finish_reason else self.batch.remove(t.uid)  # a stop string
                    self._end(t.uid, cache, out)
                else:
                    self._emit_all(live, out)

    def _admit(self) -> None:
        """Move queued requests into the batch while it has room; wait for one when idle."""
        while len(self.live) < self.batch.max_batch and not self._stopping:
            try:
                job, self.held = self.held or (self.jobs.get() if not self.live else self.jobs.get_nowait()), None
            except queue.Empty:
                return
            if job is WAKE:
                return
            if job is STOP:
                self._stopping = True
                return
            if job.stop.is_set():  # its client left while it waited
                self.stats["cancelled"] += 1
                job.emit(DONE)
                continue
            if self.admission is not None and self.admission.waits(job.memory, self.live):
                self.held = job  # it waits for memory, and those behind it wait too (see serve.admission)
                return
            try:
                self._insert(job)
            except ValueError as e:  # the request's fault, found before its first token
                job.emit(refused(e))
                job.emit(DONE)
            except NotLoaded as e:  # unloaded while the job waited
                job.emit(APIError(404, str(e), type_="not_found_error", code="model_not_found"))
                job.emit(DONE)
            except Exception as e:
                job.emit(failed(e))
                job.emit(DONE)

    @property
    def reserved(self) -> int:
        """The predicted peak bytes of the batch (``serve.admission``), read from any thread."""
        return self.admission.reserved(self.live) if self.admission is not None else 0

    def _score(self, job: Job) -> None:
        if job.score_ids is not None and job.top_logprobs is not None:
            select(self.model, [job.adapter])
            job.scores = score_prompt(self.model, job.score_ids, job.top_logprobs)

    def _insert(self, job: Job) -> None:
        self._score(job)
        pc, request = self._request(job)
        live = _Live(job, pc, request.ids, TextStream(self.tokenizer, job.params.stop, len(request.ids)))
        if request.max_tokens == 0:
            job.emit((live.text.end("length"), None))
            self.stats["completed"] += 1
            job.emit(DONE)
            return
        uid = self.batch.add(request, pc.cache, job.adapter)
        self.live[uid] = live
        self.stats["active"] = len(self.live)

    def _emit_all(self, live: "_Live", responses) -> None:
        for r in responses:
            if r.token is not None:
                live.generated.append(r.token)
            self._emit(live.job, r)

    def _end(self, uid: int, cache: Optional[list], responses) -> None:
        """A request leaves the batch: its last responses, the stats, its cache kept for reuse."""
        live = self.live.pop(uid)
        self._emit_all(live, responses)
        self.stats["cancelled" if live.job.stop.is_set() else "completed"] += 1
        self.stats["active"] = len(self.live)
        if cache is not None:  # None: it left before its prefill finished
            live.pc.cache = cache
            live.pc.commit(self.tokenizer, live.job.prompt_text, live.ids, live.generated)
            self._keep(live.pc, live.job)
        live.job.emit(DONE)

    # Serial mode ----------------------------------------------------------------------------

    def _work_serial(self) -> None:
        while True:
            self.controls.run()
            job = self.jobs.get()
            if job is WAKE:
                continue
            if job is STOP:
                return
            if job.stop.is_set():  # its client left while it waited
                self.stats["cancelled"] += 1
                job.emit(DONE)
                continue
            self.stats["active"], self.current = 1, job
            try:
                if group() is not None:  # mlx.launch: the other ranks run it with us (follow())
                    broadcast({"prompt_text": job.prompt_text, "ids": job.ids, "params": job.params.to_json()})
                self._run(job)
            except ValueError as e:
                # The engine checks its inputs before the first token: a ValueError then is
                # the request's fault (a 400); one later is a fault of ours.
                if job.started:
                    job.emit(APIError(500, f"generation failed: {e}", type_="server_error"))
                else:
                    job.emit(refused(e))
            except Exception as e:  # report it to that request; the worker lives on
                job.emit(failed(e))
            finally:
                self.stats["active"], self.current = 0, None
                job.emit(DONE)

    def _run(self, job: Job) -> None:
        tok = self.tokenizer
        self._score(job)
        pc, request = self._request(job)
        generated, finished = [], False
        spec = dict(self.speculative, draft_model=self.draft_model, draft_cache=pc.draft_cache)
        for r in stream_request(self.model, tok, request, pc.cache, stop_event=job.stop, **spec):
            if r.token is not None:
                generated.append(r.token)
            self._emit(job, r)
            finished = r.finish_reason is not None
            if not finished:
                self.backpressure.wait(job)
        self.stats["cancelled" if job.stop.is_set() else "completed"] += 1
        if finished:
            pc.commit(tok, job.prompt_text, request.ids, generated)
            self._keep(pc, job)

    def follow(self) -> None:
        """Ranks other than 0 under mlx.launch: run each job rank 0 runs, with no client."""
        while True:
            spec = broadcast()
            job = Job(spec["prompt_text"], SamplingParams.from_json(spec["params"]), None, loop=None, ids=spec["ids"])
            job.emit = lambda item: None
            try:
                self._run(job)
            except Exception:  # rank 0 met the same error and reports it to its client
                pass


@dataclass
class _Live:
    job: Job
    pc: PromptCache
    ids: list  # the prompt ids prefilled (those after the cached prefix)
    text: TextStream
    generated: list = field(default_factory=list)
    parked: Optional[float] = None  # when its row left the forward for a full outbox (monotonic s)
