"""The real Airflow components on this machine, each its own process as on separate hosts, against the emulator.

Used by the full-stack tests and the benchmark: unlike dag.test(), deferred tasks run in a real triggerer and every
task goes through the scheduler and an executor, with their real latencies. Two deployments:

- `Backend.celery(...)`: PostgreSQL and Redis, the CeleryExecutor, N Celery workers and N triggerers (what a
  production deployment runs; the full-stack tests);
- `Backend()`: SQLite and the LocalExecutor inside the scheduler (nothing to install; what `airflow standalone` runs).

Each component runs in a process group of its own, with a hostname of its own (`VOD_SR_COMPONENT_HOSTNAME`, read by
`component_hostname` as Airflow's `hostname_callable`), so a test can kill one "host" and see who took over.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

from include.local_aws.services import PostgresServer, RedisServer, free_port, stop_process_group, tagged_processes
from include.local_aws.world import REPO_ROOT

__all__ = ["AirflowStack", "ApiUnavailable", "Backend", "Component", "component_hostname", "free_port"]

# SQLite's default 5 s busy timeout is too short once a few dozen task processes write at once: the scheduler
# then dies with "database is locked" (seen in `make bench` with the stock-operator baseline). Wait instead.
SQLITE_CONNECT_ARGS = {"timeout": 60}
STACK_TAG = "VOD_SR_AIRFLOW_STACK"
SIMPLE_AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"


class ApiUnavailable(AssertionError):
    """The API server gave no usable answer (timeouts, connection errors, 5xx) after every attempt."""


def component_hostname() -> str:
    """Airflow's `[core] hostname_callable` in these stacks: the component's own name ("worker-2", ...), so task
    instances and jobs say which of the processes on this one machine ran them."""
    import socket

    return os.environ.get("VOD_SR_COMPONENT_HOSTNAME") or socket.getfqdn()


@dataclass(frozen=True)
class Backend:
    """Where the metadata lives and how tasks reach workers."""

    database_url: str | None = None  # None: SQLite in the stack's home
    broker_url: str | None = None  # set: CeleryExecutor with this broker
    result_backend: str | None = None
    workers: int = 0
    triggerers: int = 1
    worker_concurrency: int = 4
    migrated: bool = False  # the database is a copy of a migrated one (`migrated_template`): no `airflow db migrate`

    @classmethod
    def celery(
        cls,
        database_url: str,
        broker_url: str,
        workers: int = 2,
        triggerers: int = 2,
        worker_concurrency: int = 4,
        migrated: bool = False,
    ) -> Backend:
        return cls(
            database_url=database_url,
            broker_url=broker_url,
            result_backend="db+" + database_url.replace("postgresql+psycopg2://", "postgresql://"),
            workers=workers,
            triggerers=triggerers,
            worker_concurrency=worker_concurrency,
            migrated=migrated,
        )

    @classmethod
    def fresh_celery(
        cls, postgres: PostgresServer, redis: RedisServer, template: str | None = None, **options: Any
    ) -> Backend:
        """A Celery deployment on a new database of `postgres` (a copy of `template`, a database `migrated_template`
        made, when given) and a Redis database of its own (`RedisServer.new_database`): nothing another stack queues,
        earlier or at the same time, reaches this one's workers."""
        database = postgres.create_database(template=template)
        return cls.celery(postgres.url(database), redis.new_database(), migrated=template is not None, **options)

    @staticmethod
    def migrated_template(postgres: PostgresServer, home: Path) -> str:
        """A database of `postgres` migrated once by `airflow db migrate` (Airflow home `home`), for `fresh_celery` to
        copy: each stack then starts on its own database without migrating it again. Its name."""
        database = postgres.create_database()
        env = {
            **os.environ,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres.url(database),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        }
        home.mkdir(parents=True, exist_ok=True)
        airflow = str(Path(sys.executable).parent / "airflow")
        migrate = subprocess.run([airflow, "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
        assert migrate.returncode == 0, "airflow db migrate of the template failed:\n" + migrate.stdout[-4000:]
        return database

    @property
    def executor(self) -> str:
        return "CeleryExecutor" if self.broker_url else "LocalExecutor"


@dataclass
class Component:
    name: str  # its hostname: "scheduler", "triggerer-2", "worker-1", ...
    kind: str  # the `airflow` sub-command: "scheduler", "triggerer", "celery worker", ...
    process: subprocess.Popen[bytes]
    killed: bool = False  # by the test (kill_component), not of itself

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


class AirflowStack:
    """API server, scheduler, dag-processor, triggerer(s) and, with Celery, worker(s): each its own process (group)
    with an Airflow home of its own, driven through the REST API v2."""

    def __init__(
        self,
        home: Path,
        env: dict[str, str],
        dags_folder: Path = REPO_ROOT / "dags",
        parallelism: int = 4,
        backend: Backend | None = None,
    ) -> None:
        self.home = home
        self.backend = backend or Backend()
        self.port = free_port()
        self.log_path = home / "stack.log"
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **env,
            STACK_TAG: str(home),
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": self.backend.executor,
            "AIRFLOW__CORE__PARALLELISM": str(parallelism),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH_MANAGER,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "include.local_aws.airflow_stack.component_hostname",
            # Shared by every component, as a deployment must: a task process whose token was signed with another
            # secret fails with "Invalid auth token: Signature verification failed".
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            # One Fernet key for every component, as docker-compose.yaml sets it. Without it each process takes the
            # key from airflow.cfg, which the components starting together race to write: a scheduler that read a
            # key encrypted a deadline's callback trigger, the triggerers (which read none) could not decrypt it and
            # both exited ("Trigger runner process has died"), so the deadline alert never came.
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{self.port}/execution/",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            # Hosts lost in the tests are noticed in seconds rather than the production defaults' minutes.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
            "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "10",
            "PYTHONPATH": str(REPO_ROOT),
            "PATH": f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}",
        }
        if self.backend.database_url:
            self.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = self.backend.database_url
        else:
            self.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{home / 'airflow.db'}"
            self.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS"] = (
                "include.local_aws.airflow_stack.SQLITE_CONNECT_ARGS"
            )
        if self.backend.broker_url:
            self.env["AIRFLOW__CELERY__BROKER_URL"] = self.backend.broker_url
            self.env["AIRFLOW__CELERY__RESULT_BACKEND"] = self.backend.result_backend or ""
            self.env["AIRFLOW__CELERY__WORKER_CONCURRENCY"] = str(self.backend.worker_concurrency)
        self.components: list[Component] = []
        self.leaked: list[str] = []
        self.token = ""
        self._numbers: dict[str, int] = {}

    @property
    def airflow(self) -> str:
        return str(Path(sys.executable).parent / "airflow")

    def start(self, timeout: float = 240, dag_ids: tuple[str, ...] = ("vod_sr_batch",)) -> AirflowStack:
        """Start every component and wait until the API server answers, `dag_ids` are parsed and the workers are
        ready. A stack that fails to start is stopped before the error propagates: nothing is left running."""
        try:
            return self._start(timeout, dag_ids)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float, dag_ids: tuple[str, ...]) -> AirflowStack:
        self.home.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "ab")
        if not self.backend.migrated:
            migrate = subprocess.run(
                [self.airflow, "db", "migrate"],
                env=self.env,
                stdout=self.log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
            assert migrate.returncode == 0, "airflow db migrate failed:\n" + self.tail()
        self.start_component("api-server")
        self.start_component("scheduler")
        self.start_component("dag-processor")
        for _ in range(self.backend.triggerers):
            self.start_component("triggerer")
        for _ in range(self.backend.workers):
            self.start_component("celery worker")
        deadline = time.monotonic() + timeout
        while True:
            for component in self.components:
                assert component.alive, f"{component.name} exited with {component.process.returncode}\n{self.tail()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/auth/token", timeout=5) as response:
                    self.token = json.load(response)["access_token"]
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, "the API server did not come up:\n" + self.tail()
                time.sleep(1)
        for dag_id in dag_ids:
            self.wait_until(lambda d=dag_id: self.api("GET", f"/dags/{d}") is not None, 180, f"{dag_id} never parsed")
        if self.backend.workers:
            self.wait_until(self.all_workers_answer, 120, "the Celery workers never answered a ping")
        return self

    def start_component(self, kind: str) -> Component:
        """Start one more `airflow <kind>` (its own process group, hostname and log server port)."""
        short = kind.split()[-1]
        self._numbers[short] = self._numbers.get(short, 0) + 1
        name = short if short in ("api-server", "scheduler", "dag-processor") else f"{short}-{self._numbers[short]}"
        env = {
            **self.env,
            "VOD_SR_COMPONENT_HOSTNAME": name,
            # Several log servers on one machine need a port each.
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        }
        arguments = kind.split()
        if kind == "celery worker":
            arguments += ["--celery-hostname", f"{name}@%h", "--without-mingle", "--without-gossip"]
        process = subprocess.Popen(
            [self.airflow, *arguments],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        component = Component(name, kind, process)
        self.components.append(component)
        return component

    def all_workers_answer(self) -> bool:
        """Whether every live Celery worker of this stack answers a ping (a worker ready for tasks)."""
        from celery import Celery

        expected = {c.name for c in self.components if c.kind == "celery worker" and c.alive}
        app = Celery(broker=self.backend.broker_url)
        try:
            replies = app.control.ping(timeout=2) or []
        finally:
            app.close()
        answered = {name.split("@", 1)[0] for reply in replies for name in reply}
        return expected <= answered

    def stop(self) -> None:
        """Stop every component and wait until each process it started is gone, failed test or not. Anything that
        escaped its component's process group is killed and named in `leaked` (the tests expect it empty)."""
        import psutil

        # All at once: each component's graceful shutdown takes seconds, and one after the other they added up.
        if self.components:
            with ThreadPoolExecutor(len(self.components)) as pool:
                list(pool.map(lambda c: stop_process_group(c.process, timeout=30), self.components))
        # Anything that left its component's process group and outlived it still carries the stack's tag.
        self.leaked = []
        for process in tagged_processes(str(self.home), name=STACK_TAG):
            try:
                self.leaked.append(" ".join(process.cmdline()))
                process.kill()
            except psutil.Error:
                pass
        if hasattr(self, "log"):
            self.log.close()

    def component(self, name: str) -> Component:
        (found,) = [c for c in self.components if c.name == name]
        return found

    def component_pids(self, kind: str) -> list[int]:
        """Pids of this stack's live `airflow <kind>` processes ("triggerer", "celery worker", ...)."""
        return [c.process.pid for c in self.components if c.kind == kind and c.alive]

    def kill_component(self, name: str) -> None:
        """SIGKILL a component and everything it started (its process group): a host lost, with no goodbye."""
        component = self.component(name)
        component.killed = True
        os.killpg(component.process.pid, signal.SIGKILL)
        stop_process_group(component.process, timeout=10, first_signal=signal.SIGKILL)

    def replace_triggerer(self) -> int:
        """SIGKILL the running triggerer(s) (hosts lost mid-wait) and start a new one; returns the new pid."""
        old = [c for c in self.components if c.kind == "triggerer" and c.alive]
        assert old, "no triggerer is running"
        for component in old:
            self.kill_component(component.name)
        return self.start_component("triggerer").process.pid

    def component_of(self, pid: int) -> Component | None:
        """The component whose process (or descendant) `pid` is."""
        import psutil

        try:
            lineage = {pid, *(p.pid for p in psutil.Process(pid).parents())}
        except psutil.NoSuchProcess:
            return None
        return next((c for c in self.components if c.process.pid in lineage), None)

    def pid_with_connection(self, local_port: int) -> int | None:
        """Pid of this stack's process holding a TCP connection from `local_port`, or None.

        A server that received a request knows the client's port: this finds the process behind it, e.g. the task
        process that is making a given AWS call, to kill it at exactly that point."""
        import psutil

        for component in self.components:
            try:
                processes = [psutil.Process(component.process.pid)]
                processes += processes[0].children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for process in processes:
                try:
                    connections = process.net_connections(kind="tcp")
                except psutil.Error:
                    continue
                if any(connection.laddr and connection.laddr.port == local_port for connection in connections):
                    return process.pid
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

    # A slow or briefly unreachable API server (a loaded machine, a restarting worker) is waited out, botocore-like:
    # a bounded number of attempts with exponential backoff (at worst about 3.5 minutes), then ApiUnavailable. Only
    # timeouts, connection errors and 5xx answers are retried; 4xx answers are final (404 is None, as always).
    api_attempts = 6
    api_timeout = 30.0  # seconds per attempt
    api_backoff = 1.0  # seconds before the second attempt, doubling after each: 1, 2, 4, 8, 16

    def api(self, method: str, path: str, body: Any | None = None) -> Any:
        """`method path` on the REST API v2: the decoded JSON answer, None for 404, AssertionError for another 4xx.

        A POST is only sent again when the server surely did not act on it (connection refused, 503): retrying one
        that timed out could trigger a second run."""
        url = f"http://127.0.0.1:{self.port}/api/v2{path}"
        idempotent = method.upper() != "POST"
        started = time.monotonic()
        last = ""
        for attempt in range(1, self.api_attempts + 1):
            request = urllib.request.Request(
                url,
                data=None if body is None else json.dumps(body).encode(),
                method=method,
                headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=self.api_timeout) as response:
                    return json.load(response)
            except urllib.error.HTTPError as error:
                text = error.read().decode(errors="replace")
                if error.code == 404:
                    return None
                if error.code < 500 or not (idempotent or error.code == 503):
                    raise AssertionError(f"{method} {path}: {error.code} {text}") from None
                last = f"{error.code} {text[:500]}"
            except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
                reason = error.reason if isinstance(error, urllib.error.URLError) else error
                if not (idempotent or isinstance(reason, ConnectionRefusedError)):
                    raise ApiUnavailable(
                        f"{method} {path}: {type(reason).__name__}: {reason} (a POST is not sent twice: the server "
                        "may have acted on it)"
                    ) from error
                last = f"{type(reason).__name__}: {reason}"
            if attempt < self.api_attempts:
                time.sleep(self.api_backoff * 2 ** (attempt - 1))
        raise ApiUnavailable(
            f"{method} {path}: the API server at {url} gave no usable answer in {self.api_attempts} attempts over "
            f"{time.monotonic() - started:.0f} s ({self.api_timeout:.0f} s timeout each); last error: {last}"
        )

    def died(self) -> list[str]:
        """Components that exited of themselves (not stopped, not killed by the test): a stack that lost one no
        longer does what a test waits for, so a wait fails at once rather than at its timeout."""
        return [f"{c.name} (exit {c.process.returncode})" for c in self.components if not c.alive and not c.killed]

    def wait_until(self, condition: Callable[[], bool], timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert not (died := self.died()), f"{message}: {', '.join(died)} exited\n{self.tail()}"
            assert time.monotonic() < deadline, f"{message}\n{self.tail()}"
            time.sleep(1)

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
