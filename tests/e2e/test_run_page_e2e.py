"""A real run (dag.test() on the emulator, real ffmpeg and AWS CLI on the instance) read back by the run pages as
the API server reads it: the run and the plan's summary from Airflow's metadata database, the report, results and
QC frames from S3. Also the lane tasks' names in the UI (map_index_template)."""

from __future__ import annotations

import re
import urllib.parse

import pytest
from fastapi.testclient import TestClient

from include.local_aws.world import OUTPUT_BUCKET
from include.vod_sr.plan import run_token
from include.vod_sr.settings import Settings
from include.vod_sr.stored_plan import load_lane_index
from include.vod_sr.web import RunSource, app, run_source
from tests.vod_sr.test_web import auth_manager, token  # noqa: F401 (a fixture)

pytestmark = pytest.mark.e2e


@pytest.fixture
def pages(auth_manager):  # noqa: F811 (the fixture imported above)
    source = RunSource(Settings.from_env())  # the real one: the test's Airflow database and the emulator's S3
    app.dependency_overrides[run_source] = lambda: source
    client = TestClient(app)
    client.cookies.set("_token", token(auth_manager, "watcher", "viewer"))
    yield client
    app.dependency_overrides.clear()


def test_a_finished_run_is_read_back_from_airflow_and_s3(world, pages):
    world.upload("page/one.mp4")
    world.upload("page/two.mp4")
    world.upload("page/broken.mp4", body=b"not a video")

    run = world.run(sources=["page/one.mp4", "page/two.mp4", "page/broken.mp4"])

    assert run.state == "failed"
    page = pages.get(f"/dags/vod_sr_batch/runs/{urllib.parse.quote(run.run_id, safe='')}")
    assert page.status_code == 200
    rows = re.findall(r"<tr data-index='(\d+)' data-status='(\w+)'>", page.text)
    assert sorted(status for _, status in rows) == ["failed", "ok", "ok"]
    frames = re.findall(r"src='(\./[^']+/qc/\d+\.jpg)'", page.text)
    assert len(frames) == 2
    for frame in frames:  # served through the API server from the instance's upload
        path = urllib.parse.urljoin(f"/dags/vod_sr_batch/runs/{urllib.parse.quote(run.run_id, safe='')}", frame)
        served = pages.get(path)
        assert served.status_code == 200 and served.content[:2] == b"\xff\xd8", path
    assert re.search(r"estimated cost: <span id='cost-total'>\d+\.\d\d USD", page.text)
    assert "<a id='rerun'" in page.text

    history = pages.get("/dags/vod_sr_batch/history").text
    assert urllib.parse.quote(run.run_id, safe="") in history


def test_lane_tasks_are_named_by_their_instance_and_file_count(world):
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    world.upload("page/named.mp4")

    run = world.run(sources=["page/named.mp4"])

    assert run.state == "success"
    with create_session() as session:
        names = {
            ti.task_id: ti.rendered_map_index
            for ti in session.query(TaskInstance).filter_by(dag_id="vod_sr_batch", run_id=run.run_id)
            if ti.map_index >= 0
        }
    assert names == {
        task: f"{world.instance_id} (1 files)"
        for task in (
            "lane.acquire",
            "lane.wait_for_agent",
            "lane.run_chunks",
            "lane.verify",
            "lane.release",
        )
    }


def test_the_plan_summary_gives_the_run_page_each_instances_chunks(world):
    world.upload("page/summary.mp4")

    run = world.run(sources=["page/summary.mp4"])

    summary = RunSource(Settings.from_env()).plan_summary("vod_sr_batch", run.run_id)
    assert summary is not None
    assert summary["run_token"] == run_token("vod_sr_batch", run.run_id)
    assert summary["lanes"] == [{"instance_id": world.instance_id, "chunks": 1, "files": 1}]
    # the chunk indices the page reads for progress are in S3, not in XCom
    assert load_lane_index(world.s3, OUTPUT_BUCKET, summary["run_token"]) == [
        {"instance_id": world.instance_id, "files": 1, "chunks": [0]}
    ]
