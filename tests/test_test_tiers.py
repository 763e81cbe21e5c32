"""The stack tier's one shared Airflow stack rests on pytest-xdist's `--dist loadgroup` keeping a group's tests on one
worker (Makefile, STACK_TESTS; tests/e2e/conftest.py marks the groups). With pytest 9.2 that silently stopped: its
structured node ids ignore the group suffix xdist writes, so the groups were spread over both workers and each worker
started a shared stack of its own (pytest-dev/pytest-xdist#1386). This runs real pytest and xdist, as the tier does."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CONFTEST = """
import pytest

@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    # As tests/e2e/conftest.py does: a group added at collection, by the fixture a test uses; before xdist's own hook
    # reads the groups (a conftest at the root is registered before xdist's worker plugin, so it would run after it).
    for item in items:
        if "shared_stack" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("shared_stack"))

@pytest.fixture(scope="session")
def shared_stack():
    return None
"""

MODULE = """
import os

def test_on_the_shared_stack(shared_stack, record):
    record("shared")

def test_alone_one(record):
    record("alone")

def test_alone_two(record):
    record("alone")
"""


def test_a_group_added_at_collection_runs_on_one_worker(tmp_path):
    (tmp_path / "conftest.py").write_text(
        CONFTEST
        + textwrap.dedent(f"""
        @pytest.fixture
        def record(request):
            import os
            def write(kind):
                with open({str(tmp_path / "workers.txt")!r}, "a") as out:
                    out.write(f"{{kind}} {{os.environ['PYTEST_XDIST_WORKER']}} {{request.node.nodeid}}\\n")
            return write
        """)
    )
    for name in ("a", "b", "c", "d"):
        (tmp_path / f"test_{name}.py").write_text(MODULE)

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-n",
            "2",
            "--dist",
            "loadgroup",
            "-q",
            "-p",
            "no:cacheprovider",
            str(tmp_path),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line.split() for line in (tmp_path / "workers.txt").read_text().splitlines()]
    shared = [(worker, nodeid) for kind, worker, nodeid in lines if kind == "shared"]
    assert len(shared) == 4
    assert len({worker for worker, _ in shared}) == 1, f"the shared group ran on several workers: {shared}"
    assert all(nodeid.endswith("@shared_stack") for _, nodeid in shared), shared
    # The rest is still spread: grouping is not "everything on one worker".
    assert len({worker for kind, worker, _ in lines}) == 2, lines


def test_the_stack_groups_are_dealt_so_that_the_longest_lane_is_as_short_as_it_can_be(monkeypatch):
    from tests.e2e import conftest
    from tests.e2e.conftest import deal

    # Longest first to the least loaded lane would give 3+2+2 = 7 s on one lane; the best deal is 6 s on each.
    monkeypatch.setattr(conftest, "STACK_GROUP_SECONDS", {"a": 3, "b": 3, "c": 2, "d": 2, "e": 2})
    lanes = deal(["a", "b", "c", "d", "e"], workers=2)

    loads = [sum(conftest.STACK_GROUP_SECONDS[g] for g, lane in lanes.items() if lane == n) for n in (0, 1)]
    assert loads == [6, 6], lanes
    assert set(deal(["a", "b", "c"], workers=1).values()) == {0}


def test_the_project_s_stack_groups_and_a_new_module_fill_both_workers_evenly():
    from tests.e2e.conftest import DEFAULT_GROUP_SECONDS, STACK_GROUP_SECONDS, deal

    groups = [*sorted(STACK_GROUP_SECONDS), "test_new_module"]
    lanes = deal(groups, workers=2)

    assert set(lanes) == set(groups) and set(lanes.values()) == {0, 1}
    seconds = [
        sum(STACK_GROUP_SECONDS.get(g, DEFAULT_GROUP_SECONDS) for g, lane in lanes.items() if lane == n) for n in (0, 1)
    ]
    assert abs(seconds[0] - seconds[1]) <= 60, (lanes, seconds)  # no worker waits long on the other
