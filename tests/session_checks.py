"""Checks on the whole test session, so that the README's test command (which CI runs) cannot
pass quietly:

- **No test is skipped.** A plain clone carries every fixture and ``.[test]`` installs every
  reference library, so a skip means something is missing; the session fails and lists each
  skip with its reason. ``MLX_LFM2_ALLOW_SKIPS=1`` allows them (say, a partial install).
- **Tests write only to temporary folders.** Files under the rootdir (the repository) that a
  test creates or modifies fail the session, named. ``.git``, ``.venv``, ``__pycache__``,
  ``.pytest_cache`` and ``*.egg-info`` are left out: the installer and pytest write those.
- **No tests is a failure**, said in words (pytest's exit status 5, not 0).

``tests/conftest.py`` imports these hooks; ``tests/test_session_checks.py`` runs them on a
throwaway project.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ALLOW_SKIPS = "MLX_LFM2_ALLOW_SKIPS"
_UNWATCHED = {".git", ".venv", "__pycache__", ".pytest_cache"}
_tree = pytest.StashKey[dict]()
_problems = pytest.StashKey[list]()
_skipped: list = []  # "nodeid: reason"; the logreport hook sees no session (one session per process)


def files_under(root: Path) -> dict:
    """``relative path -> (mtime_ns, size)`` of every file under ``root`` that tests must not touch."""
    found = {}
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in _UNWATCHED and not d.endswith(".egg-info")]
        for name in names:
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except OSError:  # removed while we looked
                continue
            found[os.path.relpath(path, root)] = (st.st_mtime_ns, st.st_size)
    return found


def pytest_sessionstart(session):
    session.config.stash[_tree] = files_under(session.config.rootpath)
    _skipped.clear()


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    problems = []
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        problems.append("no tests were collected or selected: nothing was checked")
    if _skipped and not os.environ.get(ALLOW_SKIPS):
        problems.append(f"{len(_skipped)} tests skipped; the suite must run whole "
                        f"(set {ALLOW_SKIPS}=1 to allow skips):\n    " + "\n    ".join(_skipped))
    before, after = session.config.stash.get(_tree, None), files_under(session.config.rootpath)
    if before is not None:
        written = sorted(p for p, st in after.items() if before.get(p) != st)
        if written:
            problems.append(f"tests wrote {len(written)} files inside {session.config.rootpath} "
                            "(write to tmp_path instead):\n    " + "\n    ".join(written[:20]))
    session.config.stash[_problems] = problems
    if problems and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, config):
    for problem in config.stash.get(_problems, []):
        terminalreporter.write_line(f"session check failed: {problem}", red=True, bold=True)
