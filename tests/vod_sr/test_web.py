"""The run pages of the vod-sr plugin through FastAPI's TestClient: Airflow's real auth (SimpleAuthManager tokens
checked against the metadata database), real S3 calls to the local emulator. Only the metadata database's runs and
XComs are replaced (`FakeRunSource`): the full-stack browser test reads them from a real Airflow."""

from __future__ import annotations

import json
import re
import urllib.parse
import urllib.request
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from include.local_aws.world import boto_client
from include.vod_sr.plan import FileJob, run_token
from include.vod_sr.report import REPORT_PREFIX
from include.vod_sr.script import chunk_keys
from include.vod_sr.settings import Settings
from include.vod_sr.sources import S3Object
from include.vod_sr.web import RunInfo, RunSource, app, run_source

DAG_ID = "vod_sr_batch"
JPEG = b"\xff\xd8\xff\xe0" + b"not a real picture, served as stored" + b"\xff\xd9"


class FakeRunSource(RunSource):
    """Runs and plan summaries as Airflow's database would hold them; S3 is the emulator's."""

    def __init__(self, s3: Any, runs: list[RunInfo], summaries: dict[str, dict[str, Any]]) -> None:
        super().__init__(Settings())
        self.__dict__["s3"] = s3
        self.runs = runs
        self.summaries = summaries

    def run(self, dag_id: str, run_id: str) -> RunInfo | None:
        return next((r for r in self.runs if r.dag_id == dag_id and r.run_id == run_id), None)

    def recent_runs(self, dag_id: str, limit: int) -> list[RunInfo]:
        return [r for r in self.runs if r.dag_id == dag_id][:limit]

    def plan_summary(self, dag_id: str, run_id: str) -> dict[str, Any] | None:
        return self.summaries.get(run_id)


@pytest.fixture(scope="module")
def auth_manager():
    """Airflow's SimpleAuthManager with a viewer and an operator, as the API server sets it up."""
    import os

    from airflow.api_fastapi.app import create_auth_manager
    from airflow.utils import db

    os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] = "operator:op,watcher:viewer"
    os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] = "False"
    db.initdb()  # tokens are checked against the revoked-token table
    manager = create_auth_manager()
    manager.init()
    yield manager
    del os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"]


def token(manager: Any, username: str, role: str) -> str:
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    return manager.generate_jwt(SimpleAuthManagerUser(username=username, role=role))


@pytest.fixture
def world(emulator_env):
    s3 = boto_client("s3", emulator_env.endpoint_url)
    bucket = f"web-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    return s3, bucket


def record(index: int, bucket: str, status: str = "ok", **extra: Any) -> dict[str, Any]:
    return {
        "index": index,
        "source": f"s3://src/in {index} <b>&'\".mp4",
        "output": f"s3://{bucket}/out/{index}.mp4",
        "status": status,
        "reason": "" if status == "ok" else "ffmpeg failed",
        "bytes": 1234 if status == "ok" else 0,
        "source_media": {"width": 640, "height": 480, "seconds": 10.0, "audio_streams": 1},
        "output_media": {"width": 1280, "height": 960, "seconds": 10.0, "audio_streams": 1} if status == "ok" else None,
        "sr_seconds": 7 if status == "ok" else None,
        "qc": None,
        "qc_reason": "",
        **extra,
    }


def finished_run(s3: Any, bucket: str, run_id: str = "manual__2026-11-29T10:00:00+00:00") -> RunInfo:
    token_ = run_token(DAG_ID, run_id)
    qc_key = f"vod-sr-runs/{token_}/qc/0.jpg"
    s3.put_object(Bucket=bucket, Key=qc_key, Body=JPEG, ContentType="image/jpeg")
    s3.put_object(Bucket=bucket, Key="out/0.mp4", Body=b"the enhanced video")
    report = {
        "run_id": run_id,
        "run_token": token_,
        "counts": {"ok": 2, "failed": 1},
        "files": [
            record(0, bucket, qc=f"s3://{bucket}/{qc_key}"),
            record(1, bucket, qc_reason="ffmpeg could not make the frame"),
            record(2, bucket, status="failed"),
        ],
        "retry_conf": {"sources": ["s3://src/in 2 <b>&'\".mp4"], "output_bucket": bucket, "overwrite": True},
        "instance_seconds": {"i-0123": 3725},
        "cost": {
            "currency": "USD",
            "total": 1.9259,
            "instances": {
                "i-0123": {
                    "instance_type": "g6e.xlarge",
                    "seconds": 3725,
                    "billed_seconds": 3725,
                    "hourly_rate": 1.861,
                    "cost": 1.9259,
                }
            },
            "unpriced": [],
        },
    }
    s3.put_object(Bucket=bucket, Key=f"{REPORT_PREFIX}{token_}.json", Body=json.dumps(report).encode())
    return RunInfo(DAG_ID, run_id, "failed", {"output_bucket": bucket}, datetime(2026, 11, 29, 10, tzinfo=UTC))


@pytest.fixture
def client(world):
    sources: list[FakeRunSource] = []

    def use(runs: list[RunInfo], summaries: dict[str, dict[str, Any]] | None = None) -> TestClient:
        source = FakeRunSource(world[0], runs, summaries or {})
        sources.append(source)
        app.dependency_overrides[run_source] = lambda: source
        return TestClient(app)

    yield use
    app.dependency_overrides.clear()


def run_url(run_id: str, tail: str = "") -> str:
    return f"/dags/{DAG_ID}/runs/{urllib.parse.quote(run_id, safe='')}{tail}"


@pytest.mark.parametrize(
    "path",
    [
        run_url("manual__2026-11-29T10:00:00+00:00"),
        run_url("manual__2026-11-29T10:00:00+00:00", "/report.json"),
        run_url("manual__2026-11-29T10:00:00+00:00", "/qc/0.jpg"),
        run_url("manual__2026-11-29T10:00:00+00:00", "/outputs/0"),
        f"/dags/{DAG_ID}/history",
    ],
)
def test_an_anonymous_request_is_refused(auth_manager, world, client, path):
    s3, bucket = world
    response = client([finished_run(s3, bucket)]).get(path, follow_redirects=False)

    assert response.status_code == 401
    assert "i-0123" not in response.text and JPEG not in response.content


def test_a_forged_token_is_refused(auth_manager, world, client):
    s3, bucket = world
    forged = token(auth_manager, "watcher", "viewer")[:-4] + "AAAA"

    response = client([finished_run(s3, bucket)]).get(
        run_url("manual__2026-11-29T10:00:00+00:00"), headers={"Authorization": f"Bearer {forged}"}
    )

    assert response.status_code in (401, 403) and "i-0123" not in response.text


def test_a_viewer_reads_the_report_of_a_finished_run(auth_manager, world, client):
    s3, bucket = world
    run = finished_run(s3, bucket)
    viewer = client([run])
    viewer.cookies.set("_token", token(auth_manager, "watcher", "viewer"))  # the UI's session cookie

    page = viewer.get(run_url(run.run_id)).text

    rows = re.findall(r"<tr data-index='(\d+)' data-status='(\w+)'>", page)
    assert rows == [("0", "ok"), ("1", "ok"), ("2", "failed")]
    assert "in 0 &lt;b&gt;&amp;&#x27;&quot;.mp4" in page and "<b>&" not in page  # keys are shown, never parsed
    assert "1.93 USD" in page and "g6e.xlarge" in page and "1:02:05" in page
    assert "src='./manual__2026-11-29T10%3A00%3A00%2B00%3A00/qc/0.jpg'" in page
    assert "no frame: ffmpeg could not make the frame" in page
    assert 'http-equiv="refresh"' not in page  # a finished run's page stands still
    rerun = re.search(r"<a id='rerun' class='button' href='([^']+)'", page)
    assert rerun is not None
    href = rerun.group(1).replace("&amp;", "&")
    assert href.startswith("../trigger?")
    assert json.loads(urllib.parse.parse_qs(href.split("?", 1)[1])["conf"][0]) == {
        "sources": ["s3://src/in 2 <b>&'\".mp4"],
        "output_bucket": bucket,
        "overwrite": True,
    }
    # ../trigger from the run's page is the DAG's pre-filled trigger page
    assert urllib.parse.urljoin(f"http://x/vod-sr{run_url(run.run_id)}", href).startswith(
        f"http://x/vod-sr/dags/{DAG_ID}/trigger?"
    )


def test_the_qc_frame_report_and_output_link_are_served(auth_manager, world, client):
    s3, bucket = world
    run = finished_run(s3, bucket)
    viewer = client([run])
    viewer.headers["Authorization"] = f"Bearer {token(auth_manager, 'watcher', 'viewer')}"

    frame = viewer.get(run_url(run.run_id, "/qc/0.jpg"))
    no_frame = viewer.get(run_url(run.run_id, "/qc/1.jpg"))
    report = viewer.get(run_url(run.run_id, "/report.json"))
    output = viewer.get(run_url(run.run_id, "/outputs/0"), follow_redirects=False)

    assert frame.status_code == 200 and frame.content == JPEG and frame.headers["content-type"] == "image/jpeg"
    assert no_frame.status_code == 404 and "no QC frame" in no_frame.text
    assert report.json()["counts"] == {"ok": 2, "failed": 1}
    assert output.status_code == 307
    with urllib.request.urlopen(output.headers["location"], timeout=10) as downloaded:  # a presigned S3 URL
        assert downloaded.read() == b"the enhanced video"


def test_a_running_run_shows_each_instances_progress_and_refreshes(auth_manager, world, client):
    s3, bucket = world
    run_id = "manual__2026-11-29T11:00:00+00:00"
    token_ = run_token(DAG_ID, run_id)
    summary = {
        "run_token": token_,
        "lanes": [
            {"instance_id": "i-aaa", "chunks": [0, 1], "files": 5},
            {"instance_id": "i-bbb", "chunks": [2], "files": 2},
        ],
    }
    # What the chunk scripts stored so far: chunk 0 finished 2 files (one failed), chunk 1 none yet, chunk 2 one.
    s3.put_object(
        Bucket=bucket,
        Key=chunk_keys(token_, 0)[1],
        Body=b"VODSR-RESULT\t0\tok\t10\t3\t\t640x480 1.00 1\t1280x960 1.00 1\n"
        b"VODSR-RESULT\t1\tfailed\t0\t1\tffmpeg\t\t\n",
    )
    s3.put_object(Bucket=bucket, Key=chunk_keys(token_, 2)[1], Body=b"VODSR-RESULT\t5\tok\t10\t3\t\t-\t-\n")
    running = RunInfo(DAG_ID, run_id, "running", {"output_bucket": bucket}, None)
    viewer = client([running], {run_id: summary})
    viewer.cookies.set("_token", token(auth_manager, "watcher", "viewer"))

    page = viewer.get(run_url(run_id)).text

    assert "<span id='progress'>3/7</span> files done" in page
    assert re.search(r"i-aaa</td>.*?2/5 files done</td><td class='num'>1 failed", page)
    assert re.search(r"i-bbb</td>.*?1/2 files done</td><td class='num'>0 failed", page)
    assert 'http-equiv="refresh"' in page


def test_a_run_that_has_not_planned_yet_says_so(auth_manager, world, client):
    _, bucket = world
    queued = RunInfo(DAG_ID, "scheduled__x", "queued", {"output_bucket": bucket}, None)
    viewer = client([queued])
    viewer.cookies.set("_token", token(auth_manager, "watcher", "viewer"))

    page = viewer.get(run_url("scheduled__x")).text

    assert "No plan yet" in page and 'http-equiv="refresh"' in page


def test_an_unknown_run_is_not_found(auth_manager, world, client):
    viewer = client([])
    viewer.cookies.set("_token", token(auth_manager, "watcher", "viewer"))

    response = viewer.get(run_url("nope"))

    assert response.status_code == 404 and "has no run 'nope'" in response.text


def test_the_history_lists_recent_runs_with_counts_and_cost(auth_manager, world, client):
    s3, bucket = world
    finished = finished_run(s3, bucket)
    queued = RunInfo(DAG_ID, "manual__later", "queued", {"output_bucket": bucket}, None)
    viewer = client([queued, finished])
    viewer.cookies.set("_token", token(auth_manager, "watcher", "viewer"))

    page = viewer.get(f"/dags/{DAG_ID}/history").text

    rows = re.findall(r"<tr><td><a href='([^']+)'>([^<]+)</a>.*?</tr>", page)
    assert [name for _, name in rows] == ["manual__later", finished.run_id]
    assert rows[1][0] == "./runs/manual__2026-11-29T10%3A00%3A00%2B00%3A00"
    finished_row = page[page.index(finished.run_id) :]
    assert re.search(r"<td class='num'>3</td><td class='num'>2</td><td class='num'>1</td>", finished_row)
    assert "1.93 USD" in finished_row


def test_a_partial_cost_names_the_instances_it_leaves_out():
    from include.vod_sr.run_page import render_run_page

    cost = {
        "currency": "USD",
        "total": 0.9305,
        "partial": True,
        "instances": {"i-0aaa": {"instance_type": "g6e.xlarge", "seconds": 1800, "hourly_rate": 1.861, "cost": 0.9305}},
        "unpriced": [{"instance_id": "i-0bbb", "reason": "its running time is unknown"}],
    }

    page = render_run_page(
        dag_id=DAG_ID,
        run_id="r",
        state="success",
        report={"counts": {}, "files": [], "cost": cost},
        progress=None,
        report_uri=None,
    )

    assert (
        "0.93 USD" in page
        and "Partial: 1 instance(s) could not be priced (i-0bbb: its running time is unknown)" in page
    )


def test_files_the_budget_left_are_counted_and_get_a_button_that_runs_them():
    from include.vod_sr.report import build_report
    from include.vod_sr.run_page import render_run_page
    from include.vod_sr.verify import file_record

    jobs = [FileJob(n, S3Object("src", f"in {n}.mp4"), S3Object("out", f"sr/{n}.mp4")) for n in range(3)]
    report = build_report(
        run_id="r",
        run_token="t",
        params={"output_bucket": "out", "budget": 5},
        planned=jobs,
        verified=[[file_record(jobs[0], "ok"), file_record(jobs[1], "left", "budget"), file_record(jobs[2], "left")]],
        skipped=[],
        dag_id=DAG_ID,
    )

    page = render_run_page(dag_id=DAG_ID, run_id="r", state="success", report=report, progress=None, report_uri=None)

    assert "left (budget)" in page
    assert "<a id='rerun'" not in page  # nothing failed
    button = re.search(r"<a id='run-left' class='button' href='([^']+)'>Run the 2 file\(s\) the budget left", page)
    assert button is not None
    conf = json.loads(urllib.parse.parse_qs(button.group(1).replace("&amp;", "&").split("?", 1)[1])["conf"][0])
    assert conf == {
        "output_bucket": "out",
        "budget": 5,
        "sources": ["s3://src/in 1.mp4", "s3://src/in 2.mp4"],
        "prefixes": [],
        "manifest": None,
    }


def test_progress_reads_the_chunk_indices_from_the_stored_plan(auth_manager, world, client):
    """The plan summary in XCom counts chunks; which chunks belong to which instance is in S3 (stored_plan.py)."""
    from include.vod_sr.stored_plan import plan_key

    s3, bucket = world
    run_id = "manual__2026-11-29T12:00:00+00:00"
    token_ = run_token(DAG_ID, run_id)
    summary = {"run_token": token_, "lanes": [{"instance_id": "i-ccc", "files": 4, "chunks": 2}]}
    index = [{"instance_id": "i-ccc", "files": 4, "chunks": [3, 7]}]
    s3.put_object(Bucket=bucket, Key=plan_key(token_, "lanes.json"), Body=json.dumps(index).encode())
    s3.put_object(Bucket=bucket, Key=chunk_keys(token_, 7)[1], Body=b"VODSR-RESULT\t9\tok\t10\t3\t\t-\t-\n")
    viewer = client([RunInfo(DAG_ID, run_id, "running", {"output_bucket": bucket}, None)], {run_id: summary})
    viewer.cookies.set("_token", token(auth_manager, "watcher", "viewer"))

    page = viewer.get(run_url(run_id)).text

    assert "<span id='progress'>1/4</span> files done" in page
