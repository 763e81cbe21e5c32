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
    results.record(bench.GPU4_STEP, lambda: {"per_slot_busy_ratio": 0.98, "idle_before_first_sr_seconds": 2.0})
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


# --- the simulated night's figures --------------------------------------------------------------------------------

STARTED = 1_000.0


def call(offset: float, action: str, service: str = "ssm", **extra: Any) -> dict[str, Any]:
    return {"service": service, "action": action, "time": STARTED + offset, **extra}


class TestNightCallRates:
    def test_calls_per_minute_gives_total_mean_busiest_minute_and_second_per_action(self):
        calls = [
            *(call(t, "GetCommandInvocation") for t in (1, 2, 61, 62, 62.5, 63, 179)),
            call(30, "SendCommand"),
            call(-5, "SendCommand"),  # before the night: left out
            call(200, "SendCommand"),  # after it
            call(10, "GET object", "s3", caller="instance"),
        ]

        figures = bench.calls_per_minute(calls, STARTED, STARTED + 180)

        assert list(figures) == ["ssm:GetCommandInvocation", "s3:GET object:instance", "ssm:SendCommand"]
        assert figures["ssm:GetCommandInvocation"] == {
            "total": 7,
            "mean_per_minute": 2.3,
            "peak_minute": 4,
            "peak_minute_at": 60,
            "peak_second": 2,  # 62 and 62.5
        }
        assert figures["ssm:SendCommand"]["total"] == 1

    @pytest.mark.parametrize(
        ("key", "kind"),
        [
            ("s3:PUT object:instance", "per file (x K)"),
            ("ssm:SendCommand", "per chunk (x K)"),
            ("ec2:CreateTags", "per chunk (x K)"),
            ("ssm:GetCommandInvocation", "per poll"),
            ("s3:GET object:orchestrator", "per poll"),
            ("ec2:StartInstances", "per lane"),
        ],
    )
    def test_call_kind_says_which_calls_the_compression_inflates(self, key, kind):
        assert bench.call_kind(key) == kind

    def test_against_limits_gives_ratios_to_the_published_limit_and_the_real_night_estimate(self):
        per_minute = {
            "ec2:CreateTags": {
                "total": 900,
                "mean_per_minute": 90.0,
                "peak_minute": 300,
                "peak_minute_at": 0,
                "peak_second": 40,
            },
            "ssm:SendCommand": {
                "total": 10,
                "mean_per_minute": 1.0,
                "peak_minute": 6,
                "peak_minute_at": 0,
                "peak_second": 2,
            },
            "ec2:StartInstances": {
                "total": 100,
                "mean_per_minute": 10.0,
                "peak_minute": 90,
                "peak_minute_at": 0,
                "peak_second": 12,
            },
        }

        rates = bench.against_limits(per_minute, compression=100)

        assert rates["ec2:CreateTags"]["peak_minute_per_second"] == 5.0
        assert rates["ec2:CreateTags"]["ratio_peak_minute"] == 0.5  # 5/s against 10/s
        assert rates["ec2:CreateTags"]["ratio_peak_second_to_burst"] == 0.4  # 40 against a bucket of 100
        assert rates["ec2:CreateTags"]["real_night_peak_per_second"] == 0.05
        assert rates["ec2:StartInstances"]["ratio_peak_minute"] == 0.75  # 1.5/s against 2/s
        assert rates["ec2:StartInstances"]["ratio_peak_second_to_burst"] == 2.4  # 12 at once: over its bucket of 5
        assert "real_night_peak_per_second" not in rates["ec2:StartInstances"]  # per lane: not compressed
        assert "limit_per_second" not in rates["ssm:SendCommand"]
        assert "no published" in rates["ssm:SendCommand"]["limit"]

    def test_the_busiest_s3_prefix_is_the_busiest_folder_for_reads_and_for_writes(self):
        def s3(offset: float, method: str, key: str) -> dict[str, Any]:
            return call(offset, f"{method} object", "s3", bucket="out", key=key)

        calls = [
            *(s3(t, "PUT", f"runs/tok/chunk-{t:05.0f}.results") for t in (1, 1.5, 2, 70)),
            s3(3, "PUT", "lane-1/a.mp4"),
            *(s3(t, "GET", "lane-2/b.mp4") for t in (5, 5.1)),
            s3(6, "HEAD", "c.mp4"),
            call(7, "GET bucket", "s3", bucket="out", key=""),  # a listing: not an object request
        ]

        peaks = bench.s3_prefix_peaks(calls, STARTED, STARTED + 120)

        assert peaks["write"] | {"limit_source": ""} == {
            "prefix": "out/runs/tok/",
            "peak_minute": 3,
            "peak_minute_per_second": 0.05,
            "peak_second": 2,
            "limit_per_second": 3500,
            "ratio_peak_second": 0.0006,
            "limit_source": "",
            "prefixes": 2,
        }
        assert (peaks["read"]["prefix"], peaks["read"]["peak_second"], peaks["read"]["prefixes"]) == (
            "out/lane-2/",
            2,
            2,
        )


def test_the_night_manifest_gives_each_instance_the_files_of_one_folder():
    from include.vod_sr.plan import FileJob, chunk_files
    from include.vod_sr.sources import S3Object

    keys = bench.night_manifest(run=1, lanes=3, files_per_lane=12, chunk_size=4)
    instances = ("i-0aaaaaaaaaaaaaaa0", "i-0aaaaaaaaaaaaaaa1", "i-0aaaaaaaaaaaaaaa2")
    jobs = [FileJob(n, S3Object("src", key), S3Object("out", key)) for n, key in enumerate(keys)]

    chunks = chunk_files(jobs, instances, chunk_size=4)  # the planner's own dealing

    assert len(keys) == len(set(keys)) == 36
    for lane, instance_id in enumerate(instances):
        folders = {job.source.key.rpartition("/")[0] for c in chunks if c.instance_id == instance_id for job in c.files}
        assert folders == {f"night/run-1/lane-{lane:02d}"}
    assert sum(len(c.files) for c in chunks if c.instance_id == instances[0]) == 12
    with pytest.raises(ValueError, match="not a whole number of chunks"):
        bench.night_manifest(run=1, lanes=3, files_per_lane=10, chunk_size=4)


def test_spread():
    assert bench.spread([0.5, 1.0, 0.25, 0.75]) == {
        "min": 0.25,
        "p10": 0.25,
        "median": 0.625,
        "mean": 0.625,
        "max": 1.0,
    }
    assert bench.spread([])["median"] is None


def test_night_gpu_figures_count_every_gpu_of_every_instance():
    timelines = {
        "i-a": {"gpus": 2, "running": [[0.0, 100.0]], "gpu_busy": {"0": [[10.0, 60.0]], "1": [[10.0, 30.0]]}},
        "i-b": {"gpus": 2, "running": [[0.0, 100.0]], "gpu_busy": {"0": [[20.0, 110.0]]}},
    }

    gpus = bench.night_gpu_figures(timelines, ["i-a", "i-b"], 0.0, 120.0, compression=10)

    assert (gpus["gpus"], gpus["sr_runs"], gpus["sr_window_seconds"]) == (4, 3, 100.0)
    assert gpus["busy_ratio_in_night_window"] | {"p10": None} == {
        "min": 0.0,  # i-b's GPU 1 never ran
        "p10": None,
        "median": 0.35,
        "mean": 0.4,
        "max": 0.9,
    }
    assert gpus["max_concurrent_sr_runs"] == 3
    # i-a's GPU 0: 50 s busy of a 100 s window; 500 s of model time with the same 50 s of orchestration: 500 / 550
    assert gpus["busy_ratio_in_night_window_real_night"]["max"] == pytest.approx(900 / 910, abs=0.001)
    assert gpus["busy_ratio_in_night_window_real_night"]["median"] == pytest.approx((500 / 550 + 200 / 280) / 2, 0.01)


def night_figures(state: str = "success", create_tags_per_second: float = 2.0) -> dict[str, Any]:
    return {
        "state": state,
        "setup": {"runs": 2},
        "aws_calls": {
            "ec2:CreateTags": {"peak_minute_per_second": create_tags_per_second},
            "ssm:GetCommandInvocation": {"peak_minute_per_second": 33.3},
        },
        "s3_prefix_peaks": {"write": {"prefix": "out/runs/", "peak_second": 120}},
        "metadata_db": {"xcom_bytes": 30_000},
    }


def test_the_nights_calls_are_judged_against_the_published_limits(tmp_path):
    results = bench.Results(tmp_path / "bench-results.json")
    results.record(bench.NIGHT_STEP, lambda: night_figures(create_tags_per_second=12.5))
    t = json.loads((tmp_path / "bench-results.json").read_text())["targets"]

    assert (t["night_ec2_CreateTags_per_second"]["value"], t["night_ec2_CreateTags_per_second"]["met"]) == (12.5, False)
    assert t["night_ec2_CreateTags_per_second"]["target"] == "< 10"
    assert t["night_ec2_StartInstances_per_second"] | {"note": ""} == {
        "value": 0.0,  # not called in the night: none at all
        "target": "< 2",
        "met": True,
        "step": "night",
        "measured_at": t["night_ec2_StartInstances_per_second"]["measured_at"],
        "note": "",
    }
    ssm = t["night_ssm_GetCommandInvocation_per_second"]
    assert (ssm["value"], ssm["target"], ssm["met"]) == (33.3, "no published limit", None)
    assert (t["night_s3_writes_per_prefix_per_second"]["value"], t["night_s3_writes_per_prefix_per_second"]["met"]) == (
        120,
        True,
    )
    assert t["night_s3_reads_per_prefix_per_second"]["value"] is None
    assert (t["night_xcom_bytes_per_run"]["value"], t["night_xcom_bytes_per_run"]["met"]) == (15_000, True)


def test_a_night_that_failed_is_shown_but_not_judged(tmp_path):
    results = bench.Results(tmp_path / "bench-results.json")
    results.record(bench.NIGHT_STEP, lambda: night_figures(state="failed", create_tags_per_second=12.5))
    entry = json.loads((tmp_path / "bench-results.json").read_text())["targets"]["night_ec2_CreateTags_per_second"]

    assert (entry["value"], entry["met"], entry["run_state"]) == (12.5, None, "failed")


def test_before_any_night_its_targets_are_unmeasured(tmp_path):
    bench.Results(tmp_path / "bench-results.json").record("parse", lambda: {"dag_file_over_sdk_seconds": 0.1})
    t = json.loads((tmp_path / "bench-results.json").read_text())["targets"]

    assert t["night_ec2_CreateTags_per_second"]["value"] is None
    assert t["night_ec2_CreateTags_per_second"]["met"] is None
