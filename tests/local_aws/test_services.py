"""The test harness leaves nothing behind: process groups are stopped member by member, the throwaway PostgreSQL and
Redis servers take their data with them, and `make test`'s final check finds and kills what a test leaked."""

from __future__ import annotations

import os
import subprocess
import time
import uuid

import psutil
import pytest

from include.local_aws.services import PostgresServer, RedisServer, stop_process_group, tagged_processes
from scripts import leftover_processes


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def start_family(script: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], list[int]]:
    """`sh -c script` in a session of its own; `script` prints the pids it started, one per line, then waits."""
    process = subprocess.Popen(
        ["sh", "-c", script], stdout=subprocess.PIPE, start_new_session=True, env=env or dict(os.environ)
    )
    assert process.stdout is not None
    children = [int(process.stdout.readline()) for _ in range(script.count("echo $!"))]
    return process, children


def test_a_child_that_ignores_sigterm_is_killed_and_waited_for_not_left_behind_its_parent():
    # The old stop signalled the group and waited for the leader only: this child outlived it.
    process, (stubborn,) = start_family("""(trap '' TERM; exec sleep 300) & echo $!; wait""")
    time.sleep(0.3)  # let the subshell install its trap

    stop_process_group(process, timeout=2)

    assert process.poll() is not None
    assert not alive(stubborn)


def test_a_child_that_left_the_process_group_is_stopped_too():
    process, (escaped,) = start_family("setsid sleep 300 & echo $!; wait")
    time.sleep(0.3)
    assert os.getpgid(escaped) != process.pid  # really out of the group

    stop_process_group(process, timeout=5)

    assert not alive(escaped)


def test_the_final_check_names_kills_and_fails_on_a_process_left_with_the_run_tag(capsys):
    tag = f"leak-{uuid.uuid4()}"
    leaked = subprocess.Popen(["sleep", "300"], env={**os.environ, "VOD_SR_PROCESS_TAG": tag})
    try:
        assert [p.pid for p in tagged_processes(tag)] == [leaked.pid]
        leftover_processes.GRACE_SECONDS = 1

        assert leftover_processes.main(tag) == 1

        assert "sleep 300" in capsys.readouterr().err
        assert leaked.wait(timeout=10) is not None  # killed
        assert leftover_processes.main(tag) == 0
    finally:
        if leaked.poll() is None:
            leaked.kill()


@pytest.mark.services
def test_postgres_and_redis_serve_on_loopback_and_leave_no_process_or_data_behind():
    import psycopg2
    import redis

    with PostgresServer() as postgres, RedisServer() as broker:
        database = postgres.create_database()
        with psycopg2.connect(host="127.0.0.1", port=postgres.port, user="postgres", dbname=database) as connection:
            with connection.cursor() as cursor:
                cursor.execute("SELECT current_database()")
                assert cursor.fetchone() == (database,)
        assert redis.Redis(port=broker.port).ping()
        pids = [postgres.process.pid, broker.process.pid]
        server_processes = psutil.Process(pids[0]).children(recursive=True)
        directories = [postgres.directory, broker.directory]

    assert not any(alive(pid) for pid in pids + [p.pid for p in server_processes])
    assert not any(directory.exists() for directory in directories)


@pytest.mark.services
def test_stacks_on_one_server_get_a_broker_and_a_database_of_their_own_the_database_a_copy_of_the_template():
    """Two stacks alive at once on one Redis server must not share its `default` queue (their Celery workers took
    each other's tasks), and a stack's database copied from the template has the template's tables."""
    import psycopg2
    import redis

    with PostgresServer() as postgres, RedisServer() as broker:
        first, second = broker.new_database(), broker.new_database()
        redis.Redis.from_url(first).rpush("default", "a task of the first stack")

        assert first != second
        assert redis.Redis.from_url(second).llen("default") == 0
        assert redis.Redis.from_url(first).llen("default") == 1

        template = postgres.create_database()
        with psycopg2.connect(host="127.0.0.1", port=postgres.port, user="postgres", dbname=template) as connection:
            with connection.cursor() as cursor:
                cursor.execute("CREATE TABLE migrated (revision text); INSERT INTO migrated VALUES ('head')")
        connection.close()  # CREATE DATABASE ... TEMPLATE needs the template without connections
        copy = postgres.create_database(template=template)
        with psycopg2.connect(host="127.0.0.1", port=postgres.port, user="postgres", dbname=copy) as connection:
            with connection.cursor() as cursor:
                cursor.execute("SELECT revision FROM migrated")
                assert cursor.fetchall() == [("head",)]
        connection.close()


def test_the_tag_reaches_grandchildren_through_the_environment():
    tag = f"inherit-{uuid.uuid4()}"
    process, (grandchild,) = start_family(
        "sleep 300 & echo $!; wait", env={**os.environ, "VOD_SR_PROCESS_TAG": tag, "PATH": os.environ["PATH"]}
    )
    try:
        assert grandchild in {p.pid for p in tagged_processes(tag)}
    finally:
        stop_process_group(process, timeout=5)
    assert tagged_processes(tag) == []
