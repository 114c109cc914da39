"""Adapters served by name: ``--adapter NAME=PATH`` at start, loaded and unloaded while serving.

Every resident adapter (``model.lora_rows``) is a model name of its own: listed by
``/v1/models``, chosen by a request's ``model`` (``Service.route``), its rows decoded in the
same batch as the base's and the other adapters'. vLLM's routes change the set without a
restart, behind the API key when one is set:

* ``POST /v1/load_lora_adapter {"lora_name", "lora_path"}``: ``lora_path`` is a folder
  relative to ``--adapter-dir`` (no absolute path, no ``..``, no link out of it: a request
  never names an arbitrary file). The folder is checked (config, safetensors header and
  size, every array's name, shape and dtype against the base) before MLX reads it; a bad one
  is a 400 naming the problem. The worker adds the adapter between two decode steps, so
  running streams go on untouched.
* ``POST /v1/unload_lora_adapter {"lora_name"}``: refused (409) while any running or queued
  request uses the adapter, so no reply ever changes adapter midway; retry when they finish.

At most ``--max-adapters`` are resident (each holds its A/B for every layer it adapts). A load
writes one free slot of the resident stacks in place (``AdapterSet.add``); when none is free
the stacks grow to twice the adapters (at most ``--max-adapters``), a one-time copy.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path, PurePosixPath
from typing import Optional

from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from ..command import ADAPTER_NAME as NAME
from ..weights.adapters import AdapterError, add_resident
from .boundary import APIError

DEFAULT_MAX_ADAPTERS = 8


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    lora_name: str
    lora_path: str


class UnloadRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    lora_name: str
    lora_int_id: Optional[int] = None  # vLLM's clients may send it; names are what count here


class AdapterTable:
    """The served adapters of one scheduler: hot load and unload (see the module docstring)."""

    def __init__(self, scheduler, folder: Optional[str] = None, max_adapters: int = DEFAULT_MAX_ADAPTERS):
        self.scheduler = scheduler
        self.folder = Path(folder).expanduser().resolve() if folder else None
        self.max_adapters = max_adapters
        self.lock = asyncio.Lock()  # one load or unload at a time
        if self.set is not None:
            self.set.limit = max_adapters  # the stacks grow up to this many slots, never past it

    @property
    def set(self):
        return self.scheduler.adapters

    def resolve(self, given: str) -> Path:
        """``given`` as a folder under ``--adapter-dir`` (400 for anything else)."""
        if self.folder is None:
            raise APIError(400, "loading adapters is off: start the server with --adapter-dir FOLDER",
                           param="lora_path", code="adapter_dir_not_set")
        rel = PurePosixPath(given)
        if not given or rel.is_absolute() or given.startswith("~") or "\\" in given or ".." in rel.parts:
            raise APIError(400, f"lora_path {given!r} must be a folder name relative to --adapter-dir "
                                "(no absolute path, no '..')", param="lora_path", code="invalid_path")
        target = (self.folder / rel).resolve()
        if not target.is_relative_to(self.folder) or target == self.folder:
            raise APIError(400, f"lora_path {given!r} leads outside --adapter-dir", param="lora_path",
                           code="invalid_path")
        if not target.is_dir():
            raise APIError(400, f"no adapter folder {given!r} under --adapter-dir", param="lora_path",
                           code="adapter_not_found")
        out = [f.name for f in target.iterdir() if not f.resolve().is_relative_to(self.folder)]
        if out:
            raise APIError(400, f"lora_path {given!r}: {', '.join(sorted(out))} link(s) outside --adapter-dir",
                           param="lora_path", code="invalid_path")
        return target

    def check_name(self, name: str) -> None:
        if not NAME.match(name):
            raise APIError(400, f"lora_name {name!r}: letters, digits and ._:@/- (at most 64, not starting "
                                "with a sign)", param="lora_name")
        if name == self.scheduler.model_id or name in self.set:
            raise APIError(400, f"the name {name!r} is already served: unload it first, or pick another",
                           param="lora_name", code="adapter_exists")
        if len(self.set.loaded) >= self.max_adapters:
            raise APIError(400, f"{self.max_adapters} adapters are loaded already (--max-adapters): unload one first",
                           param="lora_name", code="too_many_adapters")

    async def load(self, name: str, given: str) -> dict:
        async with self.lock:
            folder = await asyncio.to_thread(self.resolve, given)  # stat and list the disk off the event loop
            self.check_name(name)
            tic = time.perf_counter()
            try:  # on the worker, between two steps: read, checked before MLX reads it, stacked
                info = await asyncio.wrap_future(self.scheduler.call(lambda: add_resident(self.set, name, folder)))
            except AdapterError as e:
                raise APIError(400, str(e).replace(str(self.folder), "--adapter-dir"), param="lora_path",
                               code="invalid_adapter")
            return {**info, "load_ms": round(1000 * (time.perf_counter() - tic), 1)}

    async def unload(self, name: str) -> None:
        async with self.lock:
            if self.set is None or name not in self.set:
                loaded = ", ".join(self.set.loaded) if self.set is not None else ""
                raise APIError(404, f"adapter {name!r} is not loaded (loaded: {loaded or 'none'})",
                               param="lora_name", type_="not_found_error", code="adapter_not_found")

            def remove():
                n = self.scheduler.in_use(name)
                if n:
                    return n
                self.set.remove(name)
                return 0

            busy = await asyncio.wrap_future(self.scheduler.call(remove))
            if busy:
                raise APIError(409, f"adapter {name!r} is in use by {busy} request(s): unload it when they finish",
                               param="lora_name", code="adapter_in_use")


def routes(service, table: AdapterTable) -> list[Route]:
    """vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (plain-text success
    bodies as vLLM's; errors in OpenAI's shape)."""

    async def load(request: Request):
        req = await service.read(request, LoadRequest)
        info = await table.load(req.lora_name, req.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.",
                                 headers={"x-load-ms": str(info["load_ms"])})

    async def unload(request: Request):
        req = await service.read(request, UnloadRequest)
        await table.unload(req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    return [Route("/v1/load_lora_adapter", load, methods=["POST"]),
            Route("/v1/unload_lora_adapter", unload, methods=["POST"])]
