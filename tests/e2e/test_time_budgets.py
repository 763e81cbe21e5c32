"""Time limits that mean what the form says (issue 8, point 1), on the emulated instance.

The emulator's agent starts a command's executionTimeout when it starts the command's process and then kills the
command's whole process group, as the real agent does; the instance's `timeout` and `flock` are the real coreutils and
util-linux tools. The chunks use ffmpeg's `realtime` filter, so each file takes as long as it plays and a chunk's
duration is known in advance, at almost no CPU cost.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from include.local_aws.world import boto_client, make_sample_clip
from include.vod_sr.budget import ChunkLimits, chunk_limits
from include.vod_sr.catalog import SrModel
from include.vod_sr.commands import get_invocation, send_command
from include.vod_sr.plan import Chunk
from include.vod_sr.report import build_report
from include.vod_sr.script import chunk_keys, chunk_list, render_sr_script
from include.vod_sr.verify import verify_chunks
from tests.e2e.test_batch_e2e import stored_report
from tests.e2e.test_killed_chunks import LIVE_STATES, REALTIME_MODEL, EmulatedInstance

pytestmark = pytest.mark.e2e

CHUNK_SECONDS = 35  # one 35 s file at playing speed, plus its transfers
BUDGET = 60  # the form's smallest budget: above one chunk, well below two


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    media = tmp_path_factory.mktemp("budget-media")
    return {
        seconds: make_sample_clip(media / f"{seconds}s.mp4", seconds=seconds, size="320x240")
        for seconds in (1, CHUNK_SECONDS, 60)
    }


def files_by_key(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["source"].split("/", 3)[-1]: f for f in report["files"]}


def test_a_budget_just_above_one_chunk_lets_both_chunks_of_a_lane_finish(world, clips, monkeypatch):
    # Two commands are out at once: the second one's process starts (and SSM's clock with it) while the first chunk
    # works, and waits on the instance's lock for about CHUNK_SECONDS before it can start its own.
    monkeypatch.setenv("AIRFLOW_VAR_VOD_SR_MODELS", json.dumps({"rt": REALTIME_MODEL}))
    keys = ["budget/first.mp4", "budget/second.mp4"]
    for key in keys:
        world.upload(key, clips[CHUNK_SECONDS])

    run = world.run(sources=keys, custom_model="rt", chunk_size=1, execution_timeout=BUDGET)

    files = files_by_key(stored_report(world, run))
    assert {key: (files[key]["status"], files[key]["reason"]) for key in keys} == {key: ("ok", "") for key in keys}
    assert run.state == "success", run.task_states
    chunk_runs = sorted(
        (r for r in world.emulator.timeline()[world.instance_id]["commands"] if " chunk " in r["comment"]),
        key=lambda r: r["start"],
    )
    assert [r["status"] for r in chunk_runs] == ["Success", "Success"]
    # Both start at once and fetch their file; whichever takes the GPU slot second (not always the one SSM started
    # second) waits there for the other's model run.
    first, second = sorted(chunk_runs, key=lambda r: r["end"])
    assert second["start"] < first["end"] - CHUNK_SECONDS / 2  # it was delivered while the first chunk worked
    assert second["end"] - second["start"] > BUDGET  # so its command lived longer than the budget, and was not cut
    ssm_timeouts = {
        command["Parameters"]["executionTimeout"][0]
        for command in boto_client("ssm", world.emulator.endpoint_url).list_commands(InstanceId=world.instance_id)[
            "Commands"
        ]
        if " chunk " in command["Comment"]
    }
    assert ssm_timeouts == {str(chunk_limits(BUDGET, queued_ahead=2).backstop)}  # two chunks per slot may be ahead


def test_a_file_over_the_per_file_limit_fails_alone(world, clips, monkeypatch):
    monkeypatch.setenv("AIRFLOW_VAR_VOD_SR_MODELS", json.dumps({"rt": REALTIME_MODEL}))
    world.upload("per-file/long.mp4", clips[60])
    world.upload("per-file/short.mp4", clips[1])

    run = world.run(sources=["per-file/long.mp4", "per-file/short.mp4"], custom_model="rt", file_timeout=10)

    assert run.state == "failed"
    report = stored_report(world, run)
    files = files_by_key(report)
    assert (files["per-file/short.mp4"]["status"], files["per-file/short.mp4"]["reason"]) == ("ok", "")
    assert files["per-file/long.mp4"]["status"] == "failed"
    assert files["per-file/long.mp4"]["reason"] == "ffmpeg (per-file limit 10 s reached) failed on the instance"
    assert report["retry_conf"]["sources"] == ["s3://vod-sr-demo-source/per-file/long.mp4"]


class LimitedInstance(EmulatedInstance):
    def run_limited(self, chunk: Chunk, model: SrModel, limits: ChunkLimits) -> dict[str, Any]:
        """Send `chunk` as run_chunks does: the script enforces `limits`, SSM gets the backstop."""
        files_key, results_key = chunk_keys(self.run_token, chunk.index)
        self.s3.put_object(Bucket=self.output_bucket, Key=files_key, Body=chunk_list(chunk))
        script = render_sr_script(
            model,
            self.run_token,
            chunk.index,
            f"s3://{self.output_bucket}/{files_key}",
            f"s3://{self.output_bucket}/{results_key}",
            limits,
        )
        command_id = send_command(
            self.ssm,
            self.instance_id,
            script,
            comment=f"budget test chunk {chunk.index}",
            execution_timeout=limits.backstop,
            delivery_timeout=60,
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            invocation = get_invocation(self.ssm, command_id, self.instance_id)
            if invocation is not None and invocation["Status"] not in LIVE_STATES:
                return invocation
            time.sleep(0.5)
        raise AssertionError(f"chunk {chunk.index} did not end")


def test_a_spent_budget_stops_the_file_under_way_and_the_rest_are_reported_for_a_rerun(
    running_instance, emulator_env, clips
):
    instance = LimitedInstance(emulator_env.endpoint_url, running_instance)
    keys = ["over-file-limit.mp4", "over-budget.mp4", "not-started.mp4"]
    for key, seconds in zip(keys, (60, 60, 1), strict=True):
        instance.s3.upload_file(str(clips[seconds]), instance.source_bucket, key)
    model = SrModel(name="rt", **{**REALTIME_MODEL, "output_args": tuple(REALTIME_MODEL["output_args"])})
    chunk = instance.chunk(0, 0, keys)
    # The first file is stopped by its limit 20 s after it started, the second by the budget 35 s after the lock was
    # taken (fewer than 20 s were left for it, however long the transfers took): the third never starts.
    limits = ChunkLimits(budget=35, file_limit=20, lock_wait=10, backstop=300)
    started = time.monotonic()

    invocation = instance.run_limited(chunk, model, limits)

    assert time.monotonic() - started < 80
    assert (invocation["Status"], invocation["ResponseCode"]) == ("Failed", 1)  # the script ended it, not SSM
    verified = verify_chunks(instance.s3, instance.output_bucket, instance.run_token, [chunk], ssm=instance.ssm)
    report = build_report(
        run_id="spent-budget",
        run_token=instance.run_token,
        params={},
        planned=list(chunk.files),
        verified=[verified],
        skipped=[],
    )
    assert {key: (f["status"], f["reason"]) for key, f in files_by_key(report).items()} == {
        "over-file-limit.mp4": ("failed", "ffmpeg (per-file limit 20 s reached) failed on the instance"),
        "over-budget.mp4": ("failed", "ffmpeg (chunk budget 35 s reached) failed on the instance"),
        "not-started.mp4": ("failed", "ffmpeg (not started: chunk budget 35 s reached) failed on the instance"),
    }
    assert report["retry_conf"]["sources"] == [f"s3://{instance.source_bucket}/{key}" for key in keys]
