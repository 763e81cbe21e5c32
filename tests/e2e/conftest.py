"""End-to-end fixtures: the real DAG through `dag.test()` against the emulator, with real ffmpeg and AWS CLI.

Only the vendor's GPU filters are replaced, by the `cpu` model (libx264 lanczos 2x), because they cannot run here.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from include.local_aws.world import (
    OUTPUT_BUCKET,
    SOURCE_BUCKET,
    airflow_env,
    boto_client,
    create_world,
    make_sample_clip,
)
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.e2e
# The pipeline's fixed waits (production defaults in include/vod_sr/settings.py), set to what dag.test() against the
# emulator needs. dag.test() runs the trigger in line, so no scheduler can race a resume (apache/airflow#72716): no
# settle after a deferral. A real stack keeps the production settle: see `stack_env`.
DAG_TEST_WAITS = {
    "VOD_SR_START_RETRY_DELAY": "1",
    "VOD_SR_RETRY_DELAY": "1",
    "VOD_SR_DEFER_SETTLE_SECONDS": "0",
    "VOD_SR_AGENT_QUICK_WAIT_SECONDS": "2",
}


def stack_env(**overrides: str) -> dict[str, str]:
    """The environment for a real Airflow stack (AirflowStack) in a test using `world`: this process's, with the
    production settle after a deferral, since the scheduler, triggerer and workers do race (apache/airflow#72716)."""
    env = {**os.environ, **overrides}
    if "VOD_SR_DEFER_SETTLE_SECONDS" not in overrides:
        env.pop("VOD_SR_DEFER_SETTLE_SECONDS", None)
    return env


# A full-stack test starts a stack (up to a minute on a loaded 2-core machine) and follows runs through it: twice the
# suite's 300 s limit (pyproject.toml) before it is called hung.
FULLSTACK_TIMEOUT = 600


# Seconds each stack-tier group takes on the project's 2-core machine, two stacks at a time (a fresh clone's CI run at
# 316abc9, 2026-12-07, test-artifacts/durations/stack.tsv, summed per group): the groups are dealt to the tier's
# xdist workers by them (`deal`). Left to itself, xdist hands a worker its next group while the current one still
# runs, so one worker could take every one-test module in turn while the other ran the shared stack's 15 tests. A
# group missing here counts DEFAULT_GROUP_SECONDS; update the figures when a group's time changes a lot.
STACK_GROUP_SECONDS = {
    "shared_airflow": 452,
    "test_fullstack": 258,
    "test_event_mode": 195,
    "test_nightly_backfill": 177,
    "test_worker_loss": 173,
    "test_notifications_fullstack": 111,
    "test_vod_sr_pages_auth": 21,
}
DEFAULT_GROUP_SECONDS = 60
EXHAUSTIVE_DEALS = 100_000  # up to this many ways to deal, try them all (2 workers: up to 16 groups)


def deal(groups: list[str], workers: int) -> dict[str, int]:
    """Each group's lane (0 .. workers - 1), so that the longest lane is as short as it can be: every way of dealing
    is tried when there are few; else the longest group first, each to the lane with the least time so far."""
    workers = max(1, workers)
    ordered = sorted(groups, key=lambda g: (-STACK_GROUP_SECONDS.get(g, DEFAULT_GROUP_SECONDS), g))
    seconds = [STACK_GROUP_SECONDS.get(g, DEFAULT_GROUP_SECONDS) for g in ordered]

    def longest_lane(lanes_of: tuple[int, ...]) -> float:
        return max(sum(s for s, lane in zip(seconds, lanes_of, strict=True) if lane == n) for n in range(workers))

    if workers ** len(ordered) <= EXHAUSTIVE_DEALS:
        best = min(itertools.product(range(workers), repeat=len(ordered)), key=longest_lane)
        return dict(zip(ordered, best, strict=True))
    lanes = [0.0] * workers
    dealt: dict[str, int] = {}
    for group, group_seconds in zip(ordered, seconds, strict=True):
        lane = lanes.index(min(lanes))
        lanes[lane] += group_seconds
        dealt[group] = lane
    return dealt


@pytest.hookimpl(tryfirst=True)  # before xdist's worker hook turns the groups into node ids (tests/test_test_tiers.py)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """For `--dist loadgroup` (the stack tier, Makefile): the tests on the shared stack are one group, so one xdist
    worker runs them on one shared stack; any other module is a group, so its module fixtures start once; and the
    groups are dealt into one lane per worker (`deal`), so the workers end together. Full-stack tests get
    FULLSTACK_TIMEOUT unless they set their own."""
    groups: dict[pytest.Item, str] = {}
    for item in items:
        if item.path.parent != Path(__file__).parent:
            continue
        if item.get_closest_marker("xdist_group") is None:
            shared = "shared_airflow" in getattr(item, "fixturenames", ())
            groups[item] = "shared_airflow" if shared else item.path.stem
        if item.get_closest_marker("fullstack") and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(FULLSTACK_TIMEOUT))
    # This runs before `-m` deselects: deal the groups the stack tier selects (Makefile, STACK_TESTS).
    stack_groups = {group for item, group in groups.items() if item.get_closest_marker("fullstack")}
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    lanes = deal(sorted(stack_groups), workers) if getattr(config.option, "loadgroup", False) else {}
    for item, group in groups.items():
        item.add_marker(pytest.mark.xdist_group(f"lane-{lanes[group]}" if group in lanes else group))


@pytest.fixture(scope="session")
def airflow_db():
    """Migrate the session's fresh Airflow metadata DB (SQLite)."""
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server for the session; each Airflow stack takes a database of its own."""
    from include.local_aws.services import PostgresServer

    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_server():
    from include.local_aws.services import RedisServer

    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def airflow_template(postgres, tmp_path_factory) -> str:
    """A PostgreSQL database migrated once for the session: each stack's database is a copy of it."""
    from include.local_aws.airflow_stack import Backend

    return Backend.migrated_template(postgres, tmp_path_factory.mktemp("template-home"))


@pytest.fixture
def airflow_backend(postgres, redis_server, airflow_template):
    """The production deployment for one Airflow stack: its own Postgres database (a copy of the migrated template),
    an empty Redis broker, the CeleryExecutor with two workers and two triggerers."""
    from include.local_aws.airflow_stack import Backend

    return Backend.fresh_celery(postgres, redis_server, template=airflow_template)


@pytest.fixture(scope="session")
def shared_airflow(emulator, postgres, redis_server, airflow_template, tmp_path_factory):
    """One production deployment (Celery: two workers, two triggerers) shared by the full-stack tests that only
    trigger, read and mark runs failed; tests that kill a component, or need settings that change the DAGs (a
    schedule, a queue, a topic), start their own. Each test still starts from a clean state: its own instance or
    fleet (`instance_ids` or the fleet fields in the run's conf) and its own runs; the default instance in its
    settings is one of its own. Waits are production ones but the retry delays (see `stack_env`)."""
    from include.local_aws.airflow_stack import AirflowStack, Backend

    default_instance = create_world(emulator.endpoint_url)
    env = {name: value for name, value in os.environ.items() if name not in DAG_TEST_WAITS}
    env.update(airflow_env(emulator.endpoint_url, default_instance))
    env.update({"VOD_SR_START_RETRY_DELAY": "1", "VOD_SR_RETRY_DELAY": "1"})
    backend = Backend.fresh_celery(postgres, redis_server, template=airflow_template)
    stack = AirflowStack(tmp_path_factory.mktemp("shared-airflow"), env, backend=backend).start()
    yield stack
    stack.stop()
    assert stack.leaked == []  # every process ended with its component


@pytest.fixture(scope="session")
def figures():
    """Measurements taken by the full-stack tests (takeover times, suite figures), kept in
    test-artifacts/fullstack-figures.json for the README's scaling guide and the issue notes."""
    import json

    taken: dict[str, Any] = {}
    yield taken
    if taken:
        path = REPO_ROOT / "test-artifacts" / "fullstack-figures.json"
        path.parent.mkdir(exist_ok=True)
        earlier = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**earlier, **taken}, indent=2, sort_keys=True))


@pytest.fixture(scope="session")
def sample_clip(tmp_path_factory) -> Path:
    """What `World.upload` puts by default: a 2 s 320x240 clip (H.264 + AAC), for tests where the media's length and
    size do not matter. It encodes and upscales in a fraction of a second."""
    return make_sample_clip(tmp_path_factory.mktemp("media") / "clip_320x240_2s.mp4", seconds=2, size="320x240")


@pytest.fixture(scope="session")
def full_clip(tmp_path_factory) -> Path:
    """The seed's 10 s 640x480 clip, for tests about duration, resolution, QC frames or model runs overlapping."""
    return make_sample_clip(tmp_path_factory.mktemp("media") / "original_640x480_10s.mp4")


@dataclass
class BatchRun:
    state: str
    task_states: dict[str, list[str]]
    run_id: str


@dataclass
class World:
    emulator: Any
    instance_id: str
    s3: Any
    ec2: Any
    sample_clip: Path

    def upload(self, key: str, path: Path | None = None, body: bytes | None = None) -> None:
        if body is not None:
            self.s3.put_object(Bucket=SOURCE_BUCKET, Key=key, Body=body)
        else:
            self.s3.upload_file(str(path or self.sample_clip), SOURCE_BUCKET, key)

    def instance_state(self) -> str:
        reservations = self.ec2.describe_instances(InstanceIds=[self.instance_id])["Reservations"]
        return reservations[0]["Instances"][0]["State"]["Name"]

    def download(self, key: str, to: Path) -> Path:
        self.s3.download_file(OUTPUT_BUCKET, key, str(to))
        return to

    def actions(self) -> list[str]:
        return [c["action"] for c in self.emulator.calls()]

    def run(self, **conf: Any) -> BatchRun:
        """Trigger vod_sr_batch with `conf` through `dag.test()` and wait for it to end."""
        from airflow.dag_processing.dagbag import DagBag
        from airflow.models.taskinstance import TaskInstance
        from airflow.utils.session import create_session

        dag = DagBag(dag_folder=str(REPO_ROOT / "dags")).dags["vod_sr_batch"]
        dag_run = dag.test(run_conf={"model": "cpu", **conf})
        with create_session() as session:
            tis = session.query(TaskInstance).filter_by(dag_id=dag.dag_id, run_id=dag_run.run_id).all()
            task_states: dict[str, list[str]] = {}
            for ti in sorted(tis, key=lambda t: (t.task_id, t.map_index)):
                task_states.setdefault(ti.task_id, []).append(str(ti.state))
        return BatchRun(str(dag_run.state), task_states, dag_run.run_id)


@pytest.fixture
def world(emulator_env, airflow_db, sample_clip, monkeypatch) -> World:
    """A fresh stopped instance and empty output bucket; Airflow settings pointing at them."""
    instance_id = create_world(emulator_env.endpoint_url)
    s3 = boto_client("s3", emulator_env.endpoint_url)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=OUTPUT_BUCKET):
        for item in page.get("Contents", []):
            s3.delete_object(Bucket=OUTPUT_BUCKET, Key=item["Key"])
    for name, value in airflow_env(emulator_env.endpoint_url, instance_id).items():
        monkeypatch.setenv(name, value)
    for name, value in DAG_TEST_WAITS.items():
        monkeypatch.setenv(name, value)
    emulator_env.reset_calls()
    return World(emulator_env, instance_id, s3, boto_client("ec2", emulator_env.endpoint_url), sample_clip)
