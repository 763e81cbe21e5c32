"""`make demo`: vod_sr_batch end to end on the local AWS emulator, with the CPU model and real ffmpeg.

Starts the emulator, creates the buckets and a stopped "GPU" instance, uploads a 10 s 640x480 sample clip like
the seed's, runs the DAG with `dag.test()`, then prints where the output is, what it is and how long each step
took. Airflow's own log goes to .demo/dag-test.log.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from include.local_aws.world import (
    OUTPUT_BUCKET,
    REPO_ROOT,
    SAMPLE_KEY,
    SOURCE_BUCKET,
    EmulatorProcess,
    airflow_env,
    boto_client,
    create_world,
    make_sample_clip,
    probe_video,
)

DEMO_DIR = REPO_ROOT / ".demo"


@contextlib.contextmanager
def output_to(path: Path):
    """Send this process's stdout and stderr (file descriptors included) to `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def main() -> int:
    started = time.monotonic()
    DEMO_DIR.mkdir(exist_ok=True)
    step("Preparing the Airflow metadata DB")
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)

    step("Starting the local AWS emulator")
    with EmulatorProcess(DEMO_DIR / "emulator") as emulator:
        instance_id = create_world(emulator.endpoint_url)
        clip = DEMO_DIR / SAMPLE_KEY
        if not clip.exists():
            step("Generating the sample clip (10 s, 640x480, H.264 + AAC)")
            make_sample_clip(clip)
        s3 = boto_client("s3", emulator.endpoint_url)
        s3.upload_file(str(clip), SOURCE_BUCKET, SAMPLE_KEY)
        print(
            f"    emulator {emulator.endpoint_url}, instance {instance_id} (stopped), "
            f"source s3://{SOURCE_BUCKET}/{SAMPLE_KEY}"
        )

        os.environ.update(airflow_env(emulator.endpoint_url, instance_id))
        from airflow.dag_processing.dagbag import DagBag
        from airflow.models.taskinstance import TaskInstance
        from airflow.utils.session import create_session

        step("Running vod_sr_batch with the cpu model (dag.test; log in .demo/dag-test.log)")
        run_started = time.monotonic()
        with output_to(DEMO_DIR / "dag-test.log"):
            dag = DagBag(dag_folder=str(REPO_ROOT / "dags")).dags["vod_sr_batch"]
            dag_run = dag.test(run_conf={"sources": [SAMPLE_KEY], "model": "cpu"})
        run_seconds = time.monotonic() - run_started

        with create_session() as session:
            tis = session.query(TaskInstance).filter_by(dag_id=dag.dag_id, run_id=dag_run.run_id).all()
            rows = sorted(
                ((ti.start_date, ti.task_id, ti.map_index, str(ti.state), ti.duration) for ti in tis if ti.start_date),
            )
        print("\n    step                     state        seconds")
        for _, task_id, map_index, state, duration in rows:
            name = task_id if map_index < 0 else f"{task_id}[{map_index}]"
            print(f"    {name:<24} {state:<12} {duration or 0:7.1f}")

        if str(dag_run.state) != "success":
            print(f"\nThe run ended {dag_run.state}. Last lines of .demo/dag-test.log:")
            print("".join((DEMO_DIR / "dag-test.log").read_text().splitlines(keepends=True)[-40:]))
            return 1

        output_key = SAMPLE_KEY.replace(".mp4", "_sr_cpu.mp4")
        local = DEMO_DIR / output_key
        s3.download_file(OUTPUT_BUCKET, output_key, str(local))
        video = probe_video(local)
        state = boto_client("ec2", emulator.endpoint_url).describe_instances(InstanceIds=[instance_id])["Reservations"][
            0
        ]["Instances"][0]["State"]["Name"]
        print(f"\n    output    s3://{OUTPUT_BUCKET}/{output_key} (copied to {local.relative_to(REPO_ROOT)})")
        print(
            f"    video     {video.width}x{video.height}, {video.seconds:.2f} s, "
            f"{'with' if video.has_audio else 'without'} audio, {local.stat().st_size / 1e6:.2f} MB"
        )
        print(f"    instance  {instance_id} is {state}")
        print(f"    run       {run_seconds:.1f} s in Airflow, {time.monotonic() - started:.1f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
