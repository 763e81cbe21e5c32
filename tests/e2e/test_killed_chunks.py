"""A chunk whose command is killed mid-way (CancelCommand, executionTimeout) loses nothing it finished.

The emulator's agent kills the command's whole process group with SIGKILL, as the real agent does, so no trap runs
on the instance. The chunks use a model with ffmpeg's `realtime` filter: each file takes as long as it plays, so a
60 s file is still being processed when the kill comes, after two 1 s files were done, at almost no CPU cost.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from include.local_aws.world import boto_client, make_sample_clip
from include.vod_sr.catalog import SrModel
from include.vod_sr.commands import get_invocation, send_command
from include.vod_sr.plan import Chunk, FileJob
from include.vod_sr.report import build_report
from include.vod_sr.script import chunk_keys, chunk_list, parse_result_lines, render_sr_script
from include.vod_sr.sources import S3Object
from include.vod_sr.verify import verify_chunks
from tests.e2e.test_batch_e2e import stored_report

pytestmark = pytest.mark.e2e

REALTIME_MODEL = {
    "title": "cpu 2x at the source's playing speed",
    "video_filter": "realtime,scale=iw*2:ih*2:flags=lanczos",
    "output_args": ["-c:v", "libx264", "-preset", "veryfast", "-c:a", "copy"],
}
LIVE_STATES = ("Pending", "InProgress", "Delayed", "Cancelling")
KILLED_CHUNK = ["killed/0.mp4", "killed/1.mp4", "killed/2-long.mp4", "killed/3.mp4"]
NEXT_CHUNK = ["next/4.mp4"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    media = tmp_path_factory.mktemp("killed-media")
    return {
        "short": make_sample_clip(media / "short.mp4", seconds=1, size="320x240"),
        "long": make_sample_clip(media / "long.mp4", seconds=60, size="320x240"),
    }


def clip_for(key: str, clips: dict[str, Path]) -> Path:
    return clips["long" if "long" in key else "short"]


def work_directories(emulator: Any, instance_id: str) -> list[str]:
    """The chunk scripts' work directories in the instance's sandbox (its TMPDIR, the emulator's /var/tmp)."""
    tmp = Path(emulator.state_dir) / "instances" / instance_id / "tmp"
    return sorted(p.name for p in tmp.iterdir() if p.is_dir() and p.name.startswith("vod-sr."))


class CancelAfterFiles(threading.Thread):
    """Cancels chunk `chunk`'s command on `instance_id` as soon as its output shows `files` files done.

    The chunk then holds the instance's slot, which tells the order of the chunks on the instance: chunk `other`
    either printed its results before (it took the slot first) or waits behind the killed chunk and runs next. The
    work directories on the instance at that moment are the killed chunk's and, if it is still waiting, the other's.
    """

    def __init__(self, emulator: Any, instance_id: str, chunk: int, files: int, other: int) -> None:
        super().__init__(daemon=True)
        self.ssm = boto_client("ssm", emulator.endpoint_url)
        self.emulator, self.instance_id, self.chunk, self.files, self.other = emulator, instance_id, chunk, files, other
        self.cancelled: str | None = None
        self.problem: str | None = None
        self.other_ran_first: bool | None = None
        self.killed_work_directories: list[str] = []

    def _invocation(self, chunk: int) -> dict[str, Any] | None:
        command_id = self._command_id(chunk)
        return get_invocation(self.ssm, command_id, self.instance_id) if command_id else None

    def _command_id(self, chunk: int) -> str | None:
        header = re.compile(rf"# vod-sr run \S+ chunk {chunk}:")
        for command in self.ssm.list_commands(InstanceId=self.instance_id)["Commands"]:
            if header.search("\n".join(command["Parameters"]["commands"])):
                return command["CommandId"]
        return None

    def run(self) -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            invocation = self._invocation(self.chunk)
            if invocation is not None:
                done = parse_result_lines(invocation["StandardOutputContent"])
                if sum(r["status"] == "ok" for r in done.values()) >= self.files:
                    other = self._invocation(self.other)
                    self.other_ran_first = bool(other and parse_result_lines(other["StandardOutputContent"]))
                    self.killed_work_directories = work_directories(self.emulator, self.instance_id)
                    self.ssm.cancel_command(CommandId=invocation["CommandId"], InstanceIds=[self.instance_id])
                    self.cancelled = invocation["CommandId"]
                    return
                if invocation["Status"] not in LIVE_STATES:
                    self.problem = f"chunk {self.chunk} ended {invocation['Status']} before {self.files} files"
                    return
            time.sleep(0.2)
        self.problem = f"chunk {self.chunk} never showed {self.files} files done"


def test_cancelled_chunk_credits_files_done_before_the_cancel_and_the_next_chunk_cleans_up(world, clips, monkeypatch):
    monkeypatch.setenv("AIRFLOW_VAR_VOD_SR_MODELS", json.dumps({"rt": REALTIME_MODEL}))
    for key in KILLED_CHUNK + NEXT_CHUNK:
        world.upload(key, clip_for(key, clips))
    canceller = CancelAfterFiles(world.emulator, world.instance_id, chunk=0, files=2, other=1)
    canceller.start()

    run = world.run(sources=KILLED_CHUNK + NEXT_CHUNK, custom_model="rt", chunk_size=4)

    canceller.join(timeout=10)
    assert canceller.cancelled, canceller.problem
    assert run.state == "failed"
    files = {f["source"].split("/", 3)[-1]: f for f in stored_report(world, run)["files"]}
    assert {key: files[key]["status"] for key in KILLED_CHUNK + NEXT_CHUNK} == {
        "killed/0.mp4": "ok",
        "killed/1.mp4": "ok",
        "killed/2-long.mp4": "failed",
        "killed/3.mp4": "failed",
        "next/4.mp4": "ok",
    }
    for key in ("killed/2-long.mp4", "killed/3.mp4"):
        assert files[key]["reason"] == "not finished when its chunk's command was cancelled"
    # The retry conf names only what was not finished: a retry does not redo the two files already uploaded.
    assert stored_report(world, run)["retry_conf"]["sources"] == [
        "s3://vod-sr-demo-source/killed/2-long.mp4",
        "s3://vod-sr-demo-source/killed/3.mp4",
    ]
    # The killed chunk's directory, and the other chunk's while it waited for the slot.
    assert 1 <= len(canceller.killed_work_directories) <= 2, canceller.killed_work_directories
    if canceller.other_ran_first:
        # run_chunks sends both chunks at once and the agent starts both: which takes the instance's lock first is
        # not fixed (a loaded instance can start chunk 1's shell first). Then the killed chunk was the last on the
        # instance in this run: its work directory survives the kill and the stop, and the next chunk on the
        # instance, in a later run, removes it.
        (left,) = work_directories(world.emulator, world.instance_id)
        assert left in canceller.killed_work_directories
        assert run_next_chunk(world, clips)["Status"] == "Success"
    assert work_directories(world.emulator, world.instance_id) == []


def run_next_chunk(world: Any, clips: dict[str, Path]) -> dict[str, Any]:
    """Start the instance the run stopped and run a chunk of one 1 s file on it through SSM; its invocation."""
    waiter_config = {"Delay": 1, "MaxAttempts": 120}
    world.ec2.get_waiter("instance_stopped").wait(InstanceIds=[world.instance_id], WaiterConfig=waiter_config)
    world.ec2.start_instances(InstanceIds=[world.instance_id])
    world.ec2.get_waiter("instance_running").wait(InstanceIds=[world.instance_id], WaiterConfig=waiter_config)
    instance = EmulatedInstance(world.emulator.endpoint_url, world.instance_id)
    instance.s3.upload_file(str(clips["short"]), instance.source_bucket, NEXT_CHUNK[0])
    model = SrModel(name="rt", **{**REALTIME_MODEL, "output_args": tuple(REALTIME_MODEL["output_args"])})
    # SSM holds the command Pending until the agent is Online again.
    return instance.run(instance.chunk(0, 0, NEXT_CHUNK), model, execution_timeout=120)


class EmulatedInstance:
    """Chunks sent through SSM to the emulated instance as run_chunks sends them, with fresh buckets."""

    def __init__(self, endpoint_url: str, instance_id: str) -> None:
        self.instance_id = instance_id
        self.s3, self.ssm = boto_client("s3", endpoint_url), boto_client("ssm", endpoint_url)
        suffix = uuid.uuid4().hex[:12]
        self.source_bucket, self.output_bucket = f"killed-src-{suffix}", f"killed-out-{suffix}"
        for bucket in (self.source_bucket, self.output_bucket):
            self.s3.create_bucket(Bucket=bucket)
        self.run_token = uuid.uuid4().hex[:16]

    def chunk(self, index: int, first: int, keys: list[str]) -> Chunk:
        return Chunk(
            index=index,
            instance_id=self.instance_id,
            files=tuple(
                FileJob(first + n, S3Object(self.source_bucket, key), S3Object(self.output_bucket, f"sr/{key}"))
                for n, key in enumerate(keys)
            ),
        )

    def run(self, chunk: Chunk, model: SrModel, execution_timeout: int) -> dict[str, Any]:
        files_key, results_key = chunk_keys(self.run_token, chunk.index)
        self.s3.put_object(Bucket=self.output_bucket, Key=files_key, Body=chunk_list(chunk))
        script = render_sr_script(
            model,
            self.run_token,
            chunk.index,
            f"s3://{self.output_bucket}/{files_key}",
            f"s3://{self.output_bucket}/{results_key}",
        )
        command_id = send_command(
            self.ssm,
            self.instance_id,
            script,
            comment=f"killed chunks test chunk {chunk.index}",
            execution_timeout=execution_timeout,
            delivery_timeout=60,
        )
        deadline = time.monotonic() + execution_timeout + 60
        while time.monotonic() < deadline:
            invocation = get_invocation(self.ssm, command_id, self.instance_id)
            if invocation is not None and invocation["Status"] not in LIVE_STATES:
                return invocation
            time.sleep(0.5)
        raise AssertionError(f"chunk {chunk.index} did not end")


def test_timed_out_chunk_credits_files_done_before_the_timeout_and_the_next_chunk_cleans_up(
    running_instance, emulator_env, clips
):
    instance = EmulatedInstance(emulator_env.endpoint_url, running_instance)
    for key in KILLED_CHUNK + NEXT_CHUNK:
        instance.s3.upload_file(str(clip_for(key, clips)), instance.source_bucket, key)
    model = SrModel(name="rt", **{**REALTIME_MODEL, "output_args": tuple(REALTIME_MODEL["output_args"])})
    killed, following = instance.chunk(0, 0, KILLED_CHUNK), instance.chunk(1, len(KILLED_CHUNK), NEXT_CHUNK)

    # The two 1 s files take a few seconds with the CLI's transfers; the 60 s file cannot finish in 20.
    timed_out = instance.run(killed, model, execution_timeout=20)
    left_by_the_kill = work_directories(emulator_env, running_instance)
    next_run = instance.run(following, model, execution_timeout=120)

    assert (timed_out["Status"], timed_out["StatusDetails"]) == ("TimedOut", "ExecutionTimedOut")
    assert len(left_by_the_kill) == 1  # SIGKILL ran no trap
    assert next_run["Status"] == "Success"
    assert work_directories(emulator_env, running_instance) == []
    verified = verify_chunks(
        instance.s3, instance.output_bucket, instance.run_token, [killed, following], ssm=instance.ssm
    )
    report = build_report(
        run_id="timed-out-chunk",
        run_token=instance.run_token,
        params={},
        planned=[*killed.files, *following.files],
        verified=[verified],
        skipped=[],
    )
    files = {f["source"].split("/", 3)[-1]: f for f in report["files"]}
    assert {key: files[key]["status"] for key in KILLED_CHUNK + NEXT_CHUNK} == {
        "killed/0.mp4": "ok",
        "killed/1.mp4": "ok",
        "killed/2-long.mp4": "failed",
        "killed/3.mp4": "failed",
        "next/4.mp4": "ok",
    }
    for key in ("killed/2-long.mp4", "killed/3.mp4"):
        assert files[key]["reason"].startswith("not finished when its chunk's command timed out (ExecutionTimedOut")
