"""`make bench` finishes and says what it measured: the Airflow API client waits out a slow or briefly unreachable
server (a bounded number of attempts, then a clear error; 4xx answers are final), each step's figures reach
bench-results.json as soon as they are taken, a failing step is recorded while the next ones still run, whatever
was started is stopped, and the S3 stand-in of the 1,000,000-source planning figure lists like S3."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from include.local_aws.airflow_stack import AirflowStack, ApiUnavailable
from include.local_aws.services import free_port
from scripts import bench


class ScriptedServer:
    """An HTTP server answering each request with the next (status, delay seconds) of `script`, then 200."""

    def __init__(self, script: list[tuple[int, float]]) -> None:
        self.script = list(script)
        self.requests: list[tuple[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                outer.requests.append((self.command, self.path))
                status, delay = outer.script.pop(0) if outer.script else (200, 0.0)
                time.sleep(delay)
                body = json.dumps({"ok": status == 200, "attempt": len(outer.requests)}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up waiting

            do_GET = do_POST = do_PATCH = answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[AirflowStack]:
    """A stack that is never started: only its API client is used, with short timeouts and backoff."""
    airflow = AirflowStack(tmp_path / "airflow", {})
    airflow.api_timeout = 0.5
    airflow.api_backoff = 0.01
    yield airflow


def test_api_retries_5xx_and_timeouts_then_returns_the_answer(stack):
    with ScriptedServer([(503, 0), (500, 0), (200, 2.0)]) as server:  # the third answer comes too late
        stack.port = server.port
        assert stack.api("GET", "/dags/vod_sr_batch") == {"ok": True, "attempt": 4}
    assert server.requests == [("GET", "/api/v2/dags/vod_sr_batch")] * 4


def test_api_gives_up_after_its_attempts_with_a_clear_message(stack):
    stack.api_attempts = 3
    with ScriptedServer([(502, 0)] * 10) as server:
        stack.port = server.port
        with pytest.raises(ApiUnavailable, match=r"GET /dags/x: .* no usable answer in 3 attempts .* last error: 502"):
            stack.api("GET", "/dags/x")
    assert len(server.requests) == 3


def test_api_retries_an_unreachable_server_and_says_so(stack):
    stack.port = free_port()  # nothing listens there
    stack.api_attempts = 2
    with pytest.raises(ApiUnavailable, match="ConnectionRefusedError"):
        stack.api("GET", "/dags")


def test_api_4xx_is_final_as_before_404_is_none(stack):
    with ScriptedServer([(400, 0), (409, 0), (404, 0)]) as server:
        stack.port = server.port
        with pytest.raises(AssertionError, match="GET /a: 400") as raised:
            stack.api("GET", "/a")
        assert not isinstance(raised.value, ApiUnavailable)
        with pytest.raises(AssertionError, match="PATCH /b: 409"):
            stack.api("PATCH", "/b", {"state": "failed"})
        assert stack.api("GET", "/c") is None
    assert len(server.requests) == 3


def test_a_post_is_sent_again_only_when_the_server_surely_did_not_act_on_it(stack):
    with ScriptedServer([(503, 0), (500, 0)]) as server:
        stack.port = server.port
        with pytest.raises(AssertionError, match="POST /dags/d/dagRuns: 500"):
            stack.api("POST", "/dags/d/dagRuns", {"conf": {}})  # 503: retried; 500: may have created the run
        assert len(server.requests) == 2
    with ScriptedServer([(200, 2.0)]) as server:
        stack.port = server.port
        with pytest.raises(ApiUnavailable, match="not sent twice"):
            stack.api("POST", "/dags/d/dagRuns", {"conf": {}})
        assert len(server.requests) == 1


def test_each_step_is_written_as_soon_as_it_is_taken_and_a_failure_does_not_stop_the_next(tmp_path):
    path = tmp_path / "bench-results.json"
    results = bench.Results(path)

    assert results.record("parse", lambda: {"dag_file_over_sdk_seconds": 0.1, "import_airflow_sdk_seconds": 1.0})
    written = json.loads(path.read_text())
    assert written["status"] == "partial"
    assert written["parse"]["dag_file_over_sdk_seconds"] == 0.1
    parse_target = written["targets"]["dag_parse_over_sdk_seconds"]
    assert parse_target == {
        "value": 0.1,
        "target": "<= 0.3",
        "met": True,
        "step": "parse",
        "measured_at": written["steps"]["parse"]["at"],
    }
    assert written["targets"]["plan_1m_seconds"]["value"] is None  # not measured yet

    def broken() -> dict[str, Any]:
        raise TimeoutError("timed out reading the API")

    assert not results.record("plan_1m", broken)
    written = json.loads(path.read_text())
    assert written["status"] == "partial"
    assert written["failed_steps"] == {"plan_1m": "TimeoutError: timed out reading the API"}
    assert written["steps"]["plan_1m"]["status"] == "failed"
    assert written["parse"]["dag_file_over_sdk_seconds"] == 0.1  # kept

    for step in bench.STEPS:
        results.record(step, lambda: {"plan_seconds": 1.0})
    written = json.loads(path.read_text())
    assert written["status"] == "complete"
    assert written["failed_steps"] == {}


def test_only_merges_into_the_existing_results(tmp_path, monkeypatch):
    path = tmp_path / "bench-results.json"
    bench.Results(path).record("parse", lambda: {"dag_file_over_sdk_seconds": 0.2})
    monkeypatch.setattr(bench, "parse_overhead", lambda: {"dag_file_over_sdk_seconds": 0.25})
    monkeypatch.setattr(bench, "plan_manifest_scale", lambda profile: {"seconds": 12.0, "peak_rss_mib": 700.0})

    assert bench.main(["--only", "plan_1m", "--results", str(path)]) == 0

    written = json.loads(path.read_text())
    assert written["parse"]["dag_file_over_sdk_seconds"] == 0.2  # from the earlier run
    assert written["targets"]["plan_1m_seconds"]["value"] == 12.0
    assert written["targets"]["plan_1m_seconds"]["met"] is True
    assert written["targets"]["plan_1m_peak_rss_mib"]["met"] is True
    assert written["last_run"]["only"] == ["plan_1m"]
    with pytest.raises(SystemExit):
        bench.main(["--only", "plan_2m", "--results", str(path)])


class FakeEmulator:
    stopped = False

    def __init__(self, *args: Any) -> None:
        self.endpoint_url = "http://127.0.0.1:1"

    def start(self) -> FakeEmulator:
        return self

    def stop(self) -> None:
        FakeEmulator.stopped = True


def test_when_airflow_does_not_start_its_steps_fail_the_rest_run_and_the_emulator_is_stopped(tmp_path, monkeypatch):
    from include.local_aws import world

    FakeEmulator.stopped = False

    class FakeS3:
        def upload_file(self, *args: Any) -> None:
            pass

    monkeypatch.setattr(world, "EmulatorProcess", FakeEmulator)
    monkeypatch.setattr(world, "create_world", lambda endpoint_url: "i-0123456789abcdef0")
    monkeypatch.setattr(world, "make_sample_clip", lambda path, **kwargs: path)
    monkeypatch.setattr(world, "boto_client", lambda *args: FakeS3())

    def no_airflow(*args: Any) -> None:
        raise RuntimeError("the API server did not come up")

    monkeypatch.setattr(bench, "start_stack", no_airflow)
    monkeypatch.setattr(bench, "plan_at_scale", lambda endpoint_url: {"plan_seconds": 3.0, "chunks": 1000})
    path = tmp_path / "bench-results.json"

    assert bench.main(["--only", "vod_sr_20_files,plan_10000", "--results", str(path)]) == 1

    written = json.loads(path.read_text())
    assert written["failed_steps"] == {
        "vod_sr_20_files": "Airflow could not be started: RuntimeError: the API server did not come up"
    }
    assert written["plan_10000"]["plan_seconds"] == 3.0
    assert written["status"] == "partial"
    assert FakeEmulator.stopped


def test_the_stand_in_lists_like_s3_prefix_start_after_pages_and_order():
    s3 = bench.S3ListingStandIn(2_500, folders=("b/", "a/"))
    every = sorted(
        [f"a/title-{n:07}-master.mp4" for n in range(1250)] + [f"b/title-{n:07}-master.mp4" for n in range(1250)]
    )

    def listed(**kwargs: Any) -> list[str]:
        pages = list(s3.get_paginator("list_objects_v2").paginate(Bucket=bench.STAND_IN_SOURCE_BUCKET, **kwargs))
        assert all(len(page.get("Contents", [])) <= 1000 for page in pages)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    assert listed() == every
    assert listed(Prefix="a/") == [k for k in every if k.startswith("a/")]
    assert listed(Prefix="b/title-00001") == [k for k in every if k.startswith("b/title-00001")]
    assert listed(Prefix="a/", StartAfter="a/title-0001000-master.mp") == every[1000:1250]
    assert listed(StartAfter="a/title-0001249-master.mp4") == every[1250:]
    assert s3.manifest.decode().splitlines() == every


def test_planning_from_a_manifest_against_the_stand_in_takes_every_file():
    figures = bench.plan_child(1_000)

    assert figures["files"] == 1_000
    assert figures["lanes"] == len(bench.STAND_IN_INSTANCES)
    assert figures["xcom_bytes"] > 0
    assert figures["peak_rss_mib"] > 0
