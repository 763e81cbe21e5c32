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
- from the emulator's per-GPU record of model runs: the per-slot busy ratio on an emulated 4-GPU g6e.12xlarge, 40
  files, chunk size 1 (least busy GPU's busy seconds over the SR window, first model run start -> last end;
  target >= 0.95; also over the whole running time), and each lane's idle time before its first model run and
  after its last (targets <= 2 poll intervals).

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
from collections import Counter
from collections.abc import Callable, Iterator
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
GPU4_INSTANCE_TYPE = "g6e.12xlarge"
SLOT_CHUNK_SIZE = 1  # chunk size of the streams and 4-GPU runs (--slot-chunk-size): small, so every slot has work
RUN_STEPS = (  # need Airflow
    "vod_sr_20_files",
    "baseline_20_files",
    *STREAM_STEPS,
    GPU4_STEP,
    "vod_sr_40_files",
    "vod_sr_20_files_30s",
)
VOD_SR_RUN_STEPS = tuple(s for s in RUN_STEPS if s.startswith("vod_sr_"))
EMULATOR_STEPS = (*RUN_STEPS, "plan_10000")  # need the emulator
STEPS = ("parse", "plan_1m", *EMULATOR_STEPS)  # in the order they run

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
        "mapped_task_instances_per_task": len(plan.lanes()),
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
        "lanes": len(plan.lanes()),
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
        "per_slot_busy_ratio": target(r, GPU4_STEP, "per_slot_busy_ratio", ">=", 0.95)
        | {"note": "least busy GPU of the 4: union of its model runs / first model run start -> last end"},
        "idle_before_first_chunk_seconds": target(
            r, "idle_per_lane", "worst_before", "<=", IDLE_TARGET_SECONDS, dig(r, "idle_per_lane", "worst_before_step")
        )
        | {"note": "worst vod-sr run: instance running -> first model run (idle_per_lane)"},
        "idle_after_last_chunk_seconds": target(
            r, "idle_per_lane", "worst_after", "<=", IDLE_TARGET_SECONDS, dig(r, "idle_per_lane", "worst_after_step")
        )
        | {"note": "worst vod-sr run: last model run's end -> instance stopped (idle_per_lane)"},
        "dag_parse_over_sdk_seconds": target(r, "parse", "dag_file_over_sdk_seconds", "<=", 0.3),
    }


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
    if not emulator_steps:
        return
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

                    def on_4_gpus() -> dict[str, Any]:
                        instance = create_instance(emulator.endpoint_url, GPU4_INSTANCE_TYPE)
                        return vod_sr("vod_sr_batch", keys, instance, chunk_size=slot_chunk_size)() | {
                            "instance_type": GPU4_INSTANCE_TYPE
                        }

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
                        GPU4_STEP: on_4_gpus,
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
    from include.local_aws.world import boto_client

    ec2 = boto_client("ec2", endpoint_url)
    instance_id = ec2.run_instances(
        ImageId="ami-0b1ue0000000000aa", MinCount=1, MaxCount=1, InstanceType=instance_type
    )["Instances"][0]["InstanceId"]
    ec2.stop_instances(InstanceIds=[instance_id])
    ec2.get_waiter("instance_stopped").wait(InstanceIds=[instance_id], WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    return instance_id


def start_stack(cleanup: contextlib.ExitStack, work: Path, endpoint_url: str, instance_id: str) -> AirflowStack:
    """Airflow on a throwaway PostgreSQL, both stopped by `cleanup`. PostgreSQL, not SQLite: the baseline's 20
    concurrent task processes had SQLite's scheduler die with "database is locked". One machine, so the
    LocalExecutor; the full-stack tests cover Celery."""
    from include.local_aws.airflow_stack import AirflowStack, Backend
    from include.local_aws.services import PostgresServer
    from include.local_aws.world import airflow_env

    postgres = PostgresServer()
    cleanup.callback(postgres.stop)
    postgres.start()
    dags = work / "dags"
    dags.mkdir(exist_ok=True)
    for name, target_path in (
        ("vod_sr_batch.py", REPO_ROOT / "dags" / "vod_sr_batch.py"),
        ("baseline_stock_operators.py", REPO_ROOT / "benchmarks" / "baseline_stock_operators.py"),
        ("vod_sr_streams.py", REPO_ROOT / "benchmarks" / "vod_sr_streams.py"),
    ):
        if not (dags / name).exists():
            (dags / name).symlink_to(target_path)
    env = {**os.environ, **airflow_env(endpoint_url, instance_id, poll_interval=POLL_INTERVAL)}
    print("==> Starting Airflow on PostgreSQL (API server, scheduler, dag-processor, triggerer)", flush=True)
    backend = Backend(database_url=postgres.url(postgres.create_database()))
    stack = AirflowStack(work / "airflow", env, dags_folder=dags, parallelism=32, backend=backend)
    cleanup.callback(stack.stop)
    stack.start(dag_ids=("vod_sr_batch", "baseline_stock_operators", *map(streams_dag_id, STREAMS)))
    return stack


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
    gpu4 = r.get(GPU4_STEP) or {}
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
    for step, error in r["failed_steps"].items():
        lines.append(f"  FAILED {step}: {error.splitlines()[0] if error else ''}")
    print("\n".join(lines) + "\n", flush=True)


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
