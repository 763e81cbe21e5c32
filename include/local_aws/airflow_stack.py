"""The real Airflow components on this machine: `airflow standalone` against the emulator.

Used by the full-stack tests and the benchmark: unlike dag.test(), deferred tasks run in the real triggerer and
every task goes through the scheduler and an executor, with their real latencies.
"""

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from include.local_aws.world import REPO_ROOT

# SQLite's default 5 s busy timeout is too short once a few dozen task processes write at once: the scheduler
# then dies with "database is locked" (seen in `make bench` with the stock-operator baseline). Wait instead.
SQLITE_CONNECT_ARGS = {"timeout": 60}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AirflowStack:
    """`airflow standalone` (scheduler, dag-processor, triggerer, API server) in its own process group, with an
    Airflow home of its own, driven through the REST API v2."""

    def __init__(
        self, home: Path, env: dict[str, str], dags_folder: Path = REPO_ROOT / "dags", parallelism: int = 4
    ) -> None:
        self.home = home
        self.port = free_port()
        self.log_path = home / "standalone.log"
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **env,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PARALLELISM": str(parallelism),  # standalone starts 32 workers unless told
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{self.port}/execution/",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": "include.local_aws.airflow_stack.SQLITE_CONNECT_ARGS",
            "PYTHONPATH": str(REPO_ROOT),
            "PATH": f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}",  # standalone runs `airflow` from PATH
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.replacements: list[subprocess.Popen[bytes]] = []  # components started again after a kill
        self.token = ""

    def start(self, timeout: float = 240, dag_ids: tuple[str, ...] = ("vod_sr_batch",)) -> AirflowStack:
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
        for dag_id in dag_ids:
            self.wait_until(lambda d=dag_id: self.api("GET", f"/dags/{d}") is not None, 180, f"{dag_id} never parsed")
        return self

    def stop(self) -> None:
        for replacement in self.replacements:
            if replacement.poll() is None:
                os.killpg(replacement.pid, signal.SIGTERM)
                try:
                    replacement.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(replacement.pid, signal.SIGKILL)
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # standalone's children live in its process group
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()

    def component_pids(self, component: str) -> list[int]:
        """Pids of this stack's `airflow <component>` processes (scheduler, triggerer, dag-processor, ...)."""
        import psutil

        assert self.process is not None
        processes = psutil.Process(self.process.pid).children(recursive=True)
        processes += [psutil.Process(r.pid) for r in self.replacements if r.poll() is None]
        pids = []
        for child in processes:
            try:
                command = child.cmdline()
            except psutil.Error:
                continue
            if any(part.endswith("airflow") for part in command[:2]) and component in command[1:3]:
                pids.append(child.pid)
        return pids

    def replace_triggerer(self) -> int:
        """SIGKILL the running triggerer (a host lost mid-wait) and start a new one; returns the new pid.

        The new process gets a process group of its own (another session's group cannot be joined); `stop` ends it
        with the rest."""
        assert self.process is not None
        old = self.component_pids("triggerer")
        assert old, "no triggerer is running"
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        replacement = subprocess.Popen(
            [str(Path(sys.executable).parent / "airflow"), "triggerer"],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.replacements.append(replacement)
        return replacement.pid

    def pid_with_connection(self, local_port: int) -> int | None:
        """Pid of this stack's process holding a TCP connection from `local_port`, or None.

        A server that received a request knows the client's port: this finds the process behind it, e.g. the task
        process that is making a given AWS call, to kill it at exactly that point."""
        import psutil

        assert self.process is not None
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                connections = child.net_connections(kind="tcp")
            except psutil.Error:
                continue
            if any(connection.laddr and connection.laddr.port == local_port for connection in connections):
                return child.pid
        return None

    @staticmethod
    def is_alive(pid: int) -> bool:
        """Whether `pid` still runs (a killed process its parent has not reaped yet does not)."""
        import psutil

        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

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

    def wait_until(self, condition: Callable[[], bool], timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"{message}\n{self.tail()}"
            time.sleep(2)

    def trigger(self, conf: dict[str, Any], dag_id: str = "vod_sr_batch") -> str:
        return self.api("POST", f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})["dag_run_id"]

    def run(self, run_id: str, dag_id: str = "vod_sr_batch") -> dict[str, Any]:
        return self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")

    def run_state(self, run_id: str, dag_id: str = "vod_sr_batch") -> str:
        return self.run(run_id, dag_id)["state"]

    def wait_for_run(self, run_id: str, timeout: float, dag_id: str = "vod_sr_batch") -> str:
        self.wait_until(lambda: self.run_state(run_id, dag_id) in ("success", "failed"), timeout, "the run never ended")
        return self.run_state(run_id, dag_id)

    def task_states(self, run_id: str, dag_id: str = "vod_sr_batch") -> dict[str, str]:
        tis = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=1000")["task_instances"]
        return {ti["task_id"]: ti["state"] for ti in tis}
