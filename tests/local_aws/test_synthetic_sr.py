"""The emulator's synthetic SR stand-in (`--synthetic-sr-seconds`): real rendered chunk scripts, sent through SSM as
run_chunks sends them, are played in process: outputs, results and GPU time as the real script makes them, slots
shared per instance, cancel and timeout obeyed; every other command still runs for real."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from include.local_aws.synthetic_sr import QC_FIELD, ChunkScript, SyntheticSr, chunk_script
from include.local_aws.world import EmulatorProcess, boto_client
from include.vod_sr.budget import ChunkLimits
from include.vod_sr.catalog import BUILTIN_MODELS
from include.vod_sr.commands import send_command
from include.vod_sr.plan import Chunk, FileJob
from include.vod_sr.script import as_run_shell_command, chunk_keys, chunk_list, parse_result_lines, render_sr_script
from include.vod_sr.sources import S3Object
from include.vod_sr.verify import verify_chunks

SECONDS_PER_FILE = 0.2
SOURCE_BUCKET = "synthetic-source"
OUTPUT_BUCKET = "synthetic-output"
FOUR_GPUS = "g6e.12xlarge"
TERMINAL = ("Success", "Failed", "Cancelled", "TimedOut")


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """An emulator of its own, with the stand-in on (the session's emulator runs chunks for real)."""
    with EmulatorProcess(
        tmp_path_factory.mktemp("synthetic"),
        "--pending-seconds",
        "0.3",
        "--stopping-seconds",
        "0.3",
        "--agent-registration-seconds",
        "0.3",
        "--synthetic-sr-seconds",
        str(SECONDS_PER_FILE),
    ) as emulator:
        s3 = boto_client("s3", emulator.endpoint_url)
        for bucket in (SOURCE_BUCKET, OUTPUT_BUCKET):
            s3.create_bucket(Bucket=bucket)
        yield emulator


def bulk_objects(emulator: EmulatorProcess, **request) -> dict:
    data = json.dumps({"bucket": SOURCE_BUCKET, **request}).encode()
    call = urllib.request.Request(f"{emulator.endpoint_url}/_local_aws/s3/bulk-objects", data=data, method="POST")
    with urllib.request.urlopen(call, timeout=30) as response:
        return json.load(response)


@pytest.fixture
def instance(stand_in):
    """A fresh running g6e.12xlarge (4 GPUs) whose agent is Online."""
    ec2, ssm = boto_client("ec2", stand_in.endpoint_url), boto_client("ssm", stand_in.endpoint_url)
    instance_id = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1, InstanceType=FOUR_GPUS)[
        "Instances"
    ][0]["InstanceId"]
    deadline = time.monotonic() + 30
    while not any(
        i["PingStatus"] == "Online"
        for i in ssm.describe_instance_information(Filters=[{"Key": "InstanceIds", "Values": [instance_id]}])[
            "InstanceInformationList"
        ]
    ):
        assert time.monotonic() < deadline, "the emulated agent never came Online"
        time.sleep(0.1)
    return instance_id


class Chunks:
    """Chunks of one run on one instance, sent as run_chunks sends them: file list to S3, rendered script via SSM."""

    def __init__(self, emulator: EmulatorProcess, instance_id: str, run_token: str) -> None:
        self.emulator, self.instance_id, self.run_token = emulator, instance_id, run_token
        self.s3 = boto_client("s3", emulator.endpoint_url)
        self.ssm = boto_client("ssm", emulator.endpoint_url)

    def chunk(self, index: int, keys: list[str]) -> Chunk:
        return Chunk(
            index=index,
            instance_id=self.instance_id,
            files=tuple(
                FileJob(
                    index * 1000 + n,
                    S3Object(SOURCE_BUCKET, key),
                    S3Object(OUTPUT_BUCKET, f"{self.run_token}/{key.removesuffix('.mp4')}_sr.mp4"),
                )
                for n, key in enumerate(keys)
            ),
        )

    def send(self, chunk: Chunk, *, gpus: int = 4, limits: ChunkLimits | None = None, timeout: int = 600) -> str:
        files_key, results_key = chunk_keys(self.run_token, chunk.index)
        self.s3.put_object(Bucket=OUTPUT_BUCKET, Key=files_key, Body=chunk_list(chunk))
        script = render_sr_script(
            BUILTIN_MODELS["cpu"],
            self.run_token,
            chunk.index,
            f"s3://{OUTPUT_BUCKET}/{files_key}",
            f"s3://{OUTPUT_BUCKET}/{results_key}",
            limits,
            gpus=gpus,
        )
        return send_command(
            self.ssm,
            self.instance_id,
            script,
            comment=f"synthetic stand-in test chunk {chunk.index}",
            execution_timeout=timeout,
            delivery_timeout=60,
            output_bucket="",
        )

    def wait(self, command_id: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            invocation = self.ssm.get_command_invocation(CommandId=command_id, InstanceId=self.instance_id)
            if invocation["Status"] in TERMINAL:
                return invocation
            assert time.monotonic() < deadline, invocation["Status"]
            time.sleep(0.1)

    def stored_results(self, chunk: Chunk) -> dict[int, dict[str, object]]:
        body = self.s3.get_object(Bucket=OUTPUT_BUCKET, Key=chunk_keys(self.run_token, chunk.index)[1])["Body"].read()
        return parse_result_lines(body.decode())

    def outputs(self) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=OUTPUT_BUCKET, Prefix=f"{self.run_token}/")
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def gpu_busy(self) -> dict[str, list[list[float]]]:
        return self.emulator.timeline().get(self.instance_id, {}).get("gpu_busy", {})


def sources(emulator: EmulatorProcess, folder: str, count: int) -> list[str]:
    created = bulk_objects(emulator, prefix=f"{folder}/clip-", count=count, bytes=10)
    assert created["created"] == count
    return [f"{folder}/clip-{n:06d}.mp4" for n in range(count)]


def most_at_once(intervals: list[list[float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


class TestChunkScript:
    def test_reads_what_it_needs_from_a_rendered_and_wrapped_chunk_script(self):
        limits = ChunkLimits(budget=600, file_limit=None, lock_wait=1500, backstop=3000)
        script = render_sr_script(
            BUILTIN_MODELS["A"],
            "tok3n",
            7,
            "s3://out/it's.files",
            "s3://out/r.results",
            limits,
            gpus=4,
            streams_per_gpu=2,
        )

        assert chunk_script(as_run_shell_command(script)) == ChunkScript(
            run_token="tok3n",
            chunk_index=7,
            files_uri="s3://out/it's.files",
            results_uri="s3://out/r.results",
            slots=8,
            streams_per_gpu=2,
            lock_wait=1500,
        )

    @pytest.mark.parametrize(
        "commands",
        [
            "echo hello",
            as_run_shell_command("set -euo pipefail\necho '# vod-sr run x chunk 1:'"),
            as_run_shell_command("# vod-sr run x chunk 1: model A\nfiles_uri=\nresults_uri=s3://b/r"),
        ],
        ids=["plain", "header-not-first", "no-files-uri"],
    )
    def test_anything_else_is_not_a_chunk(self, commands):
        assert chunk_script(commands) is None

    def test_outputs_are_the_claimed_source_upscaled(self):
        assert SyntheticSr(1.0, scale=4).media() == ("640x480 10.00 1", "2560x1920 10.00 1")


class TestBulkObjects:
    def test_creates_numbered_objects_of_the_size_asked(self, stand_in):
        s3 = boto_client("s3", stand_in.endpoint_url)

        created = bulk_objects(stand_in, prefix="bulk/a-", count=1500, bytes=3, start=10)

        keys = [
            item["Key"]
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=SOURCE_BUCKET, Prefix="bulk/")
            for item in page["Contents"]
        ]
        assert created == {"created": 1500, "first_key": "bulk/a-000010.mp4", "last_key": "bulk/a-001509.mp4"}
        assert keys == [f"bulk/a-{n:06d}.mp4" for n in range(10, 1510)]
        assert s3.head_object(Bucket=SOURCE_BUCKET, Key="bulk/a-000500.mp4")["ContentLength"] == 3

    def test_missing_bucket_is_refused(self, stand_in):
        with pytest.raises(urllib.error.HTTPError) as refused:
            bulk_objects(stand_in, bucket="no-such-bucket", prefix="x/", count=1)

        assert refused.value.code == 400


class TestSyntheticChunks:
    def test_chunk_succeeds_with_outputs_results_and_gpu_time_that_verify_accepts(self, stand_in, instance):
        chunks = Chunks(stand_in, instance, "run-ok")
        chunk = chunks.chunk(0, sources(stand_in, "ok", 5))
        started = time.time()

        invocation = chunks.wait(chunks.send(chunk))

        printed = parse_result_lines(invocation["StandardOutputContent"])
        assert (invocation["Status"], invocation["ResponseCode"]) == ("Success", 0), invocation
        assert printed == chunks.stored_results(chunk)
        assert sorted(printed) == [job.index for job in chunk.files]
        assert {r["status"] for r in printed.values()} == {"ok"}
        assert {r["qc"] for r in printed.values()} == {QC_FIELD}
        head = chunks.s3.head_object(Bucket=OUTPUT_BUCKET, Key=chunk.files[0].output.key)
        assert head["Metadata"] == {"vod-sr-run": "run-ok"}
        records = verify_chunks(chunks.s3, OUTPUT_BUCKET, "run-ok", [chunk], scale=2.0)
        assert [(r["status"], r["reason"]) for r in records] == [("ok", "")] * 5
        runs = [run for gpu in chunks.gpu_busy().values() for run in gpu]
        assert len(runs) == 5
        assert all(started <= start < end <= time.time() for start, end in runs)
        assert sum(end - start for start, end in runs) == pytest.approx(5 * SECONDS_PER_FILE, abs=0.5)

    def test_the_real_scripts_s3_calls_are_in_the_call_log(self, stand_in, instance):
        chunks = Chunks(stand_in, instance, "run-calls")
        chunk = chunks.chunk(0, sources(stand_in, "calls", 3))
        stand_in.reset_calls()

        chunks.wait(chunks.send(chunk))

        synthetic = [c for c in stand_in.calls() if c.get("synthetic")]
        assert {c["caller"] for c in synthetic} == {"instance"}
        actions = [(c["action"], c["key"]) for c in synthetic]
        files_key, results_key = chunk_keys("run-calls", 0)
        assert actions.count(("GET object", files_key)) == 1
        assert actions.count(("PUT object", results_key)) == 3
        for job in chunk.files:
            assert actions.count(("HEAD object", job.source.key)) == 1
            assert actions.count(("GET object", job.source.key)) == 1
            assert actions.count(("PUT object", job.output.key)) == 1

    def test_chunks_of_one_instance_share_its_slots(self, stand_in, instance):
        chunks = Chunks(stand_in, instance, "run-slots")
        keys = sources(stand_in, "slots", 12)
        sent = [chunks.chunk(n, keys[2 * n : 2 * n + 2]) for n in range(6)]

        command_ids = [chunks.send(chunk) for chunk in sent]  # all at once, as run_chunks keeps them out
        outcomes = [chunks.wait(command_id)["Status"] for command_id in command_ids]

        busy = chunks.gpu_busy()
        assert outcomes == ["Success"] * 6
        assert sorted(busy) == ["0", "1", "2", "3"]  # every GPU of the g6e.12xlarge had work
        assert most_at_once([run for runs in busy.values() for run in runs]) == 4  # never more than its 4 slots
        assert all(most_at_once(runs) == 1 for runs in busy.values())

    def test_missing_source_fails_that_file_and_the_command(self, stand_in, instance):
        chunks = Chunks(stand_in, instance, "run-missing")
        chunk = chunks.chunk(0, [*sources(stand_in, "present", 1), "absent/clip.mp4"])

        invocation = chunks.wait(chunks.send(chunk))

        results = chunks.stored_results(chunk)
        assert (invocation["Status"], invocation["ResponseCode"]) == ("Failed", 1)
        assert [(r["status"], r["stage"]) for _, r in sorted(results.items())] == [("ok", ""), ("failed", "download")]
        assert "1 of 2 file(s) failed" in invocation["StandardErrorContent"]

    def test_cancel_ends_the_chunk_and_frees_its_slot(self, stand_in, instance):
        chunks = Chunks(stand_in, instance, "run-cancel")
        keys = sources(stand_in, "cancel", 22)
        long = chunks.chunk(0, keys[:20])
        command_id = chunks.send(long, gpus=1)
        time.sleep(4 * SECONDS_PER_FILE)

        chunks.ssm.cancel_command(CommandId=command_id, InstanceIds=[instance])
        cancelled = chunks.wait(command_id)
        written = len(chunks.outputs())
        time.sleep(3 * SECONDS_PER_FILE)

        assert cancelled["Status"] == "Cancelled"
        assert 1 <= written < 20
        assert len(chunks.outputs()) == written  # nothing more once cancelled
        assert chunks.wait(command_id)["Status"] == "Cancelled"
        after = chunks.chunk(1, keys[20:])
        assert chunks.wait(chunks.send(after, gpus=1))["Status"] == "Success"  # the only slot was freed

    def test_execution_timeout_ends_it_timed_out(self, stand_in, instance):
        chunks = Chunks(stand_in, instance, "run-timeout")
        chunk = chunks.chunk(0, sources(stand_in, "timeout", 20))

        invocation = chunks.wait(chunks.send(chunk, timeout=1), timeout=30)

        assert (invocation["Status"], invocation["StatusDetails"]) == ("TimedOut", "ExecutionTimedOut")
        assert len(chunks.stored_results(chunk)) < 20

    def test_a_chunk_gives_up_on_a_slot_after_its_lock_wait(self, stand_in, instance):
        chunks = Chunks(stand_in, instance, "run-wait")
        keys = sources(stand_in, "wait", 11)
        holder = chunks.send(chunks.chunk(0, keys[:10]), gpus=1)
        time.sleep(SECONDS_PER_FILE)

        waiter = chunks.chunk(1, keys[10:])
        invocation = chunks.wait(
            chunks.send(waiter, gpus=1, limits=ChunkLimits(budget=60, file_limit=None, lock_wait=1, backstop=600))
        )

        assert (invocation["Status"], invocation["ResponseCode"]) == ("Failed", 1)
        assert [r["stage"] for r in chunks.stored_results(waiter).values()] == [
            "ffmpeg (not started: waited 1 s for a free slot)"
        ]
        assert chunks.wait(holder)["Status"] == "Success"

    def test_any_other_command_still_runs_for_real(self, stand_in, instance):
        chunks = Chunks(stand_in, instance, "run-real")

        command_id = chunks.ssm.send_command(
            InstanceIds=[instance],
            DocumentName="AWS-RunShellScript",
            Parameters={"commands": ["echo really; nvidia-smi -L | wc -l; exit 3"]},
        )["Command"]["CommandId"]
        invocation = chunks.wait(command_id)

        assert (invocation["Status"], invocation["ResponseCode"]) == ("Failed", 3)
        assert invocation["StandardOutputContent"].split() == ["really", "4"]
