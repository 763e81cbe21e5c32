"""The plan and the verify results kept in S3, next to the chunks' file lists and results, not in XCom.

XCom lives in Airflow's metadata database: a plan of a million files there would be hundreds of MB per run. So the
plan task stores each lane's chunks (`plan/lane-<instance>.json`), the chunk indices per instance that the run page
reads for progress (`plan/lanes.json`) and the files skipped because their output exists (`plan/skipped.json`),
and hands each lane over as a `Lane`: a reference of a few hundred bytes. Verify stores its records the same way
(`plan/verified-<instance>.json`). XCom then holds O(instances) per run, whatever the number of files.

All keys are under `vod-sr-runs/<run token>/plan/` in the run's output bucket (the Airflow principal writes and
reads them; the instance role may not write them).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from include.vod_sr.plan import BatchPlan, Chunk, FileJob
from include.vod_sr.script import RUNS_PREFIX


def plan_key(run_token: str, name: str) -> str:
    return f"{RUNS_PREFIX}{run_token}/plan/{name}"


@dataclass(frozen=True)
class Lane:
    """One instance's share of a run, as its mapped tasks receive it: everything but the chunks, which are in S3
    at `chunks_key`."""

    run_token: str
    instance_id: str
    output_bucket: str
    execution_timeout: int
    file_timeout: int | None
    stop_when_done: bool
    chunk_count: int
    file_count: int
    model: Mapping[str, Any]
    # Launched for this run (its fleet, fleet.py): the teardown terminates the instance instead of stopping it.
    terminate_when_done: bool = False

    @property
    def chunks_key(self) -> str:
        return plan_key(self.run_token, f"lane-{self.instance_id}.json")

    @property
    def verified_key(self) -> str:
        return plan_key(self.run_token, f"verified-{self.instance_id}.json")

    @property
    def label(self) -> str:
        """Its mapped tasks' name in the UI (map_index_template): `i-0abc... (12 files)`."""
        return f"{self.instance_id} ({self.file_count} files)"

    def to_xcom(self) -> dict[str, Any]:
        return {**asdict(self), "model": dict(self.model), "label": self.label}

    @classmethod
    def from_xcom(cls, data: Mapping[str, Any]) -> Lane:
        # A lane stored before a field was added lacks it: the field's default stands.
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


def _put(s3: Any, bucket: str, key: str, document: Any) -> None:
    body = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
    s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json")


def _get(s3: Any, bucket: str, key: str) -> Any:
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def store_plan(s3: Any, plan: BatchPlan, model: Mapping[str, Any]) -> tuple[list[Lane], dict[str, Any]]:
    """Write the plan to S3; returns the lanes to map over and the run's summary, both O(instances)."""
    request, token = plan.request, plan.run_token
    launched = set(plan.launched)
    by_instance: dict[str, list[Chunk]] = {}
    for chunk in plan.chunks:
        by_instance.setdefault(chunk.instance_id, []).append(chunk)
    lanes: list[Lane] = []
    index: list[dict[str, Any]] = []  # plan/lanes.json: what the run page reads for progress
    for instance_id, chunks in by_instance.items():
        lane = Lane(
            run_token=token,
            instance_id=instance_id,
            output_bucket=request.output_bucket,
            execution_timeout=request.execution_timeout,
            file_timeout=request.file_timeout,
            stop_when_done=request.stop_when_done,
            chunk_count=len(chunks),
            file_count=sum(len(chunk.files) for chunk in chunks),
            model=model,
            terminate_when_done=instance_id in launched,
        )
        # One lane's dicts at a time: built, written and dropped before the next lane's (a million files' dicts
        # at once would be several times the plan's own size).
        _put(s3, request.output_bucket, lane.chunks_key, {"chunks": [chunk.to_xcom() for chunk in chunks]})
        lanes.append(lane)
        index.append({"instance_id": instance_id, "files": lane.file_count, "chunks": [c.index for c in chunks]})
    _put(s3, request.output_bucket, plan_key(token, "lanes.json"), index)
    _put(s3, request.output_bucket, plan_key(token, "skipped.json"), [job.to_xcom() for job in plan.skipped])
    summary = {
        "run_token": token,
        "output_bucket": request.output_bucket,
        "file_count": plan.file_count,
        "chunk_count": len(plan.chunks),
        "skipped_count": len(plan.skipped),
        "lanes": [
            {"instance_id": lane.instance_id, "files": lane.file_count, "chunks": lane.chunk_count} for lane in lanes
        ],
        "modified_window": [t.isoformat() for t in request.modified_window or ()] or None,
        "launched": list(plan.launched),
    }
    return lanes, summary


def load_chunks(s3: Any, lane: Lane) -> list[dict[str, Any]]:
    """The lane's chunks as the plan stored them (`Chunk.to_xcom()` dicts), in the order they are sent."""
    return _get(s3, lane.output_bucket, lane.chunks_key)["chunks"]


def load_lane_index(s3: Any, bucket: str, run_token: str) -> list[dict[str, Any]]:
    """Each instance's planned files and chunk indices (`{"instance_id", "files", "chunks": [index, ...]}`)."""
    return _get(s3, bucket, plan_key(run_token, "lanes.json"))


def load_skipped(s3: Any, bucket: str, run_token: str) -> list[FileJob]:
    return [FileJob.from_xcom(job) for job in _get(s3, bucket, plan_key(run_token, "skipped.json"))]


def store_verified(s3: Any, lane: Lane, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Keep verify's records of a lane in S3; returns what verify hands the report (O(1))."""
    _put(s3, lane.output_bucket, lane.verified_key, list(records))
    return {"instance_id": lane.instance_id, "verified_key": lane.verified_key, "records": len(records)}


def load_verified(s3: Any, bucket: str, verified: Iterable[Mapping[str, Any]]) -> list[list[dict[str, Any]]]:
    """The records of each lane verify stored (see `store_verified`)."""
    return [_get(s3, bucket, ref["verified_key"]) for ref in verified]


def left_key(run_token: str, instance_id: str) -> str:
    return plan_key(run_token, f"left-{instance_id}.json")


def store_left(
    s3: Any,
    bucket: str,
    run_token: str,
    instance_id: str,
    chunk_indices: Sequence[int],
    budget_stop: Mapping[str, Any],
) -> None:
    """Keep the chunks of a lane that the run's budget kept from being sent (run_chunks), with the budget figures
    (`budget`, `spent`, `currency`): verify reports their files as left for the next run."""
    _put(s3, bucket, left_key(run_token, instance_id), {**budget_stop, "chunk_indices": list(chunk_indices)})


def load_left(s3: Any, lane: Lane) -> dict[str, Any] | None:
    """What `store_left` kept for the lane; None when the budget stopped nothing there."""
    return load_left_of(s3, lane.output_bucket, lane.run_token, lane.instance_id)


def load_left_of(s3: Any, bucket: str, run_token: str, instance_id: str) -> dict[str, Any] | None:
    """`load_left` for a lane given by its bucket, run token and instance."""
    try:
        return _get(s3, bucket, left_key(run_token, instance_id))
    except Exception as error:  # botocore is not imported here: NoSuchKey is told by its code
        if getattr(error, "response", {}).get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
