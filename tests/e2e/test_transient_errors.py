"""AWS errors while a chunk runs, end to end: dag.test() + emulator + real AWS CLI and ffmpeg on the "instance".

A transient error (5xx, throttling, a dropped connection) that outlasts botocore's retries must not fail run_chunks:
failing it would make the teardown cancel a chunk that was running fine. An error no retry fixes must still end
the run at once.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from include.local_aws.world import SAMPLE_KEY, boto_client
from include.vod_sr.commands import POLL_MAX_ATTEMPTS
from include.vod_sr.operators import TRANSIENT_ERRORS_XCOM_KEY

pytestmark = pytest.mark.e2e


def arm_when_a_chunk_runs(
    world, faults: dict[str, Any], timeout: float = 180, what: str = " chunk "
) -> threading.Thread:
    """Set `faults` on the world's instance as soon as a command whose comment holds `what` (a chunk, by default)
    runs there (not before: the CLI install's reads would meet them first)."""

    def arm() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            runs = world.emulator.timeline().get(world.instance_id, {}).get("commands", [])
            if any(what in run["comment"] for run in runs):
                world.emulator.set_faults({"instances": {world.instance_id: faults}})
                return
            time.sleep(0.1)

    thread = threading.Thread(target=arm, name="arm-faults", daemon=True)
    thread.start()
    return thread


def run_chunks_xcom(run, key: str) -> Any:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = (
            session.query(XComModel)
            .filter_by(dag_id="vod_sr_batch", run_id=run.run_id, task_id="lane.run_chunks", key=key)
            .one()
        )
        return XComModel.deserialize_value(row)


def served_errors(world) -> int:
    return sum(c["action"] == "GetCommandInvocation" for c in world.emulator.calls())


def test_server_errors_while_the_chunk_runs_are_counted_and_the_run_succeeds(world):
    world.upload(SAMPLE_KEY)
    # Three polls' worth of 503s: each poll's client tries POLL_MAX_ATTEMPTS times before the trigger sees one.
    errors = 3 * POLL_MAX_ATTEMPTS
    armed = arm_when_a_chunk_runs(
        world, {"invocation_read_errors": errors, "invocation_read_error": "ServiceUnavailable"}
    )

    run = world.run(sources=[SAMPLE_KEY])
    armed.join(timeout=1)

    assert run.state == "success", run.task_states
    assert run.task_states["lane.run_chunks"] == ["success"]
    assert served_errors(world) > errors  # the 503s were served over HTTP, then real answers
    assert run_chunks_xcom(run, TRANSIENT_ERRORS_XCOM_KEY) == 3  # one per poll that outlasted its retries
    assert world.instance_state() == "stopped"


def test_an_error_no_retry_fixes_fails_run_chunks_at_once_and_the_instance_still_stops(world, capfd):
    world.upload(SAMPLE_KEY)
    # A chunk that outlasts the trigger's first poll (5 s after the deferral): the error meets a running chunk, which
    # the teardown cancels. A chunk done by then would be verified ok and the run succeed, run_chunks failed or not.
    world.emulator.set_faults({"instances": {world.instance_id: {"model_run_seconds": 30}}})
    armed = arm_when_a_chunk_runs(
        world, {"invocation_read_errors": 10_000, "invocation_read_error": "AccessDeniedException"}
    )

    try:
        run = world.run(sources=[SAMPLE_KEY])
    finally:
        armed.join(timeout=1)
        world.emulator.set_faults({"instances": {world.instance_id: {"invocation_read_errors": 0}}})

    assert run.state == "failed"
    assert run.task_states["lane.run_chunks"] == ["failed"]
    assert run.task_states["lane.release"] == ["success"]
    logs = capfd.readouterr()
    assert "AccessDeniedException (HTTP 400)" in logs.out + logs.err
    assert "waiting longer would not fix this" in logs.out + logs.err
    assert world.instance_state() == "stopped"


def test_a_chunk_send_whose_answer_is_lost_runs_the_chunk_once(world, caplog, capfd):
    # Armed once the CLI install runs, so the first chunk's SendCommand is the one whose answer is lost: SSM took
    # it, the task never heard (faults.py, `send_answers_lost`). botocore alone would have sent it again.
    world.upload(SAMPLE_KEY)
    armed = arm_when_a_chunk_runs(world, {"send_answers_lost": 1}, what="")

    try:
        run = world.run(sources=[SAMPLE_KEY])
    finally:
        armed.join(timeout=1)
        world.emulator.set_faults({"instances": {world.instance_id: {"send_answers_lost": 0}}})

    assert run.state == "success", run.task_states
    ssm = boto_client("ssm", world.emulator.endpoint_url)
    chunks = [c for c in ssm.list_commands(InstanceId=world.instance_id)["Commands"] if " chunk " in c["Comment"]]
    assert len(chunks) == 1, [c["Comment"] for c in chunks]
    captured = capfd.readouterr()
    log = caplog.text + captured.out + captured.err
    assert "got no answer (ConnectionClosedError" in log  # the answer was lost: the fault met the chunk's send
    assert f"but SSM had taken it: command {chunks[0]['CommandId']}" in log
