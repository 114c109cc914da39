"""Resident models: the names a server answers to, which of them are loaded, the memory budget,
idle unload.

A server lists its models (``--model`` repeated, ``--models-dir``) and loads each on first use:
one ``Scheduler`` per loaded model, with its own worker thread, prompt caches and disk tier.

* ``acquire(name)``: the model a request names, loaded if need be. Requests for a model being
  loaded wait for it, at most ``load_timeout`` seconds (then a 503). The request holds the model
  until its response ends (``Holds``, an ASGI wrapper), so a model with a request in flight is
  never unloaded.
* Room: a load first drops the loaded models' prompt caches kept in memory (their prefixes
  stay in the disk tier), then unloads the least recently used idle models, until the new one
  fits both ``max_loaded`` and ``budget`` (bytes of weights and kept prompt caches; a model not
  loaded yet counts its weight files; ``serve.admission`` shares the same budget). While the others are all busy the load waits for one to finish. A model larger than
  the budget on its own is loaded alone.
* Unloading stops the worker, waits for the disk tier's writes (each prompt cache the scheduler
  keeps is written to the disk tier as it is kept, so a model loaded again reads its prefixes
  back instead of prefilling them), drops every reference and clears MLX's buffer cache.
* Idle unload: a model idle for its keep-alive is unloaded by ``reap``. The keep-alive is the
  last request's ``keep_alive`` (Ollama's field: seconds or a duration like ``"5m"``; negative:
  forever; 0: unload after the reply), else ``--idle-unload`` (None: kept).

Which entry a request's ``model`` names is ``Service.route``'s to say (adapters are names too).
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .boundary import APIError

DEFAULT_LOAD_TIMEOUT = 300.0
UNSET = object()  # a request that gives no keep_alive
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_held: contextvars.ContextVar = contextvars.ContextVar("mlx_lfm2_held_models", default=None)


FOREVER = 10 * 365 * 86400.0  # seconds of keep_alive beyond which a model is simply kept


def parse_keep_alive(value) -> Optional[float]:
    """Ollama's ``keep_alive`` -> seconds (None: kept for ever): a number of seconds, a
    string of one, or a Go duration (``"5m"``, ``"1h30m"``, ``"300ms"``); negative: for ever."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise APIError(400, "keep_alive: seconds, or a duration such as '5m' or '1h'", param="keep_alive")
    if isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            value = sign * float(body)
        except ValueError:
            parts = _DURATION.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise APIError(400, f"keep_alive: {value!r:.40} is not a duration (write e.g. '5m', '30s' or 0)",
                               param="keep_alive") from None
            value = sign * sum(float(n) * _UNITS[u] for n, u in parts)
    if value != value:  # NaN: no duration at all
        raise APIError(400, "keep_alive: not a number of seconds", param="keep_alive")
    return None if value < 0 or value > FOREVER else float(value)  # past FOREVER: kept for ever (and shown so)


@dataclass(eq=False)
class Entry:
    """One model the server can serve."""

    name: str
    path: Optional[str]  # where it loads from (None: handed over loaded)
    pinned: bool = False  # never unloaded (a model handed over loaded, one serving adapters)
    scheduler: Optional[object] = None  # serve.scheduler.Scheduler, while loaded
    size: int = 0  # bytes of weights: measured once loaded, the weight files before
    users: int = 0  # requests holding it
    last_used: float = field(default_factory=time.monotonic)
    keep_alive: Optional[float] = None  # seconds idle before an unload (None: kept)
    loading: Optional[asyncio.Future] = None

    @property
    def cached(self) -> int:
        """Bytes of the prompt caches its scheduler keeps in memory (0: not loaded)."""
        store = getattr(self.scheduler, "caches", None)
        return store.nbytes if store is not None else 0

    @property
    def expires(self) -> Optional[float]:
        """When an idle unload is due (time.monotonic()), None: never."""
        if self.pinned or self.keep_alive is None:
            return None
        return self.last_used + self.keep_alive


def weight_files_bytes(path: str) -> int:
    """What a model folder's weights will take (0 when it is not a local folder)."""
    folder = Path(path).expanduser()
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) if folder.is_dir() else 0


def folder_config(path: Optional[str]) -> dict:
    """A model folder's config.json ({} when there is none to read)."""
    try:
        config = json.loads((Path(path).expanduser() / "config.json").read_text())
    except (TypeError, OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


class Models:
    """The registry: every listed model, those loaded, and the rules that load and unload them
    (see the module docstring). Its state changes on the event loop; loads and unloads run
    in threads."""

    def __init__(self, paths: dict, build: Callable[[str, str], object], max_loaded: Optional[int] = None,
                 budget: Optional[int] = None, idle_unload: Optional[float] = None,
                 load_timeout: float = DEFAULT_LOAD_TIMEOUT):
        self.entries = {name: Entry(name, path, size=weight_files_bytes(path), keep_alive=idle_unload)
                        for name, path in paths.items()}
        self.build, self.max_loaded, self.budget = build, max_loaded, budget
        self.idle_unload, self.load_timeout = idle_unload, load_timeout
        self.max_context: Optional[int] = None  # --max-context, for what is shown of a model not loaded
        self._room: Optional[asyncio.Lock] = None  # made on the loop: one load or unload at a time
        self._released: Optional[asyncio.Event] = None
        self._reaper: Optional[asyncio.Task] = None
        self._tasks: set = set()

    @classmethod
    def single(cls, scheduler) -> "Models":
        """One model, loaded already (tests, and servers built in code)."""
        models = cls({}, build=None)
        models.adopt(scheduler.model_id, scheduler, pinned=True)
        return models

    def adopt(self, name: str, scheduler, pinned: bool = False) -> None:
        """``scheduler`` (started here) as the loaded model ``name``."""
        from .metrics import model_bytes

        e = self.entries.setdefault(name, Entry(name, None, keep_alive=self.idle_unload))
        e.scheduler, e.size, e.last_used = scheduler.start(), model_bytes(scheduler.model), time.monotonic()
        e.pinned = e.pinned or pinned
        if getattr(scheduler, "admission", None) is not None:  # its requests share the budget with every loaded model
            scheduler.admission.others = lambda: sum(x.size for x in self.loaded() if x is not e)
            scheduler.admission.other_stores = lambda: [x.scheduler.caches for x in self._by_use() if x is not e]

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def loaded(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.scheduler is not None]

    def _by_use(self) -> list[Entry]:
        """The loaded models, least recently used first."""
        return sorted(self.loaded(), key=lambda x: x.last_used)

    # Requests ------------------------------------------------------------------------------

    async def acquire(self, e: Entry, keep_alive=UNSET) -> Entry:
        """``e`` loaded, held by the current request until its response ends (once: a request
        that routes again gets what it holds)."""
        held = _held.get()
        if held is not None and e in held:
            return e
        ka = self.idle_unload if keep_alive is UNSET or keep_alive is None else parse_keep_alive(keep_alive)
        e.users += 1
        try:
            deadline = time.monotonic() + self.load_timeout
            while e.scheduler is None:
                if e.loading is None:
                    e.loading = self._spawn(self._load(e, deadline))
                try:
                    await asyncio.wait_for(asyncio.shield(e.loading), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise APIError(503, f"model {e.name!r} is not loaded yet (waited {self.load_timeout:g} s): "
                                   "retry shortly", type_="server_error", code="model_loading") from None
        except BaseException:
            self._release(e)
            raise
        e.keep_alive = ka
        if held is not None:
            held.append(e)
        else:  # outside an HTTP request (``Holds``): nothing will release it
            self._release(e)
        return e

    def _release(self, e: Entry) -> None:
        e.users -= 1
        e.last_used = time.monotonic()
        self._signal()
        if e.users == 0 and e.keep_alive == 0 and e.scheduler is not None:
            self._spawn(self._unload_idle(e))

    def _spawn(self, coroutine) -> asyncio.Task:
        """A task kept until it ends (the loop holds tasks weakly), its failure read by whoever
        awaits it or dropped (a load whose requests all gave up)."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(lambda t: (self._tasks.discard(t), t.cancelled() or t.exception()))
        return task

    def _signal(self) -> None:
        self._lock()
        self._released.set()

    def _lock(self) -> asyncio.Lock:
        if self._room is None:
            self._room, self._released = asyncio.Lock(), asyncio.Event()
        return self._room

    # Loading and unloading -----------------------------------------------------------------

    async def _load(self, e: Entry, deadline: float) -> None:
        try:
            async with self._lock():
                await self._make_room(e, deadline)
                scheduler = await asyncio.to_thread(self.build, e.name, e.path)
                self.adopt(e.name, scheduler)
        except APIError:
            raise
        except Exception as err:  # a folder that fails to load: the request says why, the server serves on
            raise APIError(500, f"model {e.name!r} could not be loaded: {err}", type_="server_error",
                           code="model_load_failed") from err
        finally:
            e.loading = None

    def _over(self, e: Entry) -> int:
        """Bytes the loaded models (weights and prompt caches) and ``e``'s weights exceed the budget by."""
        others = [x for x in self.loaded() if x is not e]
        return 0 if self.budget is None else sum(x.size + x.cached for x in others) + e.size - self.budget

    def _too_many(self, e: Entry) -> bool:
        others = [x for x in self.loaded() if x is not e]
        if not others:
            return False  # alone it loads, whatever its size
        return (self.max_loaded is not None and len(others) + 1 > self.max_loaded) or self._over(e) > 0

    def _drop_caches(self, e: Entry) -> None:
        """The other models' prompt caches give way first, least recently used model first (their
        prefixes stay on disk): cheaper than unloading a model."""
        for x in self._by_use():
            over = self._over(e)
            if over <= 0:
                return
            if x is not e and x.cached:
                x.scheduler.caches.shrink(x.cached - over)

    async def _make_room(self, e: Entry, deadline: float) -> None:
        """Drop prompt caches, then unload least recently used idle models, until ``e`` fits;
        wait while all are busy."""
        while self._too_many(e):
            self._drop_caches(e)
            if not self._too_many(e):
                return
            idle = [x for x in self._by_use() if x is not e and x.users == 0 and not x.pinned]
            if idle:
                await self._unload(idle[0])
                continue
            self._released.clear()
            left = deadline - time.monotonic()
            try:
                await asyncio.wait_for(self._released.wait(), max(0.0, left))
            except asyncio.TimeoutError:
                busy = ", ".join(x.name for x in self.loaded() if x is not e)
                raise APIError(503, f"model {e.name!r} does not fit beside the busy models ({busy}) "
                               f"within {self.load_timeout:g} s: retry shortly", type_="server_error",
                               code="model_loading") from None

    async def _unload(self, e: Entry) -> None:
        """Under the lock: stop ``e``'s worker, flush its disk tier, free its memory."""
        scheduler, e.scheduler = e.scheduler, None
        await asyncio.to_thread(retire, scheduler)
        del scheduler
        free_memory()

    async def _unload_idle(self, e: Entry) -> None:
        async with self._lock():
            if e.users == 0 and e.scheduler is not None and not e.pinned:
                await self._unload(e)

    async def reap(self, tick: float = 0.25) -> None:
        """Unload models idle past their keep-alive, for as long as the server runs."""
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for e in self.loaded():
                due = e.expires
                if e.users == 0 and due is not None and now >= due:
                    await self._unload_idle(e)

    def start(self) -> None:
        """On the server's loop at startup: the idle reaper."""
        self._lock()
        if self._reaper is None:
            self._reaper = asyncio.ensure_future(self.reap())

    def close(self) -> None:
        """SIGTERM/SIGINT: stop every loaded model's jobs (``Scheduler.close``)."""
        for e in self.loaded():
            e.scheduler.close()

    def finish_writes(self, timeout: float = 120.0) -> None:
        """Before the process exits: each loaded model's queued disk-cache blocks written."""
        for e in self.loaded():
            e.scheduler.finish_writes(timeout)


def retire(scheduler) -> None:
    """A model's worker ended and its disk writes done: nothing of it still runs."""
    scheduler.shutdown()
    if scheduler.disk is not None:
        scheduler.disk.blocks.close()


def free_memory() -> None:
    """Collect what the dropped references held, and return MLX's cached buffers."""
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


class Holds:
    """ASGI wrapper: the models a request acquires are held until its response ends (streams
    included); at startup it starts the registry's idle reaper."""

    def __init__(self, app, models: Models):
        self.app, self.models = app, models

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            async def receiving():
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.models.start()
                return message

            return await self.app(scope, receiving, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: list = []
        token = _held.set(held)
        try:
            await self.app(scope, receive, send)
        finally:
            _held.reset(token)
            for e in held:
                self.models._release(e)


def current(required: bool = True):
    """The scheduler of the model the current request acquired (its last)."""
    held = _held.get()
    if held:
        return held[-1].scheduler
    if required:
        raise RuntimeError("no model acquired for this request (Service.route first)")
    return None
