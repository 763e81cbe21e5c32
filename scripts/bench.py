"""`make bench`: vod-sr's throughput figures on the local AWS emulator, beside the provider's stock operators.

Runs the real Airflow components (API server, scheduler with the LocalExecutor, dag-processor, triggerer, each its
own process, on a throwaway PostgreSQL) against the emulator and real ffmpeg (cpu model), and
measures from the emulator's own records (instance running intervals, command runs, every API call):

- busy ratio: seconds the instance ran SR chunk commands / seconds it was running (target >= 0.90);
- orchestration overhead per file: (run wall time - SR time) / files (target < 1 s at 20 files);
- AWS API calls per file, split into sends, polls, S3, EC2 (target <= 3 per file without polls), and polls per
  minute at two batch sizes (should not grow with files);
- plan time and chunk/mapped counts for 10,000 sources under a prefix (targets <= 20 s, <= 1024);
- DAG file parse time over a bare `import airflow.sdk` (target <= 0.3 s);
- the same 20-file batch through a DAG of stock provider operators (benchmarks/baseline_stock_operators.py).

Prints the figures and writes them to bench-results.json. Not a test: nothing here asserts.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from include.local_aws.airflow_stack import AirflowStack, Backend
from include.local_aws.services import PostgresServer
from include.local_aws.world import (
    OUTPUT_BUCKET,
    REPO_ROOT,
    SOURCE_BUCKET,
    EmulatorProcess,
    airflow_env,
    boto_client,
    create_world,
    make_sample_clip,
)

POLL_INTERVAL = 2  # seconds; production default is 15 (see the note printed with the results)
POLL_ACTIONS = {"GetCommandInvocation", "ListCommandInvocations", "DescribeInstanceInformation", "DescribeInstances"}
EC2_ACTIONS = {"StartInstances", "StopInstances", "CreateTags", "DeleteTags", "DescribeTags"}


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


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


def measure_run(
    stack: AirflowStack, emulator: EmulatorProcess, instance_id: str, dag_id: str, conf: dict[str, Any], files: int
) -> dict[str, Any]:
    run_id = stack.trigger(conf, dag_id)
    state = stack.wait_for_run(run_id, 1800, dag_id)
    run = stack.run(run_id, dag_id)
    started, ended = parse_time(run["start_date"]), parse_time(run["end_date"])
    timeline = emulator.timeline()[instance_id]
    in_run = [(s, e if e is not None else ended) for s, e in timeline["running"] if s >= started]
    running = union_seconds(in_run)
    sr_runs = [
        (c["start"], c["end"] or ended)
        for c in timeline["commands"]
        if c["start"] >= started and "install AWS CLI" not in c["comment"]
    ]
    sr_seconds = union_seconds(sr_runs)
    head = min(s for s, _ in sr_runs) - min(s for s, _ in in_run) if sr_runs and in_run else None
    tail = max(e for _, e in in_run) - max(e for _, e in sr_runs) if sr_runs and in_run else None
    calls = [c for c in emulator.calls() if started - 1 <= c["time"] <= ended + 1]
    kinds = classify(calls)
    wall = ended - started
    status_polls = sum(1 for c in calls if c["action"] in ("GetCommandInvocation", "ListCommandInvocations"))
    return {
        "dag_id": dag_id,
        "state": state,
        "files": files,
        "wall_seconds": round(wall, 1),
        "instance_running_seconds": round(running, 1),
        "sr_command_seconds": round(sr_seconds, 1),
        "busy_ratio": round(sr_seconds / running, 3) if running else None,
        "idle_before_first_chunk_seconds": round(head, 1) if head is not None else None,
        "idle_after_last_chunk_seconds": round(tail, 1) if tail is not None else None,
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


def plan_at_scale(endpoint_url: str, count: int = 10_000) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

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
    return {
        "sources": plan.file_count,
        "plan_seconds": round(seconds, 2),
        "chunks": len(plan.chunks),
        "mapped_task_instances_per_task": len(plan.lanes()),
        "xcom_bytes": len(json.dumps(plan.lanes())),
    }


def parse_overhead(repeats: int = 7) -> dict[str, Any]:
    code = (
        "import time, runpy; t0 = time.perf_counter(); import airflow.sdk; t1 = time.perf_counter();"
        "runpy.run_path('dags/vod_sr_batch.py'); t2 = time.perf_counter(); print(t1 - t0, t2 - t1)"
    )
    samples = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        samples.append([float(x) for x in out.stdout.split()[-2:]])
    return {
        "import_airflow_sdk_seconds": round(statistics.median(s[0] for s in samples), 3),
        "dag_file_over_sdk_seconds": round(statistics.median(s[1] for s in samples), 3),
    }


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="vod-sr-bench-"))
    results: dict[str, Any] = {"poll_interval_seconds": POLL_INTERVAL}
    print("==> DAG parse time", flush=True)
    results["parse"] = parse_overhead()
    # PostgreSQL, not SQLite: the baseline's 20 concurrent task processes had SQLite's scheduler die with "database
    # is locked". One machine, so the LocalExecutor; the full-stack tests cover Celery.
    with EmulatorProcess(work / "emulator") as emulator, PostgresServer() as postgres:
        vod_instance, baseline_instance = create_world(emulator.endpoint_url), create_world(emulator.endpoint_url)
        clip = make_sample_clip(work / "clip.mp4")
        long_clip = make_sample_clip(work / "clip-30s.mp4", seconds=30)
        s3 = boto_client("s3", emulator.endpoint_url)
        keys = [f"bench/clip-{n:02}.mp4" for n in range(40)]
        long_keys = [f"bench-30s/clip-{n:02}.mp4" for n in range(20)]
        for key in keys:
            s3.upload_file(str(clip), SOURCE_BUCKET, key)
        for key in long_keys:
            s3.upload_file(str(long_clip), SOURCE_BUCKET, key)

        dags = work / "dags"
        dags.mkdir()
        (dags / "vod_sr_batch.py").symlink_to(REPO_ROOT / "dags" / "vod_sr_batch.py")
        (dags / "baseline_stock_operators.py").symlink_to(REPO_ROOT / "benchmarks" / "baseline_stock_operators.py")
        env = {**os.environ, **airflow_env(emulator.endpoint_url, vod_instance, poll_interval=POLL_INTERVAL)}
        print("==> Starting Airflow on PostgreSQL (API server, scheduler, dag-processor, triggerer)", flush=True)
        backend = Backend(database_url=postgres.url(postgres.create_database()))
        stack = AirflowStack(work / "airflow", env, dags_folder=dags, parallelism=32, backend=backend)
        try:
            stack.start(dag_ids=("vod_sr_batch", "baseline_stock_operators"))
            batches = {"vod_sr_20_files": keys[:20], "vod_sr_40_files": keys, "vod_sr_20_files_30s": long_keys}
            for name, batch in batches.items():
                print(f"==> vod_sr_batch: {name}", flush=True)
                conf = {"sources": batch, "model": "cpu", "overwrite": True}
                results[name] = measure_run(stack, emulator, vod_instance, "vod_sr_batch", conf, len(batch))
            print(
                "==> baseline_stock_operators, 20 files (stock intervals: 15 s EC2 checks, 120 s SSM pokes)", flush=True
            )
            results["baseline_20_files"] = measure_run(
                stack,
                emulator,
                baseline_instance,
                "baseline_stock_operators",
                {
                    "sources": keys[:20],
                    "source_bucket": SOURCE_BUCKET,
                    "output_bucket": OUTPUT_BUCKET,
                    "instance_id": baseline_instance,
                },
                20,
            )
        finally:
            stack.stop()
        print("==> plan for 10,000 sources under a prefix", flush=True)
        results["plan_10000"] = plan_at_scale(emulator.endpoint_url)

    ours, base = results["vod_sr_20_files"], results["baseline_20_files"]
    results["baseline_over_vod_sr"] = {
        "wall_time": round(base["wall_seconds"] / ours["wall_seconds"], 2),
        "instance_running_time": round(base["instance_running_seconds"] / ours["instance_running_seconds"], 2),
        "api_calls": round(base["calls_total"] / ours["calls_total"], 2),
    }
    (REPO_ROOT / "bench-results.json").write_text(json.dumps(results, indent=2))
    print_summary(results)
    return 0


def print_summary(r: dict[str, Any]) -> None:
    ours, ours40, long = r["vod_sr_20_files"], r["vod_sr_40_files"], r["vod_sr_20_files_30s"]
    base, plan, parse = r["baseline_20_files"], r["plan_10000"], r["parse"]
    print(f"""
vod-sr benchmark (emulator, cpu model, poll interval {r["poll_interval_seconds"]} s; figures also in bench-results.json)
20 files = 20 copies of the seed-like 10 s 640x480 clip on one instance, default chunk size (10).

  busy ratio, 20 files, 1 instance       {ours["busy_ratio"]}   (SR {ours["sr_command_seconds"]} s / running {ours["instance_running_seconds"]} s; target >= 0.90)
    idle before first / after last chunk {ours["idle_before_first_chunk_seconds"]} s / {ours["idle_after_last_chunk_seconds"]} s
    40 files; 20 files of 30 s clips     {ours40["busy_ratio"]}; {long["busy_ratio"]} (SR {long["sr_command_seconds"]} s / running {long["instance_running_seconds"]} s)
  orchestration overhead per file        {ours["overhead_per_file_seconds"]} s   (wall {ours["wall_seconds"]} s; 40 files: {ours40["overhead_per_file_seconds"]} s; target < 1 s)
  API calls per file without polls       {ours["calls_per_file_without_polls"]} (40 files: {ours40["calls_per_file_without_polls"]})   {ours["calls_per_file"]} (target <= 3)
    of which the instance's own S3 I/O   {ours["instance_s3_calls_per_file"]}
  polls per minute, 20 / 40 files        {ours["polls_per_minute"]} / {ours40["polls_per_minute"]} (command status: {ours["command_status_polls_per_minute"]} / {ours40["command_status_polls_per_minute"]})
  plan, 10,000 sources under a prefix    {plan["plan_seconds"]} s, {plan["chunks"]} chunks, {plan["mapped_task_instances_per_task"]} mapped lane(s) (targets <= 20 s, <= 1024)
  DAG parse over `import airflow.sdk`    {parse["dag_file_over_sdk_seconds"]} s (sdk itself {parse["import_airflow_sdk_seconds"]} s; target <= 0.3 s)

  stock operators, same 20 files         wall {base["wall_seconds"]} s, instance running {base["instance_running_seconds"]} s, busy {base["busy_ratio"]}, {base["calls_total"]} calls ({base["state"]})
  baseline / vod-sr                      wall x{r["baseline_over_vod_sr"]["wall_time"]}, running x{r["baseline_over_vod_sr"]["instance_running_time"]}, calls x{r["baseline_over_vod_sr"]["api_calls"]}
""")


if __name__ == "__main__":
    sys.exit(main())
