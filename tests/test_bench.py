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


def test_xcom_bytes_are_the_lane_references_summary_and_verify_references_and_stay_flat():
    from include.vod_sr.plan import BatchRequest, plan_batch

    def planned(files: int) -> Any:
        s3 = bench.S3ListingStandIn(files)
        request = BatchRequest.from_params(
            {
                "manifest": bench.STAND_IN_MANIFEST,
                "model": "cpu",
                "source_bucket": bench.STAND_IN_SOURCE_BUCKET,
                "output_bucket": bench.STAND_IN_OUTPUT_BUCKET,
                "instance_ids": list(bench.STAND_IN_INSTANCES),
            }
        )
        return plan_batch(request, s3, run_token="bench")

    small, large = bench.xcom_breakdown(planned(1_000)), bench.xcom_breakdown(planned(50_000))

    for figures in (small, large):
        assert figures["xcom_bytes"] == figures["lanes_bytes"] + figures["summary_bytes"] + figures["verify_refs_bytes"]
        assert figures["lanes"] == len(bench.STAND_IN_INSTANCES)
        assert figures["s3_puts"] == figures["lanes"] * 2 + 2  # chunks and verified records per lane, index, skipped
        assert figures["xcom_bytes"] < bench.XCOM_TARGET_BYTES
    assert large["s3_put_bytes"] > 40 * small["s3_put_bytes"]  # the file lists went to S3...
    assert large["xcom_bytes"] - small["xcom_bytes"] < 200  # ...and XCom only grew by a few digits
    assert bench.xcom_bytes(planned(1_000)) == small["xcom_bytes"]


def test_the_stand_in_takes_puts_and_keeps_only_their_size():
    s3 = bench.S3ListingStandIn(0)
    s3.put_object(Bucket="b", Key="k", Body=b"12345", ContentType="application/json")
    s3.put_object(Bucket="b", Key="k2", Body="é")
    assert (s3.puts, s3.put_bytes) == (2, 7)


# A 4-GPU instance's timeline as the emulator reports it: running 100-200, GPUs 0-3 busy 103-197 with short gaps,
# GPU 3 idle for 10 s; two model runs overlap on GPU 0 (two streams).
SYNTHETIC_TIMELINE = {
    "running": [[50.0, 60.0], [100.0, 200.0]],  # an earlier run's interval is left out by `started`
    "commands": [],
    "gpus": 4,
    "gpu_busy": {
        "0": [[103.0, 150.0], [140.0, 197.0], [55.0, 58.0]],
        "1": [[103.0, 150.0], [150.0, 197.0]],
        "2": [[104.0, 150.0], [151.0, 197.0]],
        "3": [[103.0, 140.0], [150.0, 190.0]],
    },
}


def test_gpu_figures_per_slot_busy_ratio_and_idle_from_a_timeline():
    figures = bench.gpu_figures(SYNTHETIC_TIMELINE, started=90.0, ended=210.0)

    assert figures["gpus"] == 4
    assert figures["sr_runs"] == 8
    assert figures["sr_window_seconds"] == 94.0  # 103 -> 197
    assert figures["per_gpu"]["0"]["busy_seconds"] == 94.0  # the union: overlapping streams count once
    assert figures["per_gpu"]["0"]["max_concurrent_sr_runs"] == 2
    assert figures["per_gpu"]["1"]["busy_ratio_in_window"] == 1.0  # back to back is not a gap
    assert figures["per_gpu"]["2"]["busy_seconds"] == 92.0
    assert figures["per_gpu"]["3"]["busy_ratio_in_window"] == round(77 / 94, 3)
    assert figures["per_gpu"]["3"]["busy_ratio_of_running"] == round(77 / 100, 3)
    assert figures["per_slot_busy_ratio"] == round(77 / 94, 3)  # the least busy GPU
    assert figures["per_slot_busy_ratio_of_running"] == 0.77
    assert figures["per_slot_busy_ratio_mean"] == round((1 + 1 + 92 / 94 + 77 / 94) / 4, 3)
    assert figures["idle_before_first_sr_seconds"] == 3.0
    assert figures["idle_after_last_sr_seconds"] == 3.0
    assert figures["max_concurrent_sr_runs"] == 4  # 140-150: two on GPU 0, one on GPUs 1 and 2


def test_gpu_figures_count_an_idle_gpu_and_a_still_running_instance():
    timeline = {"running": [[100.0, None]], "gpus": 2, "gpu_busy": {"0": [[110.0, 150.0]]}}
    figures = bench.gpu_figures(timeline, started=100.0, ended=160.0)

    assert figures["per_gpu"]["1"] == {
        "sr_runs": 0,
        "busy_seconds": 0.0,
        "max_concurrent_sr_runs": 0,
        "busy_ratio_in_window": 0.0,
        "busy_ratio_of_running": 0.0,
    }
    assert figures["per_slot_busy_ratio"] == 0.0
    assert figures["idle_before_first_sr_seconds"] == 10.0
    assert figures["idle_after_last_sr_seconds"] == 10.0  # the run's end stands for the missing stop

    nothing = bench.gpu_figures({"running": [[100.0, 120.0]], "gpus": 1, "gpu_busy": {}}, 100.0, 130.0)
    assert nothing["per_slot_busy_ratio"] is None and nothing["idle_before_first_sr_seconds"] is None


def test_max_overlap():
    assert bench.max_overlap([]) == 0
    assert bench.max_overlap([(0, 1), (1, 2)]) == 1
    assert bench.max_overlap([(0, 3), (1, 2), (1.5, 4)]) == 3


def test_the_comparison_with_the_baseline_and_the_idle_per_lane_reach_their_targets(tmp_path):
    def run(wall: float, running: float, at_once: int, before: float, after: float, chunk: int = 1) -> Any:
        return lambda: {
            "state": "success",
            "conf": {"chunk_size": chunk},
            "wall_seconds": wall,
            "instance_running_seconds": running,
            "max_concurrent_sr_runs": at_once,
            "idle_before_first_sr_seconds": before,
            "idle_after_last_sr_seconds": after,
        }

    results = bench.Results(tmp_path / "bench-results.json")
    results.record(
        "baseline_20_files",
        lambda: {"wall_seconds": 200.0, "instance_running_seconds": 180.0, "max_concurrent_commands": 20},
    )
    results.record("vod_sr_20_files_streams_1", run(190.0, 170.0, 1, 3.0, 2.0))
    results.record("vod_sr_20_files_streams_4", run(100.0, 90.0, 4, 5.5, 1.0))
    results.record(bench.GPU4_STEP, lambda: {"per_slot_busy_ratio": 0.96, "idle_before_first_sr_seconds": 2.0})
    written = json.loads((tmp_path / "bench-results.json").read_text())

    versus, t = written["vs_baseline_20_files"], written["targets"]
    assert versus["best"] == "vod_sr_20_files_streams_4"
    assert versus["runs"]["vod_sr_20_files_streams_4"]["streams_per_gpu"] == 4
    assert versus["best_wall_ratio"] == 2.0
    assert versus["closest_concurrency"] == "vod_sr_20_files_streams_4"
    assert t["best_vod_sr_vs_baseline"]["value"] == 2.0 and t["best_vod_sr_vs_baseline"]["met"] is True
    assert t["instance_time_vs_baseline_at_closest_concurrency"]["value"] == 2.0
    assert t["per_slot_busy_ratio"]["met"] is True
    assert t["idle_before_first_chunk_seconds"]["value"] == 5.5  # the worst lane
    assert t["idle_before_first_chunk_seconds"]["met"] is False  # > 2 poll intervals
    assert t["idle_after_last_chunk_seconds"] == t["idle_after_last_chunk_seconds"] | {"value": 2.0, "met": True}
    assert t["best_vod_sr_vs_baseline"]["measured_at"] == written["steps"]["vod_sr_20_files_streams_4"]["at"]


def test_a_figure_from_a_run_that_failed_is_shown_but_not_judged(tmp_path):
    results = bench.Results(tmp_path / "bench-results.json")
    results.record(bench.GPU4_STEP, lambda: {"state": "failed", "per_slot_busy_ratio": 0.99})
    entry = json.loads((tmp_path / "bench-results.json").read_text())["targets"]["per_slot_busy_ratio"]
    assert (entry["value"], entry["met"], entry["run_state"]) == (0.99, None, "failed")
