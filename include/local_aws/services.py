"""Throwaway PostgreSQL and Redis servers for the full-stack tests, and the process bookkeeping that makes sure
nothing a test or the bench starts outlives it.

Every process started here (and every process those start) inherits `VOD_SR_PROCESS_TAG` from the environment, so
`make test` can list whatever is still running with its tag once pytest has exited (`scripts/leftover_processes`).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

PROCESS_TAG = "VOD_SR_PROCESS_TAG"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError as error:
            if time.monotonic() > deadline:
                log_tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{what} did not listen on {port}:\n{log_tail}") from error
            time.sleep(0.1)


def stop_process_group(process: subprocess.Popen[bytes], timeout: float = 30, first_signal: int = signal.SIGTERM):
    """Stop `process`, started with `start_new_session=True`, and everything it started: signal its process group,
    then wait for every member (not only the leader) and SIGKILL whatever is left after `timeout`.

    Members are collected before signalling, as the group's own descendants (which may have left the group) plus
    the group itself, so a child that outlives its parent is still waited for."""
    members: list[psutil.Process] = []
    try:
        leader = psutil.Process(process.pid)
        members = [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    for candidate in psutil.process_iter():
        try:
            if os.getpgid(candidate.pid) == process.pid and candidate not in members:
                members.append(candidate)
        except (ProcessLookupError, psutil.Error):
            continue
    try:
        os.killpg(process.pid, first_signal)
    except ProcessLookupError:
        pass
    for member in members:
        try:
            if member.pid != process.pid:
                member.send_signal(first_signal)  # a member that left the group
        except psutil.Error:
            pass
    _gone, alive = psutil.wait_procs(members, timeout=timeout)
    for member in alive:
        try:
            member.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)
    if process.poll() is None:
        process.wait(timeout=10)


def tagged_processes(tag: str, name: str = PROCESS_TAG) -> list[psutil.Process]:
    """Processes (other than this one and its ancestors) whose environment carries `name=tag`."""
    own = {os.getpid(), *(parent.pid for parent in psutil.Process().parents())}
    found = []
    for candidate in psutil.process_iter():
        if candidate.pid in own:
            continue
        try:
            if candidate.status() != psutil.STATUS_ZOMBIE and candidate.environ().get(name) == tag:
                found.append(candidate)
        except psutil.Error:
            continue
    return found


def _server_binary(name: str) -> str:
    """A PostgreSQL server binary: on PATH, or where Debian's postgresql package puts it (newest version)."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(f"PostgreSQL's {name} is not installed: `make services` installs Debian's postgresql")
    return found


def _unprivileged(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the `postgres` user (created by Debian's package) when root."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


class PostgresServer:
    """`postgres` on a free loopback port with a throwaway data directory, trusting local connections.

    One server serves a test session; each Airflow stack gets a database of its own (`create_database`)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="vod-sr-postgres-"))  # not under pytest's root-only tmp
        self.data = self.directory / "data"
        self.log_path = self.directory / "postgres.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._databases = 0

    def start(self, timeout: float = 60) -> PostgresServer:
        if os.geteuid() == 0:
            postgres_user = pwd.getpwnam("postgres")
            os.chown(self.directory, postgres_user.pw_uid, postgres_user.pw_gid)
        subprocess.run(
            _unprivileged(
                [_server_binary("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
            ),
            check=True,
            capture_output=True,
        )
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                _unprivileged(
                    [
                        _server_binary("postgres"),
                        "-D",
                        str(self.data),
                        "-p",
                        str(self.port),
                        "-c",
                        "listen_addresses=127.0.0.1",
                        "-c",
                        f"unix_socket_directories={self.directory}",
                        "-c",
                        "max_connections=300",  # seven Airflow processes, each with a pool, per stack
                        "-c",
                        "fsync=off",  # throwaway data: durability costs time and buys nothing here
                    ]
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_for_port(self.port, self.process, timeout, "PostgreSQL", self.log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def url(self, database: str, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, template: str | None = None) -> str:
        """A new database, empty or a copy of `template` (`CREATE DATABASE ... TEMPLATE`: a file copy, a fraction of
        a second where `airflow db migrate` takes seconds; the template must have no open connection); its name."""
        import psycopg2

        self._databases += 1
        name = f"airflow_{self._databases}"
        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        connection.close()
        return name

    def stop(self) -> None:
        if self.process is not None:
            # SIGINT is PostgreSQL's "fast shutdown": ends sessions, no waiting for clients.
            stop_process_group(self.process, first_signal=signal.SIGINT)
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisServer:
    """`redis-server` on a free loopback port, nothing persisted, its directory removed on stop."""

    DATABASES = 256  # one per Airflow stack of a test session (`new_database`)

    def __init__(self) -> None:
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="vod-sr-redis-"))
        self.log_path = self.directory / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._databases = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def new_database(self) -> str:
        """The URL of an empty Redis database no other stack of this server uses. Stacks alive at once must not share
        one: their Celery workers would take each other's tasks from the shared `default` queue."""
        import redis as redis_client

        self._databases += 1
        if self._databases >= self.DATABASES:
            raise RuntimeError(f"more than {self.DATABASES - 1} Airflow stacks on one Redis server")
        redis_client.Redis(port=self.port, db=self._databases).flushdb()
        return f"redis://127.0.0.1:{self.port}/{self._databases}"

    def start(self, timeout: float = 30) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: `make services` installs Debian's redis-server")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.directory),
                    "--databases",
                    str(self.DATABASES),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_for_port(self.port, self.process, timeout, "Redis", self.log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
