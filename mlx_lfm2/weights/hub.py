"""What the Hugging Face hub's failures mean to a user, in one message for every command.

huggingface_hub raises many exception types, wordy and nested (a ``LocalEntryNotFoundError``
wrapping an ``httpx.ConnectError`` wrapping a ``socket.gaierror``). Every command that may
fetch from the hub (chat, generate, the server, convert, the first run) turns them into one
``HubError`` that names the repo, the cause (the innermost exception, one line) and what to
do: a model on disk (``--model FOLDER``), the local cache alone (``HF_HUB_OFFLINE=1``), or
the network.
"""

from __future__ import annotations

import os


class HubError(FileNotFoundError):
    """A model could not be had from the hub; the message says why and what to do instead."""


def offline() -> bool:
    """True when HF_HUB_OFFLINE asks huggingface_hub to use its cache alone."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception of a chain (what actually went wrong)."""
    seen = {id(err)}
    while (nxt := err.__cause__ or err.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        err = nxt
    return err


def _one_line(err: BaseException, limit: int = 160) -> str:
    text = (str(err).strip().splitlines() or [""])[0]
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def hub_error(repo: str, err: BaseException, flag: str = "--model") -> HubError:
    """The one message for ``err`` while fetching ``repo``; ``flag`` is the command's option
    that takes a model folder instead of a repo id."""
    from huggingface_hub import errors

    instead = f"use a model on disk with {flag} FOLDER"
    if offline():
        cause = "HF_HUB_OFFLINE is set and the Hugging Face cache holds no complete copy of it"
        todo = f"{instead}, or unset HF_HUB_OFFLINE to download it"
    elif isinstance(err, (errors.RepositoryNotFoundError, errors.GatedRepoError)):
        cause = f"the hub has no public repo of that name ({_one_line(root_cause(err))})"
        todo = f"check the repo id (a private or gated repo needs `hf auth login`), or {instead}"
    elif isinstance(err, errors.RevisionNotFoundError):
        cause = f"the repo has no such revision ({_one_line(root_cause(err))})"
        todo = f"check the revision, or {instead}"
    else:
        cause = f"the hub cannot be reached ({_one_line(root_cause(err))})"
        todo = (f"check the network and run again (a partial download is kept and resumes), {instead}, "
                "or set HF_HUB_OFFLINE=1 to use a copy in the Hugging Face cache")
    return HubError(f"could not get {repo} from the Hugging Face hub: {cause}. To go on: {todo}.")
