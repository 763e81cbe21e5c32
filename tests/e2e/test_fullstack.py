"""The real Airflow components (`airflow standalone`: scheduler, dag-processor, triggerer, API server) against the
emulator, driven through the REST API v2. Unlike dag.test(), this runs the deferred wait in the real triggerer."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from include.local_aws.world import SAMPLE_KEY, boto_client, make_sample_clip
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.fullstack]
DAG_ID = "vod_sr_batch"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Airflow:
    """`airflow standalone` in its own process group, with an Airflow home of its own."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.port = free_port()
        self.log_path = home / "standalone.log"
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **env,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PARALLELISM": "4",  # standalone would start 32 workers on a 2-core machine
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{self.port}/execution/",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "PYTHONPATH": str(REPO_ROOT),
            "PATH": f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}",  # standalone runs `airflow` from PATH
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.token = ""

    def start(self, timeout: float = 240) -> Airflow:
        self.home.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "airflow"), "standalone"],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, self.tail()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/auth/token", timeout=5) as response:
                    self.token = json.load(response)["access_token"]
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, "the API server did not come up:\n" + self.tail()
                time.sleep(2)
        self.wait_until(lambda: self.api("GET", f"/dags/{DAG_ID}") is not None, 180, "the DAG was never parsed")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # standalone's children live in its process group
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def api(self, method: str, path: str, body: Any | None = None) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/api/v2{path}",
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise AssertionError(f"{method} {path}: {error.code} {error.read().decode()}") from None

    def wait_until(self, condition, timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"{message}\n{self.tail()}"
            time.sleep(2)

    def trigger(self, conf: dict[str, Any]) -> str:
        return self.api("POST", f"/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": conf})["dag_run_id"]

    def run_state(self, run_id: str) -> str:
        return self.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}")["state"]

    def task_states(self, run_id: str) -> dict[str, str]:
        tis = self.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")["task_instances"]
        return {ti["task_id"]: ti["state"] for ti in tis}


@pytest.fixture
def airflow(world, tmp_path):
    stack = Airflow(tmp_path / "airflow-home", dict(os.environ)).start()
    yield stack
    stack.stop()


def test_triggered_through_the_rest_api_the_triggerer_runs_the_wait(airflow, world):
    world.upload(SAMPLE_KEY)

    run_id = airflow.trigger({"sources": [SAMPLE_KEY], "model": "cpu"})
    airflow.wait_until(lambda: airflow.run_state(run_id) in ("success", "failed"), 300, "the run never ended")

    assert airflow.run_state(run_id) == "success", airflow.task_states(run_id)
    assert world.s3.head_object(Bucket="vod-sr-demo-output", Key="original_640x480_10s_sr_cpu.mp4")["ContentLength"] > 0
    assert world.instance_state() == "stopped"
    wait_logs = (
        airflow.home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / "task_id=lane.run_chunks" / "map_index=0"
    )
    assert "Pausing task as DEFERRED" in (wait_logs / "attempt=1.log").read_text()
    (trigger_log,) = wait_logs.glob("attempt=1.log.trigger.*.log")  # written by the triggerer process
    assert "Trigger fired event" in trigger_log.read_text() and "'outcome': 'success'" in trigger_log.read_text()


def test_marking_a_run_failed_still_stops_the_instance_and_cancels_its_command(airflow, world, tmp_path):
    # A 90 s clip keeps the SR command busy for half a minute: long enough to give up on it while it runs.
    world.upload("long.mp4", make_sample_clip(tmp_path / "long.mp4", seconds=90))
    run_id = airflow.trigger({"sources": ["long.mp4"], "model": "cpu"})
    airflow.wait_until(
        lambda: airflow.task_states(run_id).get("lane.run_chunks") == "deferred", 240, "the wait never deferred"
    )

    airflow.api("PATCH", f"/dags/{DAG_ID}/dagRuns/{run_id}", {"state": "failed"})
    airflow.wait_until(
        lambda: airflow.task_states(run_id).get("lane.release") in ("success", "failed"), 240, "the teardown never ran"
    )

    assert airflow.task_states(run_id)["lane.release"] == "success"
    assert world.instance_state() == "stopped"
    ssm = boto_client("ssm", world.emulator.endpoint_url)
    commands = ssm.list_commands(InstanceId=world.instance_id)["Commands"]
    sr_commands = [c for c in commands if "chunk 0" in c["Comment"]]
    assert [c["Status"] for c in sr_commands] == ["Cancelled"]
