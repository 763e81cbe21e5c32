"""The plan and verify's records live in S3 (stored_plan.py); XCom carries references whose size does not grow with
the number of files. moto in-process stands in for S3."""

from __future__ import annotations

import json

import boto3
import pytest
from moto import mock_aws

from include.vod_sr.plan import BatchPlan, BatchRequest, Chunk, FileJob, lane_label
from include.vod_sr.sources import S3Object
from include.vod_sr.stored_plan import (
    Lane,
    load_chunks,
    load_lane_index,
    load_skipped,
    load_verified,
    store_plan,
    store_verified,
)

BUCKET = "out"
INSTANCES = ("i-0aaaaaaaaaaaaaaaa", "i-0bbbbbbbbbbbbbbbb")
MODEL = {"name": "cpu", "video_filter": "scale=iw*2:ih*2", "scale": 2.0}


@pytest.fixture
def s3():
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


def a_plan(files: int, chunk_size: int = 10, skipped: int = 0) -> BatchPlan:
    request = BatchRequest(model="cpu", source_bucket="src", output_bucket=BUCKET, instance_ids=INSTANCES)
    jobs = [
        FileJob(n, S3Object("src", f"library/show {n:07d}.mp4"), S3Object(BUCKET, f"library/show {n:07d}_sr.mp4"))
        for n in range(files + skipped)
    ]
    chunks = tuple(
        Chunk(index, INSTANCES[index % len(INSTANCES)], tuple(jobs[start : start + chunk_size]))
        for index, start in enumerate(range(0, files, chunk_size))
    )
    return BatchPlan(request, "0123456789abcdef", chunks, skipped=tuple(jobs[files:]))


def xcom_bytes(lanes: list[Lane], summary: dict, verified: list[dict]) -> int:
    """What a run puts in XCom about its files: the plan task's lanes and summary, each verify's return."""
    return sum(len(json.dumps(value)) for value in ([lane.to_xcom() for lane in lanes], summary, verified))


def test_xcom_stays_flat_from_1000_to_100000_files(s3):
    sizes = {}
    for files in (1_000, 100_000):
        lanes, summary = store_plan(s3, a_plan(files, skipped=files // 10), MODEL)
        verified = [store_verified(s3, lane, [{"index": n} for n in range(lane.file_count)]) for lane in lanes]
        sizes[files] = xcom_bytes(lanes, summary, verified)

    # Only the digits of the counts grow; the whole is under a kilobyte and a half per run with two instances.
    assert sizes[100_000] - sizes[1_000] < 40, sizes
    assert sizes[100_000] < 1_500, sizes


def test_each_lane_reads_back_its_own_chunks_in_order(s3):
    plan = a_plan(95, chunk_size=10)

    lanes, summary = store_plan(s3, plan, MODEL)

    assert [lane.instance_id for lane in lanes] == list(INSTANCES)
    for lane in lanes:
        chunks = [Chunk.from_xcom(c) for c in load_chunks(s3, lane)]
        assert chunks == [c for c in plan.chunks if c.instance_id == lane.instance_id]
        assert lane.chunk_count == len(chunks) and lane.file_count == sum(len(c.files) for c in chunks)
    assert summary["file_count"] == 95 and summary["chunk_count"] == 10
    assert summary["lanes"] == [
        {"instance_id": INSTANCES[0], "files": 50, "chunks": 5},
        {"instance_id": INSTANCES[1], "files": 45, "chunks": 5},
    ]
    assert load_lane_index(s3, BUCKET, plan.run_token) == [
        {"instance_id": INSTANCES[0], "files": 50, "chunks": [0, 2, 4, 6, 8]},
        {"instance_id": INSTANCES[1], "files": 45, "chunks": [1, 3, 5, 7, 9]},
    ]


def test_skipped_files_and_verified_records_round_trip(s3):
    plan = a_plan(20, skipped=3)
    lanes, summary = store_plan(s3, plan, MODEL)
    records = [{"index": 0, "source": "s3://src/library/show 'quoted' 한글.mp4", "status": "ok"}]

    refs = [store_verified(s3, lanes[0], records)]

    assert load_skipped(s3, BUCKET, plan.run_token) == list(plan.skipped) and summary["skipped_count"] == 3
    assert load_verified(s3, BUCKET, refs) == [records]
    assert refs == [{"instance_id": INSTANCES[0], "verified_key": lanes[0].verified_key, "records": 1}]


def test_a_lane_travels_as_a_typed_value_and_names_its_tasks(s3):
    (lane, _), _ = store_plan(s3, a_plan(12), MODEL)

    data = json.loads(json.dumps(lane.to_xcom()))  # as XCom stores it

    assert Lane.from_xcom(data) == lane
    assert lane_label(data) == lane.label == f"{INSTANCES[0]} (10 files)"
    assert lane.chunks_key == f"vod-sr-runs/0123456789abcdef/plan/lane-{INSTANCES[0]}.json"


def test_one_lanes_file_dicts_are_built_at_a_time(monkeypatch):
    """store_plan makes a lane's `to_xcom` dicts just before writing that lane, not every lane's first."""
    plan = a_plan(40, chunk_size=5)
    made = []
    real = FileJob.to_xcom
    monkeypatch.setattr(FileJob, "to_xcom", lambda job: made.append(job.index) or real(job))

    class Sink:
        writes: list[tuple[str, int]] = []

        def put_object(self, Bucket, Key, Body, ContentType):
            self.writes.append((Key.rpartition("/")[2], len(made)))

    store_plan(Sink(), plan, MODEL)

    assert Sink.writes == [
        (f"lane-{INSTANCES[0]}.json", 20),
        (f"lane-{INSTANCES[1]}.json", 40),
        ("lanes.json", 40),
        ("skipped.json", 40),
    ]


class TestLaunchedLanes:
    def test_lanes_of_instances_launched_for_the_run_are_terminated_when_done(self, s3):
        plan = a_plan(40)
        launched = BatchPlan(plan.request, plan.run_token, plan.chunks, launched=INSTANCES[:1])

        lanes, summary = store_plan(s3, launched, MODEL)

        assert {lane.instance_id: lane.terminate_when_done for lane in lanes} == {
            INSTANCES[0]: True,
            INSTANCES[1]: False,
        }
        assert summary["launched"] == [INSTANCES[0]]
        assert Lane.from_xcom(lanes[0].to_xcom()).terminate_when_done is True

    def test_named_instances_are_never_terminated(self, s3):
        lanes, summary = store_plan(s3, a_plan(40), MODEL)

        assert [lane.terminate_when_done for lane in lanes] == [False, False]
        assert summary["launched"] == []

    def test_a_lane_stored_before_fleets_existed_still_loads(self, s3):
        (lane, _), _ = store_plan(s3, a_plan(20), MODEL)
        earlier = {k: v for k, v in lane.to_xcom().items() if k != "terminate_when_done"}  # XCom of a run in flight

        assert Lane.from_xcom(earlier) == lane
