"""A loader belongs to the process that started its workers (issue 12).

A forked child (os.fork() with a live loader) that iterates gets a clear error instead
of taking the parent's batches, and whatever the child does with its copy (exit with it
alive, delete it, close it) leaves the parent's workers, factory and files alone: the
parent finishes its epochs with torch's batches and the same worker processes. The
scenarios run as a script (tests/fork_scenarios.py) so the children exit for real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_DIR, SRC_DIR, TESTS_DIR

CONFIGS = [("process", "fork"), ("process", "spawn"), ("thread", "fork")]


def _run(scenario: str, worker_type: str, method: str) -> tuple[dict, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC_DIR, TESTS_DIR, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, os.path.join(TESTS_DIR, "fork_scenarios.py"), scenario, worker_type, method],
        capture_output=True, text=True, cwd=REPO_DIR, env=env, timeout=150,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _check_parent(out: dict, stderr: str) -> None:
    assert out["nostall"] == out["torch"]  # every batch, in torch's order, none lost to a child
    assert out["pids_after"] == out["pids_before"]  # the same workers: none died or was replaced
    assert out["restarts"] == []
    # Nothing went wrong in any process (the children's exit handlers included).
    for bad in ("Traceback", "AssertionError", "Exception ignored", "Warning"):
        assert bad not in stderr, stderr


@pytest.mark.timeout(180)
@pytest.mark.parametrize("worker_type,method", CONFIGS)
def test_forked_child_cannot_iterate_and_parent_goes_on(worker_type, method):
    out, stderr = _run("iterate", worker_type, method)
    _check_parent(out, stderr)
    (child,) = out["children"]
    assert child["status"] == 0
    report = child["report"]
    for what in ("next", "iter", "worker_pids"):
        error = report["errors"][what]
        assert error is not None, f"{what}() in the forked child did not raise"
        assert "a fork of it" in error and "Create a new DataLoader in this process" in error
    assert report["len"] == 16  # len() reads no worker
    assert report["own"] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a loader made in the child works


@pytest.mark.timeout(240)
@pytest.mark.parametrize("worker_type,method", CONFIGS)
def test_forked_child_exit_delete_close_leave_parent_alone(worker_type, method):
    """Ten children, each exits for real with the loader alive, deleted or closed
    (before the fix the finalizer in the child closed the parent's pool in 9 of 14 runs)."""
    out, stderr = _run("exit", worker_type, method)
    _check_parent(out, stderr)
    assert [c["report"]["action"] for c in out["children"]] == ["alive", "delete", "close"] * 3 + ["alive"]
    assert all(c["status"] == 0 for c in out["children"])
