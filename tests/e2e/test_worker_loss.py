"""Losing what runs a chunk: the worker that sends it, or the instance under it.

**The worker** (issue 8, point 9; issue 9). The production deployment (PostgreSQL, Redis, two Celery workers, two
triggerers: `Backend.celery`) runs the DAG against the emulator, with its AWS calls going through a proxy that holds
the SendCommand of chunk 1. While it is held, the test SIGKILLs the whole Celery worker whose task made it (found by
the TCP connection the task process holds open to the proxy), with every process it started: a worker host lost
exactly between the send of chunk 0 and the answer to the send of chunk 1. The proxy then lets the held request
through: SSM accepts chunk 1's command, whose id the dead worker never learned (SendCommand has no idempotency
token). Nobody is left to report the task failed: the scheduler notices its missing heartbeats and Airflow retries
run_chunks on the other worker, whose retry must find chunk 0 (ended by then) and chunk 1 (still running: its one
file takes a minute) in SSM's own record, wait for chunk 1 again, and send only chunk 2.

**The instance** (issue 8, point 5). With `dag.test()`, the instance is stopped under a chunk two files into it (as
another run's teardown would): both commands in flight die with it. run_chunks starts the instance again and sends
each chunk once more, for the files it had not finished only.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from include.local_aws.airflow_stack import AirflowStack
from include.local_aws.world import OUTPUT_BUCKET, airflow_env, boto_client, make_sample_clip
from include.vod_sr.commands import get_invocation
from include.vod_sr.operators import RESEND_INDEX_BASE
from include.vod_sr.plan import run_token
from include.vod_sr.script import parse_result_lines
from tests.e2e.conftest import stack_env
from tests.e2e.test_batch_e2e import stored_report

pytestmark = pytest.mark.e2e
DAG_ID = "vod_sr_batch"
# ffmpeg's `realtime` filter makes each file take as long as it plays, at almost no CPU cost.
REALTIME_MODEL = {
    "title": "cpu 2x at the source's playing speed",
    "video_filter": "realtime,scale=iw*2:ih*2:flags=lanczos",
    "output_args": ["-c:v", "libx264", "-preset", "veryfast", "-c:a", "copy"],
}
SOURCES = ["lost/0.mp4", "lost/1-long.mp4", "lost/2.mp4"]
CHUNK_HEADER = re.compile(r"# vod-sr run (\S+) chunk (\d+):")


class HoldingProxy(ThreadingHTTPServer):
    """An HTTP proxy in front of the emulator that holds the first request matching `hold` until `release` is set;
    `held` is set, with the client's address in `held_from`, once the request is held."""

    daemon_threads = True

    def __init__(self, upstream: str, hold: re.Pattern[bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.hold = hold
        self.held, self.release = threading.Event(), threading.Event()
        self.held_from: tuple[str, int] | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def should_hold(self, body: bytes, client: tuple[str, int]) -> bool:
        with self._lock:
            if self.held.is_set() or not self.hold.search(body):
                return False
            self.held_from = client
            self.held.set()
            return True


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HoldingProxy

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the test asserts, not the proxy
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            parts = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self) -> None:
        body = self._body()
        if self.server.should_hold(body, self.client_address):
            self.server.release.wait(timeout=600)
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=120)
        skip = {"connection", "keep-alive", "transfer-encoding", "content-length"}
        headers = {name: value for name, value in self.headers.items() if name.lower() not in skip}
        headers["Content-Length"] = str(len(body))
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        data = response.read()
        upstream.close()
        try:
            self.send_response_only(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length"):
                    self.send_header(name, value)
            length = response.getheader("Content-Length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length or str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except OSError:  # the client is gone (the killed task process)
            self.close_connection = True

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


@pytest.fixture
def proxy(world) -> Iterator[HoldingProxy]:
    server = HoldingProxy(world.emulator.endpoint_url, re.compile(rb"# vod-sr run [0-9a-f]+ chunk 1:"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def airflow(world, proxy, airflow_backend, tmp_path) -> Iterator[AirflowStack]:
    env = {
        **stack_env(),
        **airflow_env(proxy.url, world.instance_id),  # Airflow's AWS calls go through the proxy
        "AIRFLOW_VAR_VOD_SR_MODELS": json.dumps({"rt": REALTIME_MODEL}),
    }
    stack = AirflowStack(tmp_path / "airflow-home", env, backend=airflow_backend).start()
    yield stack
    stack.stop()
    assert stack.leaked == []  # every process ended with its component


def chunk_commands(world, run_token: str) -> dict[int, list[dict[str, Any]]]:
    ssm = boto_client("ssm", world.emulator.endpoint_url)
    found: dict[int, list[dict[str, Any]]] = {}
    for command in ssm.list_commands(InstanceId=world.instance_id)["Commands"]:
        header = CHUNK_HEADER.search("\n".join(command["Parameters"]["commands"]))
        if header and header.group(1) == run_token:
            found.setdefault(int(header.group(2)), []).append(command)
    return found


@pytest.mark.fullstack
def test_a_worker_killed_between_two_sends_is_retried_and_every_chunk_is_sent_once(
    airflow, proxy, world, tmp_path, figures
):
    short, long = (make_sample_clip(tmp_path / f"{n}.mp4", seconds=n, size="320x240") for n in (2, 60))
    for key in SOURCES:
        world.upload(key, long if "long" in key else short)
    run_id = airflow.trigger({"sources": SOURCES, "custom_model": "rt", "chunk_size": 1})

    assert proxy.held.wait(timeout=300), "run_chunks never sent chunk 1\n" + airflow.tail()
    task_process = airflow.pid_with_connection(proxy.held_from[1])
    assert task_process is not None, "no process of the stack holds the held SendCommand's connection"
    worker = airflow.component_of(task_process)
    assert worker is not None and worker.kind == "celery worker", worker
    killed_at = time.monotonic()
    airflow.kill_component(worker.name)  # the worker host dies while chunk 1's SendCommand is on the wire
    assert not airflow.is_alive(task_process)
    proxy.release.set()  # ... and SSM accepts it all the same

    def retried() -> bool:
        ti = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/lane.run_chunks/0")
        return ti["try_number"] == 2 and ti["state"] not in ("up_for_retry", "failed", "queued", "scheduled")

    airflow.wait_until(retried, 300, "run_chunks was never retried")
    figures["worker_killed_to_retry_running_seconds"] = round(time.monotonic() - killed_at, 1)
    assert airflow.wait_for_run(run_id, 480) == "success", airflow.task_states(run_id)
    run_chunks = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/lane.run_chunks/0")
    assert run_chunks["try_number"] == 2  # the kill failed the first try; the retry finished the lane
    assert run_chunks["hostname"] not in ("", None, worker.name)  # ... on the worker that is left
    commands = chunk_commands(world, run_token(DAG_ID, run_id))
    assert {chunk: [c["Status"] for c in sent] for chunk, sent in commands.items()} == {
        0: ["Success"],
        1: ["Success"],
        2: ["Success"],
    }
    # Every SendCommand the emulator served made one of the instance's commands: none was sent twice or unseen.
    ssm = boto_client("ssm", world.emulator.endpoint_url)
    all_commands = ssm.list_commands(InstanceId=world.instance_id)["Commands"]
    # Three chunks and a CLI install by each try: the retry still had chunk 2 to send, so it checked the CLI again.
    assert sum(call["action"] == "SendCommand" for call in world.emulator.calls()) == len(all_commands) == 3 + 2
    for key in SOURCES:
        stem = key.rsplit(".", 1)[0]
        assert world.s3.head_object(Bucket=OUTPUT_BUCKET, Key=f"{stem}_sr_rt.mp4")["ContentLength"] > 0
    retry_log = (
        airflow.home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / "task_id=lane.run_chunks" / "map_index=0"
    ) / "attempt=2.log"
    assert "re-attaching to them instead of sending them again" in retry_log.read_text()


class StopAfterFiles(threading.Thread):
    """Stops the instance as soon as chunk 0's command shows `files` files done (what another run's teardown that
    saw no other lease would do)."""

    def __init__(self, world, files: int) -> None:
        super().__init__(daemon=True)
        self.world, self.files = world, files
        self.ssm = boto_client("ssm", world.emulator.endpoint_url)
        self.stopped_at: float | None = None
        self.problem: str | None = None

    def run(self) -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            for command in self.ssm.list_commands(InstanceId=self.world.instance_id)["Commands"]:
                header = CHUNK_HEADER.search("\n".join(command["Parameters"]["commands"]))
                if header is None or header.group(2) != "0":
                    continue
                invocation = get_invocation(self.ssm, command["CommandId"], self.world.instance_id)
                output = (invocation or {}).get("StandardOutputContent") or ""
                if sum(r["status"] == "ok" for r in parse_result_lines(output).values()) >= self.files:
                    self.world.ec2.stop_instances(InstanceIds=[self.world.instance_id])
                    self.stopped_at = time.time()
                    return
            time.sleep(0.2)
        self.problem = f"chunk 0 never showed {self.files} files done"


def test_chunks_that_died_with_their_instance_are_sent_again_once_for_their_unfinished_files(
    world, tmp_path, monkeypatch
):
    monkeypatch.setenv("AIRFLOW_VAR_VOD_SR_MODELS", json.dumps({"rt": REALTIME_MODEL}))
    short, long = (make_sample_clip(tmp_path / f"{n}.mp4", seconds=n, size="320x240") for n in (1, 20))
    sources = ["down/0.mp4", "down/1.mp4", "down/2-long.mp4", "down/3.mp4", "down/4.mp4"]
    for key in sources:
        world.upload(key, long if "long" in key else short)
    stopper = StopAfterFiles(world, files=2)
    stopper.start()

    run = world.run(sources=sources, custom_model="rt", chunk_size=4)  # chunk 0: files 0-3, chunk 1: file 4

    stopper.join(timeout=10)
    assert stopper.stopped_at, stopper.problem
    assert run.state == "success", run.task_states
    report = stored_report(world, run)
    assert {f["source"].rsplit("/", 1)[-1]: f["status"] for f in report["files"]} == dict.fromkeys(
        ["0.mp4", "1.mp4", "2-long.mp4", "3.mp4", "4.mp4"], "ok"
    )
    commands = chunk_commands(world, run_token(DAG_ID, run.run_id))
    ssm = boto_client("ssm", world.emulator.endpoint_url)

    def how_it_ended(command: dict[str, Any]) -> tuple[str, str]:
        invocation = get_invocation(ssm, command["CommandId"], world.instance_id)
        return invocation["Status"], invocation["StatusDetails"]

    ended = {chunk: [how_it_ended(c) for c in sent] for chunk, sent in commands.items()}
    resent_0, resent_1 = RESEND_INDEX_BASE, RESEND_INDEX_BASE + 1
    # Chunk 0 died with the instance (SSM kept it InProgress; the wait saw the instance stopped in EC2), was cancelled
    # so that the new boot's agent would not run it again, ...
    assert ended[0] == [("Cancelled", "Cancelled")]
    assert ended[resent_0] == [("Success", "Success")]  # ... and was sent again once
    # Chunk 1 was sent with chunk 0 and either took the instance's lock first (and was done before the stop) or was
    # waiting for it: then it died too and was sent again once.
    assert (ended[1], ended.get(resent_1)) in (
        ([("Success", "Success")], None),
        ([("Cancelled", "Cancelled")], [("Success", "Success")]),
    ), ended
    assert set(ended) <= {0, 1, resent_0, resent_1}
    resent_output = get_invocation(ssm, commands[resent_0][0]["CommandId"], world.instance_id)
    assert sorted(parse_result_lines(resent_output["StandardOutputContent"])) == [2, 3]  # only what was unfinished
    # The two files finished before the stop were not done again: their outputs date from before it.
    for key in ("down/0_sr_rt.mp4", "down/1_sr_rt.mp4"):
        assert world.s3.head_object(Bucket=OUTPUT_BUCKET, Key=key)["LastModified"].timestamp() < stopper.stopped_at
