"""The session checks (tests/session_checks.py) on a throwaway project: a skip, a file written
into the project, or no tests at all fail the run, each named; temporary folders are fine."""

import os
import subprocess
import sys
import textwrap

from conftest import ROOT


def run_project(tmp_path, tests: str, **env):
    """pytest on a project of one test file whose conftest imports the checks: (status, output)."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / "conftest.py").write_text("from session_checks import *  # noqa: F401,F403\n")
    (project / "test_it.py").write_text(textwrap.dedent(tests))
    base = {k: v for k, v in os.environ.items() if k != "MLX_LFM2_ALLOW_SKIPS"}
    base["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    # Only the checks under test: the environment's plugins (langsmith's alone took ~10 s a run
    # on a loaded CPU) play no part in them.
    base["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"--basetemp={tmp_path / 'basetemp'}"], cwd=project, env={**base, **env},
                       capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout + p.stderr


SKIPS = """
    import pytest

    def test_runs():
        pass

    def test_needs_a_fixture():
        pytest.skip("no reference files here")
"""


def test_a_skipped_test_fails_the_session_and_is_named(tmp_path):
    status, out = run_project(tmp_path, SKIPS)
    assert status == 1, out
    assert "1 tests skipped" in out and "test_it.py::test_needs_a_fixture" in out, out
    assert "no reference files here" in out and "MLX_LFM2_ALLOW_SKIPS=1" in out, out


def test_skips_pass_when_allowed(tmp_path):
    status, out = run_project(tmp_path, SKIPS, MLX_LFM2_ALLOW_SKIPS="1")
    assert status == 0 and "1 passed, 1 skipped" in out, out


def test_a_file_written_into_the_project_fails_the_session_and_tmp_path_does_not(tmp_path):
    status, out = run_project(tmp_path, """
        from pathlib import Path

        def test_writes_a_temporary_file(tmp_path):
            (tmp_path / "fine.txt").write_text("x")

        def test_writes_into_the_project():
            Path(__file__).parent.joinpath("out", "result.json").parent.mkdir()
            Path(__file__).parent.joinpath("out", "result.json").write_text("{}")
    """)
    assert status == 1 and "2 passed" in out, out
    assert "tests wrote 1 files inside" in out and "out/result.json" in out and "fine.txt" not in out, out


def test_no_tests_is_a_failure_in_words(tmp_path):
    status, out = run_project(tmp_path, "x = 1\n")
    assert status == 5 and "no tests were collected" in out, out
