"""`make bench`: vod-sr's throughput figures on the local AWS emulator, beside the provider's stock operators.

Runs the real Airflow components (API server, scheduler with the LocalExecutor, dag-processor, triggerer, each its
own process, on a throwaway PostgreSQL) against the emulator and real ffmpeg (cpu model), and
measures from the emulator's own records (instance running intervals, command runs, every API call):

- busy ratio: seconds the instance ran SR chunk commands / seconds it was running (target >= 0.90);
- orchestration overhead per file: (run wall time - SR time) / files (target < 1 s at 20 files);
- AWS API calls per file, split into sends, polls, S3, EC2 (target <= 3 per file without polls), and polls per
  minute at two batch sizes (should not grow with files);
- plan time and chunk/mapped counts for 10,000 sources under a prefix (targets <= 20 s, <= 1024);
- planning 1,000,000 sources from a manifest, in a fresh child process, against an in-process S3 STAND-IN for the
  listing (the emulator cannot hold a million objects quickly): the planner's own time and peak RSS (targets <= 60 s,
  <= 1 GiB), and the XCom bytes a run writes at 1,000 / 100,000 / 1,000,000 files: lane references, summary and
  one verify reference per lane, measured by running store_plan against the stand-in (target < 64 KB each);
- DAG file parse time over a bare `import airflow.sdk` (target <= 0.3 s);
- the same 20-file batch through a DAG of stock provider operators (benchmarks/baseline_stock_operators.py), which
  sends all 20 at once, beside vod-sr with 1, 2 and 4 SR streams per GPU on the same 1-GPU instance (chunk size 1;
  benchmarks/vod_sr_streams.py makes one DAG per setting, as VOD_SR_STREAMS_PER_GPU is read at parse time): wall
  and instance running time, the best vod-sr run against the baseline (target: faster);
- from the emulator's per-GPU record of model runs: the per-slot busy ratio on an emulated 4-GPU g6e.12xlarge and
  an 8-GPU g6e.48xlarge, 40 files, chunk size 1, under the SSM agent's limit of 5 commands at once (least busy
  GPU's busy seconds over the SR window, first model run start -> last end; target >= 0.97; also over the whole
  running time), and each lane's idle time before its first model run and after its last (targets <= 2 poll
  intervals);
- a simulated night (step `night`, last; `ONLY=night`): 100 g6e.12xlarge (400 GPUs), 100,000 files, two runs of 50
  instances, the emulator's synthetic SR stand-in in place of ffmpeg (NIGHT_SR_SECONDS per file: the night
  compressed K times), production's 15 s poll interval: AWS calls per minute by action (peak and mean) against the
  published EC2 and S3 rate limits (targets: below them), task instances, triggers and XCom in the metadata DB, the
  CPU seconds of the scheduler, triggerer and the rest, and each GPU's busy ratio.

Each step's figures are merged into bench-results.json as soon as they are taken, with `status` ("partial" until
every step has figures, then "complete"), `failed_steps` (step -> error) and `targets` (figure, target, met). A step
that fails is recorded and the next steps still run; whatever the bench started is stopped however it ends.
`--only plan_1m[,parse...]` runs some steps and merges their figures into the existing file.

Not a test: nothing here asserts. Exits 1 when a step failed.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the heavy imports are made where used: the planning child process stays lean
    from include.local_aws.airflow_stack import AirflowStack
    from include.local_aws.world import EmulatorProcess
    from include.vod_sr.plan import BatchPlan

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATH = REPO_ROOT / "bench-results.json"
POLL_INTERVAL = 2  # seconds; production default is 15 (see the note printed with the results)
POLL_ACTIONS = {"GetCommandInvocation", "ListCommandInvocations", "DescribeInstanceInformation", "DescribeInstances"}
EC2_ACTIONS = {"StartInstances", "StopInstances", "CreateTags", "DeleteTags", "DescribeTags"}

STREAMS = (1, 2, 4)  # VOD_SR_STREAMS_PER_GPU of the equal-concurrency runs (benchmarks/vod_sr_streams.py)
STREAM_STEPS = tuple(f"vod_sr_20_files_streams_{n}" for n in STREAMS)


def streams_dag_id(streams: int) -> str:
    """The DAG of benchmarks/vod_sr_streams.py with `streams` per GPU (its dag_id(); not imported: it builds DAGs)."""
    return f"vod_sr_bench_streams_{streams}"


GPU4_STEP = "vod_sr_40_files_4_gpus"  # 40 files, chunk size 1, on an emulated g6e.12xlarge (4 GPUs)
# Seconds each model run of GPU4_STEP lasts (the emulator's GPU pace, InstanceFaults.model_run_seconds): about what
# the real ffmpeg takes for one 10 s clip with four running on this 2-core machine, made constant.
GPU4_MODEL_RUN_SECONDS = 20.0
GPU4_INSTANCE_TYPE = "g6e.12xlarge"
# The same 40 files on an emulated g6e.48xlarge (8 GPUs): with the SSM agent's 5 commands at once (the emulator's
# default, as the real agent's), run_chunks keeps 5 chunks out, so 3 GPUs get no work (issue 20).
GPU8_STEP = "vod_sr_40_files_8_gpus"
GPU8_INSTANCE_TYPE = "g6e.48xlarge"
BUSY_RATIO_TARGET = 0.97  # least busy GPU, under the agent's limit (issue 20)
SLOT_CHUNK_SIZE = 1  # chunk size of the streams and 4-GPU runs (--slot-chunk-size): small, so every slot has work
RUN_STEPS = (  # need Airflow
    "vod_sr_20_files",
    "baseline_20_files",
    *STREAM_STEPS,
    GPU4_STEP,
    GPU8_STEP,
    "vod_sr_40_files",
    "vod_sr_20_files_30s",
)
VOD_SR_RUN_STEPS = tuple(s for s in RUN_STEPS if s.startswith("vod_sr_"))
EMULATOR_STEPS = (*RUN_STEPS, "plan_10000")  # need the emulator
NIGHT_STEP = "night"  # its own emulator (with the synthetic SR stand-in) and Airflow stack, last
STEPS = ("parse", "plan_1m", *EMULATOR_STEPS, NIGHT_STEP)  # in the order they run

PLAN_SIZES = (1_000, 100_000, 1_000_000)  # files planned from a manifest by the plan_1m step (one child each)
PLAN_CHILD_TIMEOUT = 900  # seconds; the target is 60
XCOM_TARGET_BYTES = 64 * 1024  # per run, at every size
IDLE_TARGET_SECONDS = 2 * POLL_INTERVAL  # per lane, before the first model run and after the last


# --- the figures -------------------------------------------------------------------------------------------------


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one moment (an interval ending as another starts does not overlap it)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    most = now_open = 0
    for _, step in events:
        now_open += step
        most = max(most, now_open)
    return most


def gpu_figures(timeline: dict[str, Any], started: float, ended: float) -> dict[str, Any]:
    """Each emulated GPU's model runs (timeline["gpu_busy"]) during a run that went from `started` to `ended`.

    - the SR window: from the first model run's start to the last one's end, on any GPU of the instance;
    - per GPU (slot): busy seconds = the union of its model runs (streams on one GPU overlap), over the SR window
      (`busy_ratio_in_window`) and over the instance's running seconds in the run (`busy_ratio_of_running`);
      a GPU of the instance that ran nothing counts with 0;
    - `per_slot_busy_ratio`: the least busy GPU's ratio over the SR window (`_mean`: their mean; `_of_running`: the
      least busy over the running time);
    - idle before the first model run: from the start of the running interval it falls in (the instance running)
      to its start; idle after the last: from its end to the end of that running interval (the instance stopping).
    None where the instance ran no model run in the run (the baseline's seed-style script sets no marker)."""
    running = [(s, e if e is not None else ended) for s, e in timeline.get("running", []) if s >= started]
    busy = {gpu: [(s, e) for s, e in runs if s >= started] for gpu, runs in (timeline.get("gpu_busy") or {}).items()}
    busy = {gpu: runs for gpu, runs in busy.items() if runs}
    gpus = int(timeline.get("gpus") or 0)
    runs = [run for gpu_runs in busy.values() for run in gpu_runs]
    empty = dict.fromkeys(
        (
            "per_slot_busy_ratio",
            "per_slot_busy_ratio_mean",
            "per_slot_busy_ratio_of_running",
            "sr_window_seconds",
            "idle_before_first_sr_seconds",
            "idle_after_last_sr_seconds",
        )
    )
    if not runs or not running:
        return {"gpus": gpus, "sr_runs": len(runs), "max_concurrent_sr_runs": max_overlap(runs), **empty, "per_gpu": {}}
    first, last = min(s for s, _ in runs), max(e for _, e in runs)
    window = last - first
    running_seconds = union_seconds(running)
    names = sorted(
        set(busy) | {str(n) for n in range(gpus)}, key=lambda g: (not g.isdigit(), int(g) if g.isdigit() else 0, g)
    )
    per_gpu = {}
    for name in names:
        seconds = union_seconds(busy.get(name, []))
        per_gpu[name] = {
            "sr_runs": len(busy.get(name, [])),
            "busy_seconds": round(seconds, 1),
            "max_concurrent_sr_runs": max_overlap(busy.get(name, [])),
            "busy_ratio_in_window": round(seconds / window, 3) if window > 0 else None,
            "busy_ratio_of_running": round(seconds / running_seconds, 3) if running_seconds > 0 else None,
        }
    in_window = [g["busy_ratio_in_window"] for g in per_gpu.values() if g["busy_ratio_in_window"] is not None]
    of_running = [g["busy_ratio_of_running"] for g in per_gpu.values() if g["busy_ratio_of_running"] is not None]
    before = [first - s for s, e in running if s <= first <= e]
    after = [e - last for s, e in running if s <= last <= e]
    return {
        "gpus": gpus,
        "sr_runs": len(runs),
        "max_concurrent_sr_runs": max_overlap(runs),
        "sr_window_seconds": round(window, 1),
        "per_slot_busy_ratio": min(in_window) if in_window else None,
        "per_slot_busy_ratio_mean": (
            round(statistics.mean(union_seconds(busy.get(name, [])) / window for name in names), 3)
            if window > 0
            else None
        ),
        "per_slot_busy_ratio_of_running": min(of_running) if of_running else None,
        "idle_before_first_sr_seconds": round(before[0], 1) if before else None,
        "idle_after_last_sr_seconds": round(after[0], 1) if after else None,
        "per_gpu": per_gpu,
    }


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def classify(calls: list[dict[str, Any]]) -> Counter[str]:
    kinds: Counter[str] = Counter()
    for call in calls:
        if call["service"] == "s3":
            kinds["s3"] += 1
        elif call["action"] == "SendCommand":
            kinds["sends"] += 1
        elif call["action"] in POLL_ACTIONS:
            kinds["polls"] += 1
        elif call["action"] in EC2_ACTIONS:
            kinds["ec2"] += 1
        else:
            kinds["other"] += 1
    return kinds


def with_retries(call: Callable[[], Any], what: str, attempts: int = 6, backoff: float = 1.0) -> Any:
    """`call()`, tried again (1, 2, 4, 8, 16 s apart) when the emulator's control API times out, is unreachable or
    answers 5xx; like AirflowStack.api for the Airflow API."""
    import http.client
    import urllib.error

    for attempt in range(1, attempts + 1):
        try:
            return call()
        except urllib.error.HTTPError as error:
            if error.code < 500 or attempt == attempts:
                raise
            last: Exception = error
        except (OSError, http.client.HTTPException) as error:
            if attempt == attempts:
                raise RuntimeError(f"{what}: no answer after {attempts} attempts; last error: {error!r}") from error
            last = error
        print(f"    {what}: {last!r}; trying again", flush=True)
        time.sleep(backoff * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def measure_run(
    stack: AirflowStack, emulator: EmulatorProcess, instance_id: str, dag_id: str, conf: dict[str, Any], files: int
) -> dict[str, Any]:
    run_id = stack.trigger(conf, dag_id)
    try:
        state = stack.wait_for_run(run_id, 1800, dag_id)
    except Exception:
        # A run left going would hold the instance and skew the next step's figures: end it (best effort).
        with contextlib.suppress(Exception):
            stack.api("PATCH", f"/dags/{dag_id}/dagRuns/{run_id}", {"state": "failed"})
        raise
    run = stack.run(run_id, dag_id)
    started, ended = parse_time(run["start_date"]), parse_time(run["end_date"])
    timeline = with_retries(emulator.timeline, "emulator timeline")[instance_id]
    in_run = [(s, e if e is not None else ended) for s, e in timeline["running"] if s >= started]
    running = union_seconds(in_run)
    sr_runs = [
        (c["start"], c["end"] or ended)
        for c in timeline["commands"]
        if c["start"] >= started and "install AWS CLI" not in c["comment"]
    ]
    sr_seconds = union_seconds(sr_runs)
    gpu = gpu_figures(timeline, started, ended)
    head = min(s for s, _ in sr_runs) - min(s for s, _ in in_run) if sr_runs and in_run else None
    tail = max(e for _, e in in_run) - max(e for _, e in sr_runs) if sr_runs and in_run else None
    calls = [c for c in with_retries(emulator.calls, "emulator calls") if started - 1 <= c["time"] <= ended + 1]
    kinds = classify(calls)
    wall = ended - started
    status_polls = sum(1 for c in calls if c["action"] in ("GetCommandInvocation", "ListCommandInvocations"))
    return {
        "dag_id": dag_id,
        "conf": {k: v for k, v in conf.items() if k != "sources"},
        "state": state,
        "files": files,
        "wall_seconds": round(wall, 1),
        "instance_running_seconds": round(running, 1),
        "sr_command_seconds": round(sr_seconds, 1),
        "busy_ratio": round(sr_seconds / running, 3) if running else None,
        "idle_before_first_chunk_seconds": round(head, 1) if head is not None else None,
        "idle_after_last_chunk_seconds": round(tail, 1) if tail is not None else None,
        "max_concurrent_commands": max_overlap(sr_runs),
        **gpu,
        "overhead_per_file_seconds": round((wall - sr_seconds) / files, 2),
        "calls_per_file": {k: round(v / files, 2) for k, v in sorted(kinds.items())},
        "calls_per_file_without_polls": round((sum(kinds.values()) - kinds["polls"]) / files, 2),
        "instance_s3_calls_per_file": round(
            sum(1 for c in calls if c["service"] == "s3" and c["caller"] == "instance") / files, 2
        ),
        "polls_per_minute": round(kinds["polls"] / (wall / 60), 1),
        "command_status_polls_per_minute": round(status_polls / (wall / 60), 1),
        "calls_by_action": dict(Counter(f"{c['service']}:{c['action']}" for c in calls).most_common()),
        "calls_total": sum(kinds.values()),
    }


def xcom_breakdown(plan: BatchPlan, model: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a run of `plan` writes to XCom, measured by doing what the DAG does (pipeline.py) against an S3 stand-in
    that takes each put_object and keeps only its size: the plan task's return value (`Lane.to_xcom()` of each
    lane, from `store_plan`) and its "summary" key, plus verify's return value per lane (`store_verified`: a
    reference to the records in S3). The chunks, the index, the skipped files and verify's records go to S3
    (`s3_put_bytes`). JSON as Airflow serializes XCom. Update this when what the tasks return changes."""
    from include.vod_sr.stored_plan import store_plan, store_verified

    if model is None:
        from include.vod_sr.catalog import resolve_model

        model = resolve_model(plan.request.model).to_xcom()
    sink = S3ListingStandIn(0)
    lanes, summary = store_plan(sink, plan, model)
    lane_refs = [lane.to_xcom() for lane in lanes]
    verify_refs = [store_verified(sink, lane, [{}] * lane.file_count) for lane in lanes]  # records: only counted
    sizes = {
        "lanes_bytes": len(json.dumps(lane_refs).encode()),
        "summary_bytes": len(json.dumps(summary).encode()),
        "verify_refs_bytes": sum(len(json.dumps(ref).encode()) for ref in verify_refs),
    }
    return {
        "xcom_bytes": sum(sizes.values()),
        **sizes,
        "lanes": len(lanes),
        "s3_puts": sink.puts,
        "s3_put_bytes": sink.put_bytes,
    }


def xcom_bytes(plan: BatchPlan, model: dict[str, Any] | None = None) -> int:
    """Bytes of XCom a run of `plan` writes: lane references, summary, verify references (see xcom_breakdown)."""
    return xcom_breakdown(plan, model)["xcom_bytes"]


def plan_at_scale(endpoint_url: str, count: int = 10_000) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    from include.local_aws.world import OUTPUT_BUCKET, SOURCE_BUCKET, boto_client
    from include.vod_sr.plan import BatchRequest, plan_batch

    s3 = boto_client("s3", endpoint_url)
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(lambda n: s3.put_object(Bucket=SOURCE_BUCKET, Key=f"backfill/{n:05}.mp4", Body=b"v"), range(count))
        )
    request = BatchRequest.from_params(
        {
            "prefixes": ["backfill/"],
            "model": "cpu",
            "source_bucket": SOURCE_BUCKET,
            "output_bucket": OUTPUT_BUCKET,
            "instance_ids": ["i-0123456789abcdef0"],
            "chunk_size": 1,
        }
    )
    started = time.perf_counter()
    plan = plan_batch(request, s3, run_token="bench")
    seconds = time.perf_counter() - started
    xcom = xcom_breakdown(plan)
    return {
        "sources": plan.file_count,
        "plan_seconds": round(seconds, 2),
        "chunks": len(plan.chunks),
        "mapped_task_instances_per_task": len({chunk.instance_id for chunk in plan.chunks}),
        "xcom_bytes": xcom["xcom_bytes"],
        "plan_s3_bytes": xcom["s3_put_bytes"],
    }


def parse_overhead(repeats: int = 7) -> dict[str, Any]:
    code = (
        "import time, runpy; t0 = time.perf_counter(); import airflow.sdk; t1 = time.perf_counter();"
        "runpy.run_path('dags/vod_sr_batch.py'); t2 = time.perf_counter(); print(t1 - t0, t2 - t1)"
    )
    samples = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=300
        )
        samples.append([float(x) for x in out.stdout.split()[-2:]])
    return {
        "import_airflow_sdk_seconds": round(statistics.median(s[0] for s in samples), 3),
        "dag_file_over_sdk_seconds": round(statistics.median(s[1] for s in samples), 3),
    }


# --- planning a million sources: the S3 stand-in and the child process -----------------------------------------

STAND_IN_SOURCE_BUCKET = "stand-in-source"
STAND_IN_OUTPUT_BUCKET = "stand-in-output"
STAND_IN_MANIFEST = "manifests/backfill.txt"
STAND_IN_FOLDERS = ("library/2019/masters/", "library/2020/masters/", "library/2021/masters/", "library/2022/masters/")
STAND_IN_INSTANCES = ("i-0aaaaaaaaaaaaaaa1", "i-0aaaaaaaaaaaaaaa2", "i-0aaaaaaaaaaaaaaa3", "i-0aaaaaaaaaaaaaaa4")


class _FolderKeys:
    """The sorted keys of one stand-in folder as a read-only sequence (made on demand: bisect works on it)."""

    def __init__(self, folder: str, count: int) -> None:
        self.folder, self.count = folder, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, n: int) -> str:
        return f"{self.folder}title-{n:07}-master.mp4"  # zero-padded: string order is number order


class S3ListingStandIn:
    """A STAND-IN for the S3 client, in process, for the plan_1m measurement only: `files` synthetic video objects
    spread over a few folders of one bucket, a manifest naming them all, and an empty output bucket.

    It answers what plan_batch calls (get_object for the manifest, the list_objects_v2 paginator with Prefix and
    StartAfter, 1,000 keys a page in S3's order, head_bucket) with listing entries shaped like botocore's (a new dict,
    datetime and strings per object). Keys are made as pages are read, so the stand-in holds nothing but the
    manifest: what is measured is the planner's own CPU and memory, not S3's latency nor botocore's XML parsing
    (1,000 real ListObjectsV2 pages for a million keys add their own time). `seconds` is the time spent making
    pages, to take off the planner's figure."""

    class exceptions:
        class NoSuchBucket(Exception):
            pass

    PAGE_SIZE = 1_000

    def __init__(self, files: int, folders: tuple[str, ...] = STAND_IN_FOLDERS) -> None:
        share, extra = divmod(files, len(folders))
        self.folders = [_FolderKeys(f, share + (n < extra)) for n, f in enumerate(sorted(folders))]
        self.seconds = 0.0
        self.pages = 0
        self.puts = self.put_bytes = 0  # put_object: counted, the bodies discarded
        body = io.BytesIO()
        for keys in self.folders:
            for start in range(0, len(keys), 10_000):  # a batch at a time: no million-string list behind the peak
                body.write("".join(keys[n] + "\n" for n in range(start, min(start + 10_000, len(keys)))).encode())
        self.manifest = body.getvalue()

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        assert (Bucket, Key) == (STAND_IN_SOURCE_BUCKET, STAND_IN_MANIFEST), (Bucket, Key)
        return {"Body": io.BytesIO(self.manifest), "ContentLength": len(self.manifest)}

    def put_object(self, Bucket: str, Key: str, Body: bytes | str, **_: Any) -> dict[str, Any]:
        """Takes the plan task's writes (store_plan, store_verified): counts them and their bytes, keeps nothing."""
        self.puts += 1
        self.put_bytes += len(Body.encode() if isinstance(Body, str) else Body)
        return {"ETag": f'"{self.puts:032x}"'}

    def head_bucket(self, Bucket: str) -> dict[str, Any]:
        if Bucket not in (STAND_IN_SOURCE_BUCKET, STAND_IN_OUTPUT_BUCKET):
            raise self.exceptions.NoSuchBucket(Bucket)
        return {}

    def get_paginator(self, operation: str) -> S3ListingStandIn:
        assert operation == "list_objects_v2", operation
        return self

    def paginate(self, Bucket: str, Prefix: str = "", StartAfter: str = "", **_: Any) -> Iterator[dict[str, Any]]:
        if Bucket == STAND_IN_OUTPUT_BUCKET:  # nothing done yet
            self.pages += 1
            yield {"KeyCount": 0, "IsTruncated": False}
            return
        if Bucket != STAND_IN_SOURCE_BUCKET:
            raise self.exceptions.NoSuchBucket(Bucket)
        page: list[dict[str, Any]] = []
        began = time.perf_counter()
        for keys in self.folders:
            if not (keys.folder.startswith(Prefix) or Prefix.startswith(keys.folder)):
                continue
            n = max(bisect.bisect_left(keys, Prefix), bisect.bisect_right(keys, StartAfter))
            while n < len(keys) and (key := keys[n]).startswith(Prefix):
                page.append(
                    {
                        "Key": key,
                        "LastModified": datetime(2024, 1, 1, 0, 0, n % 60, tzinfo=UTC),
                        "ETag": f'"{n:032x}"',
                        "Size": 50_000_000 + n,
                        "StorageClass": b"STANDARD".decode(),
                    }
                )
                n += 1
                if len(page) == self.PAGE_SIZE:
                    self.seconds += time.perf_counter() - began
                    self.pages += 1
                    yield {"Contents": page, "KeyCount": len(page), "IsTruncated": True}
                    page, began = [], time.perf_counter()
        self.seconds += time.perf_counter() - began
        self.pages += 1
        yield {"Contents": page, "KeyCount": len(page), "IsTruncated": False} if page else {"KeyCount": 0}


def max_rss_mib() -> float:
    """This process's peak resident set so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plan_child(files: int, profile: bool = False) -> dict[str, Any]:
    """Plan `files` sources named by a manifest against the stand-in, in this (fresh) process; the figures."""
    from include.vod_sr.plan import BatchRequest, plan_batch

    rss_imports = max_rss_mib()
    s3 = S3ListingStandIn(files)
    request = BatchRequest.from_params(
        {
            "manifest": STAND_IN_MANIFEST,
            "model": "cpu",
            "source_bucket": STAND_IN_SOURCE_BUCKET,
            "output_bucket": STAND_IN_OUTPUT_BUCKET,
            "instance_ids": list(STAND_IN_INSTANCES),
        }
    )
    rss_before = max_rss_mib()
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    started, cpu_started = time.perf_counter(), time.process_time()
    plan = plan_batch(request, s3, run_token="bench")
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    if profiler is not None:
        import pstats

        profiler.disable()
        for order in ("cumulative", "tottime"):
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(15)
            print(out.getvalue(), file=sys.stderr)
    rss_plan = max_rss_mib()
    started = time.perf_counter()
    xcom = xcom_breakdown(plan)
    xcom_seconds = time.perf_counter() - started
    return {
        "files": plan.file_count,
        "chunks": len(plan.chunks),
        "files_per_chunk": max((len(c.files) for c in plan.chunks), default=0),
        # Not plan.lanes(), which makes every chunk a dict: 450 MiB more at 1M files, in the measured process.
        "lanes": len({chunk.instance_id for chunk in plan.chunks}),
        "manifest_bytes": len(s3.manifest),
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),  # the same work on a busy machine: wall time grows, this does not
        "stand_in_seconds": round(s3.seconds, 2),
        "planner_seconds_without_stand_in": round(seconds - s3.seconds, 2),
        "listing_pages": s3.pages,
        "peak_rss_mib": round(rss_plan, 1),
        "rss_after_imports_mib": round(rss_imports, 1),
        "rss_before_plan_mib": round(rss_before, 1),
        "xcom_bytes": xcom["xcom_bytes"],
        "xcom": xcom,
        "store_plan_seconds": round(xcom_seconds, 2),  # store_plan's writes (to the stand-in) and the XCom values
        "peak_rss_with_xcom_mib": round(max_rss_mib(), 1),
        "profiled": profile,
    }


def run_plan_child(files: int, profile: bool = False) -> dict[str, Any]:
    """plan_child(files) in a fresh Python process: its ru_maxrss is the planning's alone."""
    command = [sys.executable, "-m", "scripts.bench", "--plan-child", str(files), *(["--profile"] if profile else [])]
    try:
        out = subprocess.run(
            command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=PLAN_CHILD_TIMEOUT, start_new_session=True
        )
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"planning {files:,} sources took over {PLAN_CHILD_TIMEOUT} s") from error
    if profile:
        print(out.stderr, flush=True)
    if out.returncode != 0:
        raise RuntimeError(f"planning {files:,} sources failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def botocore_page_parse_seconds(repeats: int = 10) -> float:
    """CPU seconds botocore takes to parse one ListObjectsV2 page of 1,000 keys like the stand-in's (what a real
    client adds per page, before any network time; the stand-in skips it)."""
    import botocore.session
    from botocore.parsers import RestXMLParser

    shape = botocore.session.get_session().get_service_model("s3").operation_model("ListObjectsV2").output_shape
    keys = _FolderKeys(STAND_IN_FOLDERS[0], 1_000)
    contents = "".join(
        f"<Contents><Key>{keys[n]}</Key><LastModified>2024-01-01T00:00:{n % 60:02}.000Z</LastModified>"
        f"<ETag>&quot;{n:032x}&quot;</ETag><Size>{50_000_000 + n}</Size><StorageClass>STANDARD</StorageClass></Contents>"
        for n in range(len(keys))
    )
    body = (
        '<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        f"<Name>{STAND_IN_SOURCE_BUCKET}</Name><KeyCount>1000</KeyCount><MaxKeys>1000</MaxKeys>"
        f"<IsTruncated>true</IsTruncated>{contents}</ListBucketResult>"
    ).encode()
    parser = RestXMLParser()
    started = time.process_time()
    for _ in range(repeats):
        parser.parse({"body": body, "headers": {}, "status_code": 200}, shape)
    return (time.process_time() - started) / repeats


def plan_manifest_scale(profile: bool = False) -> dict[str, Any]:
    by_files = {}
    for files in PLAN_SIZES:
        print(f"    {files:,} sources", flush=True)
        by_files[str(files)] = run_plan_child(files)
    largest = by_files[str(PLAN_SIZES[-1])]
    if profile:
        print(f"    cProfile of planning {PLAN_SIZES[-1]:,} sources (a separate run; profiling slows it)", flush=True)
        run_plan_child(PLAN_SIZES[-1], profile=True)
    per_page = botocore_page_parse_seconds()
    return {
        "source": "manifest (.txt, one key a line) against an in-process S3 stand-in, not the emulator nor S3",
        "note": "the planner's own CPU time and memory; S3's latency and botocore's parsing of the listing pages "
        "are not in them (botocore_* is an estimate of the parsing)",
        "instances": len(STAND_IN_INSTANCES),
        "folders": len(STAND_IN_FOLDERS),
        **largest,
        "botocore_parse_seconds_per_page": round(per_page, 4),
        "botocore_parse_seconds_estimate": round(per_page * largest["listing_pages"], 1),
        "by_files": by_files,
    }


# --- the steps, the results file, the summary ---------------------------------------------------------------------


def target(
    r: dict[str, Any], step: str, figure: str, op: str, limit: float, measured_by: str | None = None
) -> dict[str, Any]:
    """`figure` of `step`'s results beside its target; when it was measured (None: by an older bench), by the
    step `measured_by` when the figure is derived from a step's (default: `step`)."""
    value = dig(r, step, figure)
    state = dig(r, measured_by or step, "state")  # a run's final state; None for the other steps
    met = (
        {"<=": value <= limit, "<": value < limit, ">=": value >= limit, ">": value > limit}[op]
        if isinstance(value, int | float) and state in (None, "success")
        else None
    )
    entry = {
        "value": value,
        "target": f"{op} {limit:g}",
        "met": met,
        "step": step,
        "measured_at": dig(r, "steps", measured_by or step, "at") if value is not None else None,
    }
    if state not in (None, "success"):
        entry["run_state"] = state  # the figure is from a run that did not succeed: not judged
    return entry


def versus_baseline(r: dict[str, Any]) -> dict[str, Any] | None:
    """The 20-file vod-sr runs (chunk size 10 with one stream, chunk size 1 with 1, 2 and 4 streams per GPU, all on
    the one 1-GPU instance) beside the stock operators' all-at-once run of the same 20 files: wall time, instance
    running time and how many SR runs were at work at once (max_concurrent: model runs for vod-sr, commands for
    the baseline). `best` is the vod-sr run with the least wall time; `closest_concurrency` the one whose
    concurrency is nearest the baseline's, for the instance-time comparison. None until both sides are measured."""
    base = r.get("baseline_20_files") or {}
    if not base.get("wall_seconds") or not base.get("instance_running_seconds"):
        return None
    runs = {}
    for step in ("vod_sr_20_files", *STREAM_STEPS):
        run = r.get(step) or {}
        if not run.get("wall_seconds") or not run.get("instance_running_seconds") or run.get("state") != "success":
            continue
        runs[step] = {
            "streams_per_gpu": int(step.rsplit("_", 1)[1]) if step in STREAM_STEPS else 1,
            "chunk_size": dig(run, "conf", "chunk_size") or 10,
            "wall_seconds": run["wall_seconds"],
            "instance_running_seconds": run["instance_running_seconds"],
            "max_concurrent": run.get("max_concurrent_sr_runs") or run.get("max_concurrent_commands"),
            "baseline_wall_over_vod_sr": round(base["wall_seconds"] / run["wall_seconds"], 2),
            "baseline_running_over_vod_sr": round(
                base["instance_running_seconds"] / run["instance_running_seconds"], 2
            ),
        }
    if not runs:
        return None
    best = min(runs, key=lambda step: runs[step]["wall_seconds"])
    base_concurrency = base.get("max_concurrent_commands") or 0
    closest = min(runs, key=lambda step: (abs((runs[step]["max_concurrent"] or 0) - base_concurrency), -len(step)))
    return {
        "baseline": {
            "wall_seconds": base["wall_seconds"],
            "instance_running_seconds": base["instance_running_seconds"],
            "max_concurrent": base_concurrency,
        },
        "runs": runs,
        "best": best,
        "best_wall_ratio": runs[best]["baseline_wall_over_vod_sr"],
        "best_running_ratio": runs[best]["baseline_running_over_vod_sr"],
        "closest_concurrency": closest,
        "closest_concurrency_running_ratio": runs[closest]["baseline_running_over_vod_sr"],
        "closest_concurrency_wall_ratio": runs[closest]["baseline_wall_over_vod_sr"],
        "note": "ratios are baseline / vod-sr: above 1, vod-sr took less",
    }


def idle_per_lane(r: dict[str, Any]) -> dict[str, Any] | None:
    """Each vod-sr run's idle instance time before its first model run and after its last (gpu_figures), and the
    worst of them: a fixed cost per lane, whatever the files. Runs that did not succeed are left out."""
    ok = [s for s in VOD_SR_RUN_STEPS if dig(r, s, "state") == "success"]
    before = {
        s: r[s]["idle_before_first_sr_seconds"] for s in ok if dig(r, s, "idle_before_first_sr_seconds") is not None
    }
    after = {s: r[s]["idle_after_last_sr_seconds"] for s in ok if dig(r, s, "idle_after_last_sr_seconds") is not None}
    if not before and not after:
        return None
    return {
        "before_first_sr_seconds": before,
        "after_last_sr_seconds": after,
        "worst_before": max(before.values()) if before else None,
        "worst_before_step": max(before, key=before.__getitem__) if before else None,
        "worst_after": max(after.values()) if after else None,
        "worst_after_step": max(after, key=after.__getitem__) if after else None,
        "definition": "instance running start -> first model ffmpeg run's start; last model run's end -> the end of "
        "that running interval (the instance stopped), from the emulator's timeline",
    }


def dig(results: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(results, dict) or key not in results:
            return None
        results = results[key]
    return results


def targets(r: dict[str, Any]) -> dict[str, Any]:
    """Each figure with a target, under a name a reader can look up; value None: not measured (yet)."""
    xcom = {files: dig(r, "plan_1m", "by_files", files, "xcom_bytes") for files in map(str, PLAN_SIZES)}
    xcom_measured = all(isinstance(v, int) for v in xcom.values())
    return {
        "busy_ratio_20_files": target(r, "vod_sr_20_files", "busy_ratio", ">=", 0.90),
        "overhead_per_file_seconds_20_files": target(r, "vod_sr_20_files", "overhead_per_file_seconds", "<", 1),
        "api_calls_per_file_without_polls_20_files": target(
            r, "vod_sr_20_files", "calls_per_file_without_polls", "<=", 3
        ),
        "plan_10000_seconds": target(r, "plan_10000", "plan_seconds", "<=", 20),
        "plan_10000_chunks": target(r, "plan_10000", "chunks", "<=", 1024),
        "plan_1m_seconds": target(r, "plan_1m", "seconds", "<=", 60),
        "plan_1m_peak_rss_mib": target(r, "plan_1m", "peak_rss_mib", "<=", 1024),
        "xcom_bytes_per_run": {
            "value": xcom,
            "target": f"< {XCOM_TARGET_BYTES} each",
            "met": all(v < XCOM_TARGET_BYTES for v in xcom.values()) if xcom_measured else None,
            "step": "plan_1m",
            "measured_at": dig(r, "steps", "plan_1m", "at") if any(xcom.values()) else None,
            "note": "files -> bytes a run writes to XCom: lane references + summary + one verify reference per lane "
            "(bench.xcom_breakdown, store_plan against an S3 stand-in)",
        },
        "best_vod_sr_vs_baseline": target(
            r, "vs_baseline_20_files", "best_wall_ratio", ">", 1, dig(r, "vs_baseline_20_files", "best")
        )
        | {"note": "baseline wall / the fastest 20-file vod-sr run's wall (vs_baseline_20_files.best)"},
        "instance_time_vs_baseline_at_closest_concurrency": target(
            r,
            "vs_baseline_20_files",
            "closest_concurrency_running_ratio",
            ">",
            1,
            dig(r, "vs_baseline_20_files", "closest_concurrency"),
        )
        | {"note": "baseline instance running / that of the vod-sr run nearest the baseline's concurrency"},
        "per_slot_busy_ratio": target(r, GPU4_STEP, "per_slot_busy_ratio", ">=", BUSY_RATIO_TARGET)
        | {
            "note": "least busy GPU of the 4: union of its model runs / first model run start -> last end; each model "
            "run paced to model_run_seconds by the emulator (a GPU's fixed speed; the real ffmpeg makes the output); "
            "the emulated agent runs 5 commands at once, as the real one"
        },
        "per_slot_busy_ratio_8_gpus": target(r, GPU8_STEP, "per_slot_busy_ratio", ">=", BUSY_RATIO_TARGET)
        | {"note": "the same on a g6e.48xlarge (8 GPUs), 40 files"},
        "idle_before_first_chunk_seconds": target(
            r, "idle_per_lane", "worst_before", "<=", IDLE_TARGET_SECONDS, dig(r, "idle_per_lane", "worst_before_step")
        )
        | {"note": "worst vod-sr run: instance running -> first model run (idle_per_lane)"},
        "idle_after_last_chunk_seconds": target(
            r, "idle_per_lane", "worst_after", "<=", IDLE_TARGET_SECONDS, dig(r, "idle_per_lane", "worst_after_step")
        )
        | {"note": "worst vod-sr run: last model run's end -> instance stopped (idle_per_lane)"},
        "dag_parse_over_sdk_seconds": target(r, "parse", "dag_file_over_sdk_seconds", "<=", 0.3),
        **night_targets(r),
    }


def night_targets(r: dict[str, Any]) -> dict[str, Any]:
    """The simulated night's calls against the published rate limits: each action's busiest minute (calls / 60)
    against its sustained limit, the busiest S3 prefix's busiest second against S3's per-prefix limit; and the XCom
    bytes each of its runs wrote. Not judged when a run of the night failed; SSM's actions have no published limit."""
    night = r.get(NIGHT_STEP) or {}
    state = night.get("state")
    measured_at = dig(r, "steps", NIGHT_STEP, "at") if night else None

    def entry(value: Any, limit: float | None, note: str) -> dict[str, Any]:
        judged = isinstance(value, int | float) and limit is not None and state == "success"
        figures = {
            "value": value,
            "target": f"< {limit:g}" if limit is not None else "no published limit",
            "met": value < limit if judged else None,
            "step": NIGHT_STEP,
            "measured_at": measured_at,
            "note": note,
        }
        if night and state != "success":
            figures["run_state"] = state
        return figures

    entries = {}
    for key in NIGHT_TARGET_ACTIONS:
        limit = PUBLISHED_LIMITS.get(key)
        value = dig(night, "aws_calls", key, "peak_minute_per_second")
        entries[f"night_{key.replace(':', '_')}_per_second"] = entry(
            value if value is not None or not night else 0.0,
            limit.per_second if limit else None,
            f"busiest minute's calls / 60 ({call_kind(key)}); {limit.source if limit else SSM_NO_PUBLISHED_LIMIT}",
        )
    for kind, limit in S3_PREFIX_LIMITS.items():
        entries[f"night_s3_{kind}s_per_prefix_per_second"] = entry(
            dig(night, "s3_prefix_peaks", kind, "peak_second"),
            limit.per_second,
            f"busiest second of the busiest prefix ({dig(night, 's3_prefix_peaks', kind, 'prefix')}); {limit.source}",
        )
    runs = dig(night, "setup", "runs")
    xcom = dig(night, "metadata_db", "xcom_bytes")
    entries["night_xcom_bytes_per_run"] = entry(
        round(xcom / runs) if isinstance(xcom, int) and runs else None,
        XCOM_TARGET_BYTES,
        "the night's XCom bytes in the metadata DB (pg_column_size) / its runs",
    )
    return entries


class Results:
    """bench-results.json, rewritten after every step. A full run starts it afresh; `--only` merges into it."""

    def __init__(self, path: Path, merge: bool = False) -> None:
        self.path = path
        self.data: dict[str, Any] = {}
        if merge and path.exists():
            with contextlib.suppress(ValueError):
                self.data = json.loads(path.read_text())
        self.data.setdefault("steps", {})
        self.data.setdefault("failed_steps", {})
        self.data["poll_interval_seconds"] = POLL_INTERVAL

    def record(self, step: str, measure: Callable[[], Any]) -> bool:
        """Run `measure` and write its figures (or its error) into the file at once; whether it succeeded."""
        print(f"==> {step}", flush=True)
        started = time.monotonic()
        try:
            figures = measure()
        except Exception as error:
            traceback.print_exc()
            self.fail(step, f"{type(error).__name__}: {error}", time.monotonic() - started)
            return False
        self.data[step] = figures
        self.data["steps"][step] = {"status": "ok", "seconds": round(time.monotonic() - started, 1), "at": now()}
        self.data["failed_steps"].pop(step, None)
        self.write()
        return True

    def fail(self, step: str, error: str, seconds: float = 0.0) -> None:
        print(f"==> {step} FAILED: {error.splitlines()[0] if error else ''}", flush=True)
        self.data.pop(step, None)  # no figures from another run left beside a failure
        self.data["steps"][step] = {"status": "failed", "seconds": round(seconds, 1), "at": now()}
        self.data["failed_steps"][step] = error[-4000:]
        self.write()

    def write(self) -> None:
        data = self.data
        done = all(dig(data, "steps", step, "status") == "ok" for step in STEPS)
        data["status"] = "complete" if done and not data["failed_steps"] else "partial"
        ours, base = data.get("vod_sr_20_files") or {}, data.get("baseline_20_files") or {}
        ratios = {
            "wall_time": "wall_seconds",
            "instance_running_time": "instance_running_seconds",
            "api_calls": "calls_total",
        }
        if all(ours.get(key) and base.get(key) is not None for key in ratios.values()):
            data["baseline_over_vod_sr"] = {name: round(base[key] / ours[key], 2) for name, key in ratios.items()}
        else:
            data.pop("baseline_over_vod_sr", None)
        for name, derive in (("vs_baseline_20_files", versus_baseline), ("idle_per_lane", idle_per_lane)):
            derived = derive(data)
            if derived is None:
                data.pop(name, None)
            else:
                data[name] = derived
        data["targets"] = targets(data)
        ordered = {k: data[k] for k in ("status", "failed_steps", "targets", "steps") if k in data}
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps({**ordered, **data}, indent=2) + "\n")
        os.replace(temporary, self.path)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run_steps(
    results: Results, selected: list[str], work: Path, profile: bool = False, slot_chunk_size: int = SLOT_CHUNK_SIZE
) -> None:
    """The selected steps, in order; each failure is recorded and the rest go on. Everything started here is stopped
    before this returns or raises (the emulator, PostgreSQL, every Airflow component)."""
    if "parse" in selected:
        results.record("parse", parse_overhead)
    if "plan_1m" in selected:
        results.record("plan_1m", lambda: plan_manifest_scale(profile))
    emulator_steps = [s for s in EMULATOR_STEPS if s in selected]
    if emulator_steps:
        run_emulator_steps(results, selected, emulator_steps, work, slot_chunk_size)
    if NIGHT_STEP in selected:
        results.record(NIGHT_STEP, lambda: run_night(work / "night"))


def run_emulator_steps(
    results: Results, selected: list[str], emulator_steps: list[str], work: Path, slot_chunk_size: int
) -> None:
    """The steps on the shared emulator (its own process, real ffmpeg): the Airflow runs, then plan_10000."""
    from include.local_aws.world import (
        OUTPUT_BUCKET,
        SOURCE_BUCKET,
        EmulatorProcess,
        boto_client,
        create_world,
        make_sample_clip,
    )

    with contextlib.ExitStack() as cleanup:
        emulator = EmulatorProcess(work / "emulator")
        cleanup.callback(emulator.stop)
        try:
            print("==> Starting the emulator", flush=True)
            emulator.start()
            vod_instance, baseline_instance = create_world(emulator.endpoint_url), create_world(emulator.endpoint_url)
            keys = [f"bench/clip-{n:02}.mp4" for n in range(40)]
            long_keys = [f"bench-30s/clip-{n:02}.mp4" for n in range(20)]
            if any(s in RUN_STEPS for s in selected):
                clip = make_sample_clip(work / "clip.mp4")
                long_clip = make_sample_clip(work / "clip-30s.mp4", seconds=30)
                s3 = boto_client("s3", emulator.endpoint_url)
                for key in keys:
                    s3.upload_file(str(clip), SOURCE_BUCKET, key)
                for key in long_keys:
                    s3.upload_file(str(long_clip), SOURCE_BUCKET, key)
        except Exception as error:
            traceback.print_exc()
            for step in emulator_steps:
                results.fail(step, f"the emulator could not be set up: {type(error).__name__}: {error}")
            return

        run_steps_selected = [s for s in RUN_STEPS if s in selected]
        if run_steps_selected:
            with contextlib.ExitStack() as airflow:
                try:
                    stack = start_stack(airflow, work, emulator.endpoint_url, vod_instance)
                except Exception as error:
                    traceback.print_exc()
                    for step in run_steps_selected:
                        results.fail(step, f"Airflow could not be started: {type(error).__name__}: {error}")
                    stack = None
                if stack is not None:

                    def vod_sr(dag_id: str, batch: list[str], instance: str, **extra: Any) -> Callable[[], Any]:
                        conf = {
                            "sources": batch,
                            "model": "cpu",
                            "overwrite": True,
                            "instance_ids": [instance],
                            **extra,
                        }
                        return partial(measure_run, stack, emulator, instance, dag_id, conf, len(batch))

                    def on_gpus(instance_type: str) -> Callable[[], dict[str, Any]]:
                        def measure() -> dict[str, Any]:
                            instance = create_instance(emulator.endpoint_url, instance_type)
                            # Four model runs at once would starve this machine's 2 cores (and the orchestration
                            # with them): each GPU runs at a fixed pace instead, the real ffmpeg still making the
                            # outputs.
                            pace = {"model_run_seconds": GPU4_MODEL_RUN_SECONDS}
                            emulator.set_faults({"instances": {instance: pace}})
                            return vod_sr("vod_sr_batch", keys, instance, chunk_size=slot_chunk_size)() | {
                                "instance_type": instance_type,
                                "model_run_seconds": GPU4_MODEL_RUN_SECONDS,
                            }

                        return measure

                    baseline_conf = {
                        "sources": keys[:20],
                        "source_bucket": SOURCE_BUCKET,
                        "output_bucket": OUTPUT_BUCKET,
                        "instance_id": baseline_instance,
                    }
                    measures: dict[str, Callable[[], Any]] = {
                        "vod_sr_20_files": vod_sr("vod_sr_batch", keys[:20], vod_instance),
                        "baseline_20_files": partial(
                            measure_run,
                            stack,
                            emulator,
                            baseline_instance,
                            "baseline_stock_operators",
                            baseline_conf,
                            20,
                        ),
                        **{
                            step: vod_sr(streams_dag_id(n), keys[:20], vod_instance, chunk_size=slot_chunk_size)
                            for n, step in zip(STREAMS, STREAM_STEPS, strict=True)
                        },
                        GPU4_STEP: on_gpus(GPU4_INSTANCE_TYPE),
                        GPU8_STEP: on_gpus(GPU8_INSTANCE_TYPE),
                        "vod_sr_40_files": vod_sr("vod_sr_batch", keys, vod_instance),
                        "vod_sr_20_files_30s": vod_sr("vod_sr_batch", long_keys, vod_instance),
                    }
                    for name in run_steps_selected:
                        if name == "baseline_20_files":
                            print("    stock intervals: 15 s EC2 checks, 120 s SSM pokes", flush=True)
                        results.record(name, measures[name])
        if "plan_10000" in selected:  # after Airflow is stopped: the machine is quiet again
            results.record("plan_10000", lambda: plan_at_scale(emulator.endpoint_url))


def create_instance(endpoint_url: str, instance_type: str) -> str:
    """A stopped emulated instance of `instance_type` (as create_world makes its g6e.xlarge); its id."""
    from include.local_aws.world import launch_stopped_instance

    return launch_stopped_instance(endpoint_url, instance_type)


BENCH_DAG_FILES = {
    "vod_sr_batch.py": REPO_ROOT / "dags" / "vod_sr_batch.py",
    "baseline_stock_operators.py": REPO_ROOT / "benchmarks" / "baseline_stock_operators.py",
    "vod_sr_streams.py": REPO_ROOT / "benchmarks" / "vod_sr_streams.py",
}


def start_stack(
    cleanup: contextlib.ExitStack,
    work: Path,
    endpoint_url: str,
    instance_id: str,
    *,
    poll_interval: int = POLL_INTERVAL,
    parallelism: int = 32,
    extra_env: dict[str, str] | None = None,
    dag_files: tuple[str, ...] = tuple(BENCH_DAG_FILES),
    dag_ids: tuple[str, ...] = ("vod_sr_batch", "baseline_stock_operators", *map(streams_dag_id, STREAMS)),
    postgres: Any = None,
) -> AirflowStack:
    """Airflow on a throwaway PostgreSQL (`postgres`, else one of its own), both stopped by `cleanup`. PostgreSQL,
    not SQLite: the baseline's 20 concurrent task processes had SQLite's scheduler die with "database is locked". One
    machine, so the LocalExecutor; the full-stack tests cover Celery."""
    from include.local_aws.airflow_stack import AirflowStack, Backend
    from include.local_aws.services import PostgresServer
    from include.local_aws.world import airflow_env

    if postgres is None:
        postgres = PostgresServer()
        cleanup.callback(postgres.stop)
        postgres.start()
    dags = work / "dags"
    dags.mkdir(parents=True, exist_ok=True)
    for name in dag_files:
        if not (dags / name).exists():
            (dags / name).symlink_to(BENCH_DAG_FILES[name])
    env = {**os.environ, **airflow_env(endpoint_url, instance_id, poll_interval=poll_interval), **(extra_env or {})}
    print("==> Starting Airflow on PostgreSQL (API server, scheduler, dag-processor, triggerer)", flush=True)
    backend = Backend(database_url=postgres.url(postgres.create_database()))
    stack = AirflowStack(work / "airflow", env, dags_folder=dags, parallelism=parallelism, backend=backend)
    cleanup.callback(stack.stop)
    stack.start(dag_ids=dag_ids)
    return stack


# --- the simulated night (issue 12) ----------------------------------------------------------------------------------
#
# 100 g6e.12xlarge (4 GPUs each) and 100,000 files, with the emulator's synthetic SR stand-in in place of ffmpeg
# (include/local_aws/synthetic_sr.py): NIGHT_SR_SECONDS of model time per file instead of an assumed
# NIGHT_REAL_SR_SECONDS, so the night is compressed K = NIGHT_REAL_SR_SECONDS / NIGHT_SR_SECONDS times. What is measured
# is the orchestration: AWS calls by action against the published rate limits, the metadata DB's rows, the CPU of the
# Airflow components. Calls made per file or per chunk come K times as often as in a real night; calls made per poll
# (every VOD_SR_POLL_INTERVAL, the production default here) or per lane do not.

NIGHT_INSTANCE_TYPE = "g6e.12xlarge"  # 4 GPUs
NIGHT_INSTANCES = 100
NIGHT_INSTANCES_PER_RUN = 50  # vod-sr caps a run at SendCommand's 50 targets: the night is two runs side by side
NIGHT_FILES = 100_000
NIGHT_CHUNK_SIZE = 125  # 1,000 files per instance in 8 chunks: two rounds of its 4 slots
NIGHT_SR_SECONDS = 1.0  # the stand-in's model seconds per file
NIGHT_REAL_SR_SECONDS = 100.0  # ASSUMED real model seconds per file on one L40S (docs/scale.md: never measured here)
NIGHT_COMPRESSION = NIGHT_REAL_SR_SECONDS / NIGHT_SR_SECONDS
NIGHT_JITTER = 0.2  # each file's model time: NIGHT_SR_SECONDS x (1 +/- this), uniformly
NIGHT_POLL_INTERVAL = 15  # VOD_SR_POLL_INTERVAL: the production default, so polls are measured at their real rate
NIGHT_PARALLELISM = 32  # [core] parallelism: the LocalExecutor's worker processes
NIGHT_MAX_ACTIVE_TASKS = 64  # [core] max_active_tasks_per_dag (per run; default 16): a run's 50 lanes start together
NIGHT_RUN_TIMEOUT = 3600
NIGHT_SAMPLE_SECONDS = 15
NIGHT_SOURCE_BYTES = 100

EC2_THROTTLING = "https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-throttling.html"
S3_PERFORMANCE = "https://docs.aws.amazon.com/AmazonS3/latest/userguide/optimizing-performance.html"
SSM_NO_PUBLISHED_LIMIT = (
    "no published default rate for Run Command's API actions: SSM answers ThrottlingException 'Rate exceeded' "
    "(AWS_NOTES.md); ask AWS for the account's figure before a real night"
)


@dataclass(frozen=True)
class RateLimit:
    """A published request rate limit: the token bucket's refill rate (sustained requests a second) and its size
    (the burst; None where none is published)."""

    per_second: float
    burst: int | None
    source: str


PUBLISHED_LIMITS = {  # per account and region
    "ec2:DescribeInstances": RateLimit(
        10,
        50,
        f"EC2, unfiltered and unpaginated non-mutating actions (DescribeInstances by id; 20/s, bucket 100, when "
        f"filtered or paginated): {EC2_THROTTLING}",
    ),
    "ec2:DescribeTags": RateLimit(20, 100, f"EC2, non-mutating actions: {EC2_THROTTLING}"),
    "ec2:CreateTags": RateLimit(10, 100, f"EC2, CreateTags' own bucket: {EC2_THROTTLING}"),
    "ec2:DeleteTags": RateLimit(10, 100, f"EC2, DeleteTags' own bucket: {EC2_THROTTLING}"),
    "ec2:StartInstances": RateLimit(
        2, 5, f"EC2, StartInstances' own bucket (and a resource bucket of 1,000 instances, 2/s): {EC2_THROTTLING}"
    ),
    "ec2:StopInstances": RateLimit(
        5, 50, f"EC2, mutating actions (and a resource bucket of 1,000 instances, 20/s): {EC2_THROTTLING}"
    ),
}
S3_PREFIX_LIMITS = {
    "read": RateLimit(5500, None, f"S3, GET/HEAD per partitioned prefix: {S3_PERFORMANCE}"),
    "write": RateLimit(3500, None, f"S3, PUT/COPY/POST/DELETE per partitioned prefix: {S3_PERFORMANCE}"),
}
NIGHT_TARGET_ACTIONS = (*PUBLISHED_LIMITS, "ssm:SendCommand", "ssm:GetCommandInvocation")


def call_key(call: dict[str, Any]) -> str:
    """A call's action as the night counts it: `service:Action`, for S3 also who made it (`s3:GET object:instance`)."""
    if call["service"] == "s3":
        return f"s3:{call['action']}:{call.get('caller', 'orchestrator')}"
    return f"{call['service']}:{call['action']}"


def call_kind(key: str) -> str:
    """How often an action comes in the compressed night against a real one: "per file (x K)" and "per chunk (x K)"
    come K times as often (the files take K times less); "per poll" and "per lane" come as often as in a real night."""
    if key.startswith("s3:") and key.endswith(":instance"):
        return "per file (x K)"
    if key in ("ssm:SendCommand", "s3:PUT object:orchestrator", "ec2:CreateTags"):
        return "per chunk (x K)"  # chunk file lists; the lease refreshed as run_chunks resumes at chunk ends
    if key in ("ssm:GetCommandInvocation", "s3:GET object:orchestrator"):
        return "per poll"  # the trigger's status reads and progress reads of the results objects
    return "per lane"


def calls_per_minute(calls: Iterable[dict[str, Any]], started: float, ended: float) -> dict[str, dict[str, Any]]:
    """Per action (`call_key`), of the calls between `started` and `ended` (epoch seconds): the total, the mean per
    minute over that time, the busiest minute (fixed 60 s windows from `started`; `peak_minute_at`: its start, in
    seconds from `started`) and the busiest second. Busiest first."""
    minutes: dict[str, Counter[int]] = defaultdict(Counter)
    seconds: dict[str, Counter[int]] = defaultdict(Counter)
    for call in calls:
        offset = call["time"] - started
        if not 0 <= offset <= ended - started:
            continue
        key = call_key(call)
        minutes[key][int(offset // 60)] += 1
        seconds[key][int(offset)] += 1
    span_minutes = max(ended - started, 1.0) / 60
    figures = {}
    for key, by_minute in minutes.items():
        total = sum(by_minute.values())
        peak_at, peak = max(by_minute.items(), key=lambda item: (item[1], -item[0]))
        figures[key] = {
            "total": total,
            "mean_per_minute": round(total / span_minutes, 1),
            "peak_minute": peak,
            "peak_minute_at": peak_at * 60,
            "peak_second": max(seconds[key].values()),
        }
    return dict(sorted(figures.items(), key=lambda item: (-item[1]["total"], item[0])))


def s3_class(action: str) -> str | None:
    """ "read" (GET, HEAD) or "write" (PUT, POST, DELETE) for an S3 object request, else None (bucket requests)."""
    method, _, kind = action.partition(" ")
    if kind != "object":
        return None
    return "read" if method in ("GET", "HEAD") else "write" if method in ("PUT", "POST", "DELETE") else None


def s3_prefix_peaks(calls: Iterable[dict[str, Any]], started: float, ended: float) -> dict[str, dict[str, Any]]:
    """The busiest S3 prefix for reads and for writes: S3's request rate limits are per partitioned prefix, taken here
    as the key's folder (`bucket/folder/`), the narrowest S3 may partition by. Its busiest second and minute."""
    minutes: dict[tuple[str, str], Counter[int]] = defaultdict(Counter)
    seconds: dict[tuple[str, str], Counter[int]] = defaultdict(Counter)
    for call in calls:
        offset = call["time"] - started
        kind = s3_class(call["action"]) if call["service"] == "s3" else None
        if kind is None or not 0 <= offset <= ended - started:
            continue
        folder = call.get("key", "").rpartition("/")[0]
        prefix = f"{call.get('bucket', '')}/{folder}/" if folder else f"{call.get('bucket', '')}/"
        minutes[(kind, prefix)][int(offset // 60)] += 1
        seconds[(kind, prefix)][int(offset)] += 1
    peaks = {}
    for kind in ("read", "write"):
        candidates = [(max(c.values()), prefix) for (k, prefix), c in minutes.items() if k == kind]
        if not candidates:
            continue
        peak_minute, prefix = max(candidates)
        limit = S3_PREFIX_LIMITS[kind]
        peak_second = max(seconds[(kind, prefix)].values())
        peaks[kind] = {
            "prefix": prefix,
            "peak_minute": peak_minute,
            "peak_minute_per_second": round(peak_minute / 60, 2),
            "peak_second": peak_second,
            "limit_per_second": limit.per_second,
            "ratio_peak_second": round(peak_second / limit.per_second, 4),
            "limit_source": limit.source,
            "prefixes": sum(1 for k, _ in minutes if k == kind),
        }
    return peaks


def against_limits(per_minute: dict[str, dict[str, Any]], compression: float) -> dict[str, dict[str, Any]]:
    """`calls_per_minute`'s figures with how they compare to a real night (`call_kind`) and to the published limit:
    the busiest minute's rate over the sustained limit (`ratio_peak_minute`), the busiest second over the burst."""
    rates = {}
    for key, figures in per_minute.items():
        kind = call_kind(key)
        peak = figures["peak_minute"] / 60
        entry: dict[str, Any] = {**figures, "kind": kind, "peak_minute_per_second": round(peak, 2)}
        if kind.endswith("(x K)"):
            entry["real_night_peak_per_second"] = round(peak / compression, 3)  # estimate: the same work, K x slower
        limit = PUBLISHED_LIMITS.get(key)
        if limit is not None:
            entry.update(
                limit_per_second=limit.per_second,
                burst=limit.burst,
                ratio_peak_minute=round(peak / limit.per_second, 3),
                ratio_peak_second_to_burst=round(figures["peak_second"] / limit.burst, 2) if limit.burst else None,
                limit_source=limit.source,
            )
        elif key.startswith("ssm:"):
            entry["limit"] = SSM_NO_PUBLISHED_LIMIT
        rates[key] = entry
    return rates


def spread(values: list[float]) -> dict[str, float | None]:
    """min, 10th percentile, median, mean and max, rounded; None each when there are no values."""
    if not values:
        return dict.fromkeys(("min", "p10", "median", "mean", "max"))
    ordered = sorted(values)
    return {
        "min": round(ordered[0], 3),
        "p10": round(ordered[int(0.1 * (len(ordered) - 1))], 3),
        "median": round(statistics.median(ordered), 3),
        "mean": round(statistics.mean(ordered), 3),
        "max": round(ordered[-1], 3),
    }


def night_gpu_figures(
    timelines: dict[str, Any], instances: list[str], started: float, ended: float, compression: float = 1.0
) -> dict[str, Any]:
    """Every GPU of every instance over the night: busy seconds (the union of its model runs) over the night's SR
    window (first model run's start to the last one's end, on any instance) and over its instance's running time; per
    lane, `gpu_figures` (idle before the first model run and after the last).

    `busy_ratio_in_night_window_real_night`: the same GPUs with their model time `compression` times longer and the
    rest of the window (orchestration: starts, gaps, ends) as long as measured, K.b / (K.b + W - b): an estimate of
    the busy ratio of a real night, whose model time the compression shrank but whose orchestration it did not."""
    lanes = {i: gpu_figures(timelines.get(i) or {}, started, ended) for i in instances}
    runs = [
        (s, e)
        for i in instances
        for gpu_runs in ((timelines.get(i) or {}).get("gpu_busy") or {}).values()
        for s, e in gpu_runs
        if s >= started
    ]
    if not runs:
        return {"gpus": 0, "sr_runs": 0}
    first, last = min(s for s, _ in runs), max(e for _, e in runs)
    over_window, over_running, real_night = [], [], []
    for instance_id in instances:
        timeline = timelines.get(instance_id) or {}
        running = union_seconds(
            [(s, e if e is not None else ended) for s, e in timeline.get("running", []) if s >= started]
        )
        busy = timeline.get("gpu_busy") or {}
        for gpu in range(int(timeline.get("gpus") or 0)):
            seconds = union_seconds([(s, e) for s, e in busy.get(str(gpu), []) if s >= started])
            over_window.append(seconds / (last - first) if last > first else 0.0)
            stretched = compression * seconds
            real_night.append(stretched / (stretched + (last - first) - seconds) if stretched else 0.0)
            if running:
                over_running.append(seconds / running)
    lane_figures = list(lanes.values())
    return {
        "gpus": len(over_window),
        "sr_runs": len(runs),
        "sr_window_seconds": round(last - first, 1),
        "model_seconds": round(sum(e - s for s, e in runs), 1),
        "busy_ratio_in_night_window": spread(over_window),
        "busy_ratio_in_night_window_real_night": spread(real_night),
        "busy_ratio_of_running": spread(over_running),
        "per_lane_busy_ratio_mean": spread(
            [f["per_slot_busy_ratio_mean"] for f in lane_figures if f.get("per_slot_busy_ratio_mean") is not None]
        ),
        "idle_before_first_sr_seconds": spread(
            [
                f["idle_before_first_sr_seconds"]
                for f in lane_figures
                if f.get("idle_before_first_sr_seconds") is not None
            ]
        ),
        "idle_after_last_sr_seconds": spread(
            [f["idle_after_last_sr_seconds"] for f in lane_figures if f.get("idle_after_last_sr_seconds") is not None]
        ),
        "max_concurrent_sr_runs": max_overlap(runs),
    }


def tree_cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) of process `pid` itself, and of its descendants: the live ones and those reaped."""
    import psutil

    try:
        process = psutil.Process(pid)
        times = process.cpu_times()
        descendants = process.children(recursive=True)
    except psutil.Error:
        return 0.0, 0.0
    below = times.children_user + times.children_system
    for child in descendants:
        try:
            child_times = child.cpu_times()
        except psutil.Error:
            continue
        below += child_times.user + child_times.system + child_times.children_user + child_times.children_system
    return times.user + times.system, below


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy so far (all cores; idle and iowait left out)."""
    import psutil

    times = psutil.cpu_times()
    return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))


class NightSampler:
    """Every `interval` seconds while the night runs: task instances by state, live trigger rows, and CPU seconds so
    far of each process tree (`pids`: name -> pid). `peaks()` gives the most of each state and of trigger rows."""

    def __init__(self, dsn: str, pids: dict[str, int], interval: float = NIGHT_SAMPLE_SECONDS) -> None:
        import threading

        self.dsn, self.pids, self.interval = dsn, pids, interval
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="night-sampler", daemon=True)

    def start(self) -> NightSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        import psycopg2

        connection = None
        while not self._stop.is_set():
            sample: dict[str, Any] = {
                "time": time.time(),
                "cpu": {n: sum(tree_cpu_seconds(p)) for n, p in self.pids.items()},
            }
            try:
                if connection is None:
                    connection = psycopg2.connect(self.dsn)
                    connection.autocommit = True
                with connection.cursor() as cursor:
                    cursor.execute("SELECT state, count(*) FROM task_instance GROUP BY state")
                    sample["task_instances"] = {str(state): count for state, count in cursor.fetchall()}
                    cursor.execute("SELECT count(*) FROM trigger")
                    sample["triggers"] = cursor.fetchone()[0]
            except Exception as error:  # a sample missed is not a night lost
                sample["error"] = repr(error)
                connection = None
            self.samples.append(sample)
            self._stop.wait(self.interval)
        if connection is not None:
            connection.close()

    def peaks(self) -> dict[str, Any]:
        states = ("running", "queued", "scheduled", "deferred", "up_for_reschedule")
        return {
            **{
                f"{state}_task_instances": max(
                    (s.get("task_instances", {}).get(state, 0) for s in self.samples), default=0
                )
                for state in states
            },
            "trigger_rows": max((s.get("triggers", 0) for s in self.samples), default=0),
            "samples": len(self.samples),
            "interval_seconds": self.interval,
        }

    def busiest_cpu(self) -> dict[str, float]:
        """Per process tree, its busiest interval between two samples: CPU seconds per wall second (1.0 = one core)."""
        busiest: dict[str, float] = {}
        for before, after in zip(self.samples, self.samples[1:], strict=False):
            wall = after["time"] - before["time"]
            for name, seconds in after["cpu"].items():
                rate = (seconds - before["cpu"].get(name, 0.0)) / wall if wall > 0 else 0.0
                busiest[name] = round(max(busiest.get(name, 0.0), rate), 2)
        return busiest


def night_db_figures(dsn: str) -> dict[str, Any]:
    """What the night left in the metadata database (a fresh one: only the night's runs are in it)."""
    import psycopg2

    connection = psycopg2.connect(dsn)
    try:
        with connection.cursor() as cursor:

            def one(sql: str) -> Any:
                cursor.execute(sql)
                return cursor.fetchone()[0]

            def rows(sql: str) -> list[tuple[Any, ...]]:
                cursor.execute(sql)
                return cursor.fetchall()

            sequence = one("SELECT pg_get_serial_sequence('trigger', 'id')")
            triggers_created = (
                one(f"SELECT last_value FROM {sequence}") if sequence else one("SELECT max(id) FROM trigger")
            )
            xcom_rows, xcom_bytes = rows("SELECT count(*), coalesce(sum(pg_column_size(value)), 0) FROM xcom")[0]
            return {
                "dag_runs": dict(rows("SELECT state, count(*) FROM dag_run GROUP BY state")),
                "task_instances": one("SELECT count(*) FROM task_instance"),
                "task_instances_by_task": dict(
                    rows("SELECT task_id, count(*) FROM task_instance GROUP BY task_id ORDER BY 1")
                ),
                "task_instances_by_state": dict(rows("SELECT state, count(*) FROM task_instance GROUP BY state")),
                "task_instance_tries": one("SELECT coalesce(sum(try_number), 0) FROM task_instance"),
                "task_instance_history_rows": one("SELECT count(*) FROM task_instance_history"),
                "task_reschedule_rows": one("SELECT count(*) FROM task_reschedule"),
                "triggers_created": triggers_created,
                "trigger_rows_left": one("SELECT count(*) FROM trigger"),
                "xcom_rows": xcom_rows,
                "xcom_bytes": xcom_bytes,
                "xcom_bytes_by_key": dict(
                    rows("SELECT key, coalesce(sum(pg_column_size(value)), 0) FROM xcom GROUP BY key ORDER BY 2 DESC")
                ),
                "log_rows": one("SELECT count(*) FROM log"),
                "job_rows": dict(rows("SELECT job_type, count(*) FROM job GROUP BY job_type")),
                "report_counts": [
                    value
                    for (value,) in rows("SELECT value FROM xcom WHERE task_id = 'report' AND key = 'return_value'")
                ],
            }
    finally:
        connection.close()


def create_stopped_instances(endpoint_url: str, instance_type: str, count: int) -> list[str]:
    """`count` stopped instances of `instance_type` from the Bluewhale AMI, as create_instance makes one (launched,
    running, stopped), in one RunInstances."""
    from include.local_aws.world import BLUEWHALE_AMI, boto_client

    ec2 = boto_client("ec2", endpoint_url)
    launched = ec2.run_instances(ImageId=BLUEWHALE_AMI, MinCount=count, MaxCount=count, InstanceType=instance_type)
    instance_ids = [instance["InstanceId"] for instance in launched["Instances"]]
    waiter_config = {"Delay": 1, "MaxAttempts": 120}
    ec2.get_waiter("instance_running").wait(InstanceIds=instance_ids, WaiterConfig=waiter_config)
    ec2.stop_instances(InstanceIds=instance_ids)
    ec2.get_waiter("instance_stopped").wait(InstanceIds=instance_ids, WaiterConfig=waiter_config)
    return instance_ids


def night_manifest(run: int, lanes: int, files_per_lane: int, chunk_size: int) -> list[str]:
    """The keys of run `run`'s manifest, chunk by chunk: the planner deals chunk n to the run's instance n % lanes, so
    chunk n takes its files from folder `night/run-<run>/lane-<n % lanes>/` and each instance's files share a folder
    (its verify lists one folder; see the note on flat layouts in the results). Whole chunks only: the planner cuts
    the manifest every `chunk_size` files, so a lane's last, shorter chunk would shift every chunk after it."""
    if files_per_lane % chunk_size:
        raise ValueError(f"{files_per_lane} files per lane is not a whole number of chunks of {chunk_size}")
    keys = []
    for chunk in range(lanes * files_per_lane // chunk_size):
        lane, first = chunk % lanes, chunk // lanes * chunk_size
        keys += [f"night/run-{run}/lane-{lane:02d}/clip-{n:06d}.mp4" for n in range(first, first + chunk_size)]
    return keys


def run_night(work: Path) -> dict[str, Any]:
    """The simulated night (see above): its own emulator with the stand-in, its own PostgreSQL and Airflow."""
    import urllib.request

    from include.local_aws.services import PostgresServer
    from include.local_aws.world import OUTPUT_BUCKET, SOURCE_BUCKET, EmulatorProcess, boto_client

    runs = NIGHT_INSTANCES // NIGHT_INSTANCES_PER_RUN
    files_per_lane = NIGHT_FILES // NIGHT_INSTANCES
    with contextlib.ExitStack() as cleanup:
        emulator = EmulatorProcess(
            work / "emulator",
            "--synthetic-sr-seconds",
            str(NIGHT_SR_SECONDS),
            "--synthetic-sr-jitter",
            str(NIGHT_JITTER),
        )
        cleanup.callback(emulator.stop)
        print("==> night: the emulator with the synthetic SR stand-in", flush=True)
        emulator.start()
        url = emulator.endpoint_url
        s3 = boto_client("s3", url)
        for bucket in (SOURCE_BUCKET, OUTPUT_BUCKET):
            s3.create_bucket(Bucket=bucket)
        print(f"==> night: {NIGHT_INSTANCES} stopped {NIGHT_INSTANCE_TYPE}, {NIGHT_FILES:,} sources", flush=True)
        instances = create_stopped_instances(url, NIGHT_INSTANCE_TYPE, NIGHT_INSTANCES)
        setup_started = time.monotonic()
        for run in range(runs):
            for lane in range(NIGHT_INSTANCES_PER_RUN):
                body = json.dumps(
                    {
                        "bucket": SOURCE_BUCKET,
                        "prefix": f"night/run-{run}/lane-{lane:02d}/clip-",
                        "count": files_per_lane,
                        "bytes": NIGHT_SOURCE_BYTES,
                    }
                ).encode()
                request = urllib.request.Request(f"{url}/_local_aws/s3/bulk-objects", data=body, method="POST")
                with urllib.request.urlopen(request, timeout=120) as response:
                    assert json.load(response)["created"] == files_per_lane
            manifest = night_manifest(run, NIGHT_INSTANCES_PER_RUN, files_per_lane, NIGHT_CHUNK_SIZE)
            s3.put_object(Bucket=SOURCE_BUCKET, Key=f"manifests/night-run-{run}.txt", Body="\n".join(manifest).encode())
        sources_seconds = time.monotonic() - setup_started

        postgres = PostgresServer()
        cleanup.callback(postgres.stop)
        postgres.start()
        extra_env = {
            "VOD_SR_MAX_ACTIVE_RUNS": str(runs),  # disjoint instance lists: safe (README)
            "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(NIGHT_MAX_ACTIVE_TASKS),
        }
        stack = start_stack(
            cleanup,
            work,
            url,
            instances[0],
            poll_interval=NIGHT_POLL_INTERVAL,
            parallelism=NIGHT_PARALLELISM,
            extra_env=extra_env,
            dag_files=("vod_sr_batch.py",),
            dag_ids=("vod_sr_batch",),
            postgres=postgres,
        )
        dsn = stack.backend.database_url.replace("postgresql+psycopg2://", "postgresql://")
        pids = {c.name: c.process.pid for c in stack.components}
        pids |= {"emulator": emulator.process.pid, "postgres": postgres.process.pid}
        cpu_before = {name: tree_cpu_seconds(pid) for name, pid in pids.items()}
        machine_before, wall_before = machine_busy_seconds(), time.monotonic()
        emulator.reset_calls()
        sampler = NightSampler(dsn, pids).start()
        cleanup.callback(sampler.stop)
        print(f"==> night: {runs} vod_sr_batch runs of {NIGHT_INSTANCES_PER_RUN} instances", flush=True)
        run_ids = []
        for run in range(runs):
            conf = {
                "manifest": f"manifests/night-run-{run}.txt",
                "model": "cpu",
                "instance_ids": instances[run * NIGHT_INSTANCES_PER_RUN : (run + 1) * NIGHT_INSTANCES_PER_RUN],
                "chunk_size": NIGHT_CHUNK_SIZE,
            }
            run_ids.append(stack.trigger(conf))
        deadline = time.monotonic() + NIGHT_RUN_TIMEOUT
        states: dict[str, str] = {}
        while len(states) < len(run_ids):
            for run_id in run_ids:
                if run_id not in states and (state := stack.run_state(run_id)) in ("success", "failed"):
                    states[run_id] = state
                    print(f"    {run_id}: {state} after {time.monotonic() - wall_before:.0f} s", flush=True)
            if time.monotonic() > deadline:
                for run_id in set(run_ids) - set(states):
                    with contextlib.suppress(Exception):
                        stack.api("PATCH", f"/dags/vod_sr_batch/dagRuns/{run_id}", {"state": "failed"})
                raise RuntimeError(f"the night's runs did not end within {NIGHT_RUN_TIMEOUT} s: {states}")
            time.sleep(5)
        wall = time.monotonic() - wall_before
        machine = machine_busy_seconds() - machine_before
        cpu_after = {name: tree_cpu_seconds(pid) for name, pid in pids.items()}
        sampler.stop()
        dag_runs = [stack.run(run_id) for run_id in run_ids]
        started = min(parse_time(r["start_date"]) for r in dag_runs)
        ended = max(parse_time(r["end_date"]) for r in dag_runs)
        print("==> night: measuring", flush=True)
        with urllib.request.urlopen(f"{url}/_local_aws/calls", timeout=600) as response:
            calls = json.load(response)
        timelines = with_retries(emulator.timeline, "emulator timeline")
        db = night_db_figures(dsn)
        per_minute = calls_per_minute(calls, started, ended)
        cpu = {}
        for name in pids:
            own = cpu_after[name][0] - cpu_before[name][0]
            below = cpu_after[name][1] - cpu_before[name][1]
            cpu[name] = {"own": round(own, 1), "descendants": round(below, 1)}
        ok = sum(int((counts or {}).get("ok", 0)) for counts in db["report_counts"] if isinstance(counts, dict))
        return {
            "state": "success" if set(states.values()) == {"success"} else "failed",
            "run_states": states,
            "setup": {
                "instances": NIGHT_INSTANCES,
                "instance_type": NIGHT_INSTANCE_TYPE,
                "gpus": NIGHT_INSTANCES * 4,
                "runs": runs,
                "instances_per_run": NIGHT_INSTANCES_PER_RUN,
                "files": NIGHT_FILES,
                "chunk_size": NIGHT_CHUNK_SIZE,
                "chunks": NIGHT_FILES // NIGHT_CHUNK_SIZE,
                "synthetic_sr_seconds_per_file": NIGHT_SR_SECONDS,
                "synthetic_sr_jitter": NIGHT_JITTER,
                "assumed_real_sr_seconds_per_file": NIGHT_REAL_SR_SECONDS,
                "compression_k": NIGHT_COMPRESSION,
                "real_night_sr_hours_per_gpu": round(
                    NIGHT_FILES / (NIGHT_INSTANCES * 4) * NIGHT_REAL_SR_SECONDS / 3600, 2
                ),
                "poll_interval_seconds": NIGHT_POLL_INTERVAL,
                "airflow": {
                    "executor": stack.backend.executor,
                    "core.parallelism": NIGHT_PARALLELISM,
                    "core.max_active_tasks_per_dag": NIGHT_MAX_ACTIVE_TASKS,
                    "VOD_SR_MAX_ACTIVE_RUNS": runs,
                    "pool": "default_pool, 128 slots (deferred tasks hold none)",
                    "triggerers": stack.backend.triggerers,
                    "api_workers": 1,
                },
                "emulator": "EC2 pending/stopping 2 s, SSM registration 1 s (emulator defaults)",
                "sources": f"{NIGHT_FILES:,} objects of {NIGHT_SOURCE_BYTES} bytes via /_local_aws/s3/bulk-objects in "
                f"{sources_seconds:.1f} s; one folder per lane (night/run-R/lane-NN/), manifests chunk by chunk",
            },
            "wall_seconds": round(ended - started, 1),
            "runs_wall_seconds": {
                r["dag_run_id"]: round(parse_time(r["end_date"]) - parse_time(r["start_date"]), 1) for r in dag_runs
            },
            "files_ok": ok,
            "aws_calls_total": sum(f["total"] for f in per_minute.values()),
            "aws_calls": against_limits(per_minute, NIGHT_COMPRESSION),
            "s3_prefix_peaks": s3_prefix_peaks(calls, started, ended),
            "metadata_db": db,
            "peaks": sampler.peaks(),
            "cpu_seconds": cpu,
            "busiest_cpu_per_wall_second": sampler.busiest_cpu(),
            "machine_cpu_seconds": round(machine, 1),
            "machine_cores": os.cpu_count(),
            "measured_wall_seconds": round(wall, 1),
            "gpus": night_gpu_figures(timelines, instances, started, ended, NIGHT_COMPRESSION),
            "notes": [
                f"night compressed x{NIGHT_COMPRESSION:g}: {NIGHT_SR_SECONDS:g} s of synthetic model time per file "
                f"stands for an assumed {NIGHT_REAL_SR_SECONDS:g} s; calls per file or per chunk (kind 'x K') come "
                f"K times as often as in a real night (real_night_peak_per_second divides by K); polls (every "
                f"{NIGHT_POLL_INTERVAL} s, production's default) and per-lane calls do not",
                "the stand-in makes the real script's S3 calls but one: no QC contact sheet, one PUT per file fewer",
                "each lane's sources share a folder: with a flat layout, round-robin chunks make each lane's verify "
                "list the whole run's range (about files/1,000 ListObjectsV2 pages per lane, lanes x that per run)",
                "runs of at most 50 instances (SendCommand's InstanceIds limit): the night is two runs side by side",
            ],
        }


def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:g}{unit}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}{unit}"
    return f"{value}{unit}"


def print_summary(r: dict[str, Any]) -> None:
    """The figures beside their targets; "n/a" where a step was not run or failed (failed_steps says why)."""
    t = r["targets"]

    def row(label: str, name: str, unit: str = "", detail: str = "") -> str:
        entry = t[name]
        verdict = {True: "met", False: "MISSED", None: ""}[entry["met"]]
        if entry.get("run_state"):
            verdict = f"not judged: the run {entry['run_state']}"
        figure = f"{fmt(entry['value'], unit)}"
        return f"  {label:<40} {figure:<12} target {entry['target']!s:<8} {verdict:<6} {detail}".rstrip()

    ours, ours40, long = r.get("vod_sr_20_files", {}), r.get("vod_sr_40_files", {}), r.get("vod_sr_20_files_30s", {})
    base, plan, plan1m = r.get("baseline_20_files", {}), r.get("plan_10000", {}), r.get("plan_1m", {})
    ratio = r.get("baseline_over_vod_sr", {})
    gpu4, gpu8 = r.get(GPU4_STEP) or {}, r.get(GPU8_STEP) or {}
    g = fmt
    lines = [
        "",
        f"vod-sr benchmark ({r['status']}; emulator, cpu model, poll interval {r['poll_interval_seconds']} s; "
        "figures also in bench-results.json)",
        "20 files = 20 copies of the seed-like 10 s 640x480 clip on one instance, default chunk size (10).",
        *(
            [f"Measured now: {', '.join(only)}; the other figures are from earlier runs (steps.*.at in the file)."]
            if (only := dig(r, "last_run", "only"))
            else []
        ),
        "",
        row(
            "busy ratio, 20 files, 1 instance",
            "busy_ratio_20_files",
            detail=f"(SR {g(ours.get('sr_command_seconds'))} s / running {g(ours.get('instance_running_seconds'))} s)",
        ),
        f"    idle before first / after last chunk {g(ours.get('idle_before_first_chunk_seconds'))} s / "
        f"{g(ours.get('idle_after_last_chunk_seconds'))} s",
        f"    40 files; 20 files of 30 s clips     {g(ours40.get('busy_ratio'))}; {g(long.get('busy_ratio'))} "
        f"(SR {g(long.get('sr_command_seconds'))} s / running {g(long.get('instance_running_seconds'))} s)",
        row(
            "orchestration overhead per file",
            "overhead_per_file_seconds_20_files",
            " s",
            f"(wall {g(ours.get('wall_seconds'))} s; 40 files: {g(ours40.get('overhead_per_file_seconds'))} s)",
        ),
        row(
            "API calls per file without polls",
            "api_calls_per_file_without_polls_20_files",
            detail=f"(40 files: {g(ours40.get('calls_per_file_without_polls'))}) {ours.get('calls_per_file', '')}",
        ),
        f"    of which the instance's own S3 I/O   {g(ours.get('instance_s3_calls_per_file'))}",
        f"  polls per minute, 20 / 40 files        {g(ours.get('polls_per_minute'))} / "
        f"{g(ours40.get('polls_per_minute'))} (command status: {g(ours.get('command_status_polls_per_minute'))} / "
        f"{g(ours40.get('command_status_polls_per_minute'))}; should not grow with files)",
        row("plan, 10,000 sources under a prefix", "plan_10000_seconds", " s"),
        row(
            "    chunks",
            "plan_10000_chunks",
            detail=f"({g(plan.get('mapped_task_instances_per_task'))} mapped lane(s))",
        ),
        row(
            "plan, 1,000,000 sources from a manifest",
            "plan_1m_seconds",
            " s",
            f"(CPU {g(plan1m.get('cpu_seconds'))} s; S3 stand-in: the planner's own cost, "
            f"{g(plan1m.get('stand_in_seconds'))} s of it in the stand-in; "
            f"real S3 adds latency and ~{g(plan1m.get('botocore_parse_seconds_estimate'))} s of botocore parsing)",
        ),
        row(
            "    peak RSS of the planning process",
            "plan_1m_peak_rss_mib",
            " MiB",
            f"(after imports {g(plan1m.get('rss_after_imports_mib'))} MiB; "
            f"with store_plan and the XCom values {g(plan1m.get('peak_rss_with_xcom_mib'))} MiB)",
        ),
        "  XCom bytes per run (lanes+summary+verify) "
        + ", ".join(f"{int(k):,} files: {fmt(v)}" for k, v in t["xcom_bytes_per_run"]["value"].items())
        + f"   target {t['xcom_bytes_per_run']['target']} "
        + {True: "met", False: "MISSED", None: ""}[t["xcom_bytes_per_run"]["met"]],
        row(
            "DAG parse over `import airflow.sdk`",
            "dag_parse_over_sdk_seconds",
            " s",
            f"(sdk itself {g(dig(r, 'parse', 'import_airflow_sdk_seconds'))} s)",
        ),
        "",
        f"  stock operators, same 20 files         wall {g(base.get('wall_seconds'))} s, instance running "
        f"{g(base.get('instance_running_seconds'))} s, busy {g(base.get('busy_ratio'))}, {g(base.get('calls_total'))} "
        f"calls ({g(base.get('state'))})",
        f"  baseline / vod-sr                      wall x{g(ratio.get('wall_time'))}, running "
        f"x{g(ratio.get('instance_running_time'))}, calls x{g(ratio.get('api_calls'))}",
        "",
        "  Same 20 files, one 1-GPU instance (g6e.xlarge): vod-sr (chunk size 1 unless said) vs the stock operators "
        "(all at once)",
        f"    {'run':<34} {'wall s':>7} {'running s':>9} {'at once':>7} {'base/ours wall':>14} {'running':>8}",
        *(
            f"    {label:<34} {g(e.get('wall_seconds')):>7} {g(e.get('instance_running_seconds')):>9} "
            f"{g(e.get('max_concurrent')):>7} {g(e.get('baseline_wall_over_vod_sr')):>14} "
            f"{g(e.get('baseline_running_over_vod_sr')):>8}"
            for label, e in [
                *(
                    (
                        f"vod-sr, {run['streams_per_gpu']} stream(s)/GPU, chunk {run['chunk_size']}",
                        run,
                    )
                    for run in (dig(r, "vs_baseline_20_files", "runs") or {}).values()
                ),
                ("stock operators, all at once", dig(r, "vs_baseline_20_files", "baseline") or {}),
            ]
        ),
        row(
            "best vod-sr vs baseline (wall)",
            "best_vod_sr_vs_baseline",
            "x",
            f"(best: {g(dig(r, 'vs_baseline_20_files', 'best'))}; instance time "
            f"x{g(dig(r, 'vs_baseline_20_files', 'best_running_ratio'))})",
        ),
        row(
            "instance time vs baseline, closest conc.",
            "instance_time_vs_baseline_at_closest_concurrency",
            "x",
            f"({g(dig(r, 'vs_baseline_20_files', 'closest_concurrency'))}; the baseline ran "
            f"{g(dig(r, 'vs_baseline_20_files', 'baseline', 'max_concurrent'))} at once)",
        ),
        "",
        row(
            "per-slot busy ratio, 4 GPUs, 40 files",
            "per_slot_busy_ratio",
            detail=f"(least busy GPU over first SR start -> last SR end; mean "
            f"{g(gpu4.get('per_slot_busy_ratio_mean'))}; over the whole running time "
            f"{g(gpu4.get('per_slot_busy_ratio_of_running'))}; per GPU "
            + ", ".join(
                f"{k}: {v.get('busy_ratio_in_window')}/{v.get('busy_ratio_of_running')}"
                for k, v in (gpu4.get("per_gpu") or {}).items()
            )
            + ")",
        ),
        row(
            "per-slot busy ratio, 8 GPUs, 40 files",
            "per_slot_busy_ratio_8_gpus",
            detail=f"(mean {g(gpu8.get('per_slot_busy_ratio_mean'))}; per GPU "
            + ", ".join(f"{k}: {v.get('busy_ratio_in_window')}" for k, v in (gpu8.get("per_gpu") or {}).items())
            + ")",
        ),
        row(
            "idle before first SR run (worst lane)",
            "idle_before_first_chunk_seconds",
            " s",
            f"({g(dig(r, 'idle_per_lane', 'worst_before_step'))}; all: "
            f"{dig(r, 'idle_per_lane', 'before_first_sr_seconds') or {}})",
        ),
        row(
            "idle after last SR run (worst lane)",
            "idle_after_last_chunk_seconds",
            " s",
            f"({g(dig(r, 'idle_per_lane', 'worst_after_step'))}; all: "
            f"{dig(r, 'idle_per_lane', 'after_last_sr_seconds') or {}})",
        ),
    ]
    lines += night_summary(r, row)
    for step, error in r["failed_steps"].items():
        lines.append(f"  FAILED {step}: {error.splitlines()[0] if error else ''}")
    print("\n".join(lines) + "\n", flush=True)


def night_summary(r: dict[str, Any], row: Callable[..., str]) -> list[str]:
    """The simulated night's lines of the summary (empty when it was never measured)."""
    night = r.get(NIGHT_STEP)
    if not night or "setup" not in night:
        return []
    setup, db, gpus, cpu = night["setup"], night["metadata_db"], night["gpus"], night["cpu_seconds"]
    g = fmt
    lines = [
        "",
        f"  Simulated night ({night['state']}): {setup['instances']} x {setup['instance_type']} ({setup['gpus']} GPUs), "
        f"{setup['files']:,} files in {setup['runs']} runs of {setup['instances_per_run']} instances, chunk size "
        f"{setup['chunk_size']}, poll {setup['poll_interval_seconds']} s; synthetic SR "
        f"{setup['synthetic_sr_seconds_per_file']:g} s/file = night compressed x{setup['compression_k']:g} "
        f"(assumed {setup['assumed_real_sr_seconds_per_file']:g} s/file)",
        f"    wall {g(night['wall_seconds'])} s, files verified ok {g(night['files_ok'])}, AWS calls "
        f"{g(night['aws_calls_total'])}",
        f"    {'action':<34} {'total':>8} {'mean/min':>9} {'peak/min':>9} {'peak/s':>7} {'limit/s':>8} "
        f"{'ratio':>6}  kind",
        *(
            f"    {key:<34} {g(f['total']):>8} {g(f['mean_per_minute']):>9} {g(f['peak_minute']):>9} "
            f"{g(f['peak_second']):>7} {g(f.get('limit_per_second')):>8} {g(f.get('ratio_peak_minute')):>6}  "
            f"{f['kind']}"
            + (f" (real night ~{f['real_night_peak_per_second']:g}/s)" if "real_night_peak_per_second" in f else "")
            for key, f in night["aws_calls"].items()
        ),
        *(
            f"    busiest S3 prefix, {kind:<5} {p['prefix']}: {p['peak_second']}/s at its busiest second, "
            f"{p['peak_minute']}/min (limit {p['limit_per_second']:g}/s)"
            for kind, p in night["s3_prefix_peaks"].items()
        ),
        f"    metadata DB: {g(db['task_instances'])} task instances ({db['task_instances_by_task']}), "
        f"{g(db['task_instance_tries'])} tries, {g(db['task_reschedule_rows'])} reschedules, "
        f"{g(db['triggers_created'])} triggers created (at most {g(night['peaks']['trigger_rows'])} rows at once), "
        f"XCom {g(db['xcom_rows'])} rows / {g(db['xcom_bytes'])} bytes, dag runs {db['dag_runs']}",
        f"    peaks: {night['peaks']['running_task_instances']} running, {night['peaks']['queued_task_instances']} "
        f"queued, {night['peaks']['deferred_task_instances']} deferred task instances",
        "    CPU seconds (own + descendants): "
        + ", ".join(f"{name} {c['own']:g} + {c['descendants']:g}" for name, c in cpu.items())
        + f"; machine {g(night['machine_cpu_seconds'])} of {g(round(night['measured_wall_seconds'] * night['machine_cores']))}"
        f" available; busiest (cores): {night['busiest_cpu_per_wall_second']}",
        f"    GPUs busy over the night's SR window ({g(gpus.get('sr_window_seconds'))} s): "
        f"{gpus.get('busy_ratio_in_night_window')}; of their instance's running time "
        f"{gpus.get('busy_ratio_of_running')}; a real night (model time x K, orchestration as measured) "
        f"{gpus.get('busy_ratio_in_night_window_real_night')}",
        f"    per lane idle before first / after last model run (s): {gpus.get('idle_before_first_sr_seconds')} / "
        f"{gpus.get('idle_after_last_sr_seconds')}",
    ]
    names = [name for name in r["targets"] if name.startswith("night_")]
    lines += [row(name.removeprefix("night_").replace("_", " "), name) for name in names]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help=f"comma-separated steps to run, of: {','.join(STEPS)}")
    parser.add_argument("--profile", action="store_true", help="plan_1m: also print cProfile's top 15 (extra run)")
    parser.add_argument("--results", type=Path, default=RESULTS_PATH, help="where the figures go")
    parser.add_argument(
        "--slot-chunk-size",
        type=int,
        default=SLOT_CHUNK_SIZE,
        help=f"chunk size of the streams and 4-GPU runs (default {SLOT_CHUNK_SIZE})",
    )
    parser.add_argument("--plan-child", type=int, help=argparse.SUPPRESS)  # internal: one planning, in a fresh process
    args = parser.parse_args(argv)
    if args.plan_child is not None:
        print(json.dumps(plan_child(args.plan_child, args.profile)))
        return 0
    selected = list(STEPS)
    if args.only:
        selected = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in selected if s not in STEPS]
        if unknown:
            parser.error(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(STEPS)}")

    # SIGTERM (make interrupted, a CI timeout) unwinds like Ctrl-C: the finally blocks stop what was started.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    results = Results(args.results, merge=bool(args.only))
    results.data["last_run"] = {"started_at": now(), "only": selected if args.only else None}
    results.write()
    work = Path(tempfile.mkdtemp(prefix="vod-sr-bench-"))
    try:
        run_steps(results, selected, work, profile=args.profile, slot_chunk_size=args.slot_chunk_size)
    finally:
        signal.signal(signal.SIGTERM, previous)
        results.data["last_run"]["ended_at"] = now()
        results.write()
        print_summary(results.data)
    failed = [s for s in selected if s in results.data["failed_steps"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
