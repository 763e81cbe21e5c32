from __future__ import annotations

import json
import time
import urllib.parse
from datetime import UTC, datetime

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from include.vod_sr.catalog import ModelError, SrModel, parse_custom_models
from include.vod_sr.plan import Chunk, FileJob
from include.vod_sr.report import BatchFailed, build_report, format_table, raise_if_failed, write_report
from include.vod_sr.script import as_run_shell_command, chunk_keys, chunk_list, script_header
from include.vod_sr.sources import S3Object
from include.vod_sr.verify import Media, media_mismatch, media_summary, unfinished_reason, verify_chunks, verify_file

OUTPUT = "out-bucket"
TOKEN = "1111222233334444"
JOB = FileJob(0, S3Object("src", "a.mp4"), S3Object(OUTPUT, "a_sr.mp4"))
CHUNK = Chunk(0, "i-1", (JOB,))
FILES_KEY, RESULTS_KEY = chunk_keys(TOKEN, 0)
# What the chunk script records for a 10 s 640x480 source with one audio stream and the cpu model's 2x output.
SOURCE_MEDIA, OUTPUT_MEDIA = "640x480 9.92 1", "1280x960 9.92 1"


@pytest.fixture
def s3():
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=OUTPUT)
        yield client


def send_chunk(s3) -> None:
    """What the run does before SendCommand: store the chunk's file list (its time marks "this run")."""
    s3.put_object(Bucket=OUTPUT, Key=FILES_KEY, Body=chunk_list(CHUNK))


def instance_writes(
    s3,
    body: bytes | None,
    result: str = "ok",
    reported_bytes: int | None = None,
    output_media: str = OUTPUT_MEDIA,
    qc: str | None = None,
) -> None:
    """What the chunk script does: upload the output, then the results file (with `qc`, the contact sheet's field,
    as today's script writes it; without, as scripts from before contact sheets did)."""
    if body is not None:
        s3.put_object(Bucket=OUTPUT, Key="a_sr.mp4", Body=body)
    size = len(body or b"") if reported_bytes is None else reported_bytes
    stage = "" if result == "ok" else "ffmpeg"
    qc_field = "" if qc is None else f"\t{qc}"
    line = f"VODSR-RESULT\t0\t{result}\t{size}\t3\t{stage}\t{SOURCE_MEDIA}\t{output_media}{qc_field}\n"
    s3.put_object(Bucket=OUTPUT, Key=RESULTS_KEY, Body=line.encode())


def verify(s3, **options) -> dict:
    (record,) = verify_chunks(s3, OUTPUT, TOKEN, [CHUNK], **options)
    return record


class TestVerify:
    def test_output_written_by_this_run_passes(self, s3):
        send_chunk(s3)
        instance_writes(s3, b"x" * 100)

        record = verify(s3)

        assert (record["status"], record["bytes"]) == ("ok", 100)

    def test_missing_output_fails(self, s3):
        send_chunk(s3)
        instance_writes(s3, None, reported_bytes=10)

        assert verify(s3)["reason"] == "output object missing"

    def test_empty_output_fails(self, s3):
        send_chunk(s3)
        instance_writes(s3, b"")

        assert verify(s3)["reason"] == "output object is empty"

    def test_object_left_by_an_earlier_run_does_not_count(self, s3):
        s3.put_object(Bucket=OUTPUT, Key="a_sr.mp4", Body=b"old output")
        time.sleep(1.1)  # S3 LastModified has one-second resolution
        send_chunk(s3)
        s3.put_object(Bucket=OUTPUT, Key=RESULTS_KEY, Body=result_line(0, 10).encode())

        record = verify(s3)

        assert record["status"] == "failed"
        assert "not written by this run" in record["reason"]

    def test_size_must_match_what_the_instance_wrote(self, s3):
        send_chunk(s3)
        instance_writes(s3, b"x" * 10, reported_bytes=11)

        assert verify(s3)["reason"] == "output is 10 bytes; the instance wrote 11"

    def test_file_the_script_reported_failed_is_failed_even_if_an_object_exists(self, s3):
        send_chunk(s3)
        instance_writes(s3, b"x", result="failed")

        assert verify(s3)["reason"] == "ffmpeg failed on the instance"

    def test_chunk_whose_command_never_finished_fails_its_files(self, s3):
        send_chunk(s3)
        s3.put_object(Bucket=OUTPUT, Key="a_sr.mp4", Body=b"x")  # uploaded, then the instance was stopped

        assert verify(s3)["reason"].startswith("no result from the instance")

    def test_verification_lists_instead_of_heading_each_output(self, s3):
        send_chunk(s3)
        instance_writes(s3, b"x" * 5)
        calls: list[str] = []
        s3.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))

        verify(s3)

        assert sorted(calls) == ["GetObject", "ListObjectsV2", "ListObjectsV2"]


QC_KEY = f"vod-sr-runs/{TOKEN}/qc/0.jpg"


class TestContactSheet:
    """The record names the instance's QC contact sheet; it never decides the file's status."""

    def test_an_uploaded_sheet_is_named_by_its_uri(self, s3):
        send_chunk(s3)
        instance_writes(s3, b"x" * 100, qc=QC_KEY)

        record = verify(s3)

        assert (record["status"], record["qc"], record["qc_reason"]) == ("ok", f"s3://{OUTPUT}/{QC_KEY}", "")

    def test_a_sheet_that_was_not_made_says_why_and_the_file_is_still_ok(self, s3):
        send_chunk(s3)
        instance_writes(s3, b"x" * 100, qc="-ffmpeg could not make the frame")

        record = verify(s3)

        assert (record["status"], record["qc"], record["qc_reason"]) == ("ok", None, "ffmpeg could not make the frame")

    def test_a_line_from_before_contact_sheets(self, s3):
        send_chunk(s3)
        instance_writes(s3, b"x" * 100)  # 8 fields

        record = verify(s3)

        assert (record["status"], record["qc"], record["qc_reason"]) == ("ok", None, "not made")

    def test_a_file_that_failed_on_the_instance_has_none(self, s3):
        send_chunk(s3)
        instance_writes(s3, b"x", result="failed", qc="")

        record = verify(s3)

        assert (record["status"], record["qc"], record["qc_reason"]) == ("failed", None, "not made")

    def test_a_file_verify_fails_keeps_its_sheet_to_look_at(self, s3):
        send_chunk(s3)
        instance_writes(s3, b"x" * 100, output_media="1280x960 0.92 1", qc=QC_KEY)

        record = verify(s3)

        assert record["status"] == "failed"
        assert record["qc"] == f"s3://{OUTPUT}/{QC_KEY}"

    def test_a_file_without_a_result_has_none(self, s3):
        send_chunk(s3)

        record = verify(s3)

        assert (record["qc"], record["qc_reason"]) == (None, "not made")

    def test_a_sheet_named_only_in_the_commands_output(self, s3):
        # The kill fell between the file's result line and its store: the line SSM kept names the sheet.
        s3.put_object(Bucket=OUTPUT, Key=FILES_KEY, Body=chunk_list(THREE))
        s3.put_object(Bucket=OUTPUT, Key="0_sr.mp4", Body=b"x" * 10)
        printed = result_line(0, 10).rstrip("\n") + f"\tvod-sr-runs/{TOKEN}/qc/0.jpg\n"

        records = verify_chunks(s3, OUTPUT, TOKEN, [THREE], ssm=StubSsm(stdout=printed))

        assert (records[0]["status"], records[0]["qc"]) == ("ok", f"s3://{OUTPUT}/vod-sr-runs/{TOKEN}/qc/0.jpg")
        assert [r["qc_reason"] for r in records[1:]] == ["not made", "not made"]


THREE = Chunk(
    0, "i-1", tuple(FileJob(n, S3Object("src", f"{n}.mp4"), S3Object(OUTPUT, f"{n}_sr.mp4")) for n in range(3))
)
COMMAND_ID = "11111111-2222-3333-4444-555555555555"


def result_line(index: int, size: int) -> str:
    return f"VODSR-RESULT\t{index}\tok\t{size}\t3\t\t{SOURCE_MEDIA}\t{OUTPUT_MEDIA}\n"


class StubSsm:
    """ListCommands and GetCommandInvocation for one chunk command that ended `status` (moto's commands all succeed
    at once without running, so it cannot hold a killed one). Records the calls."""

    def __init__(self, status: str = "Cancelled", details: str = "Cancelled", stdout: str = "", token: str = TOKEN):
        script = as_run_shell_command(f"{script_header(token, 0)} model cpu\nset -euo pipefail\n")
        self.command = {
            "CommandId": COMMAND_ID,
            "RequestedDateTime": datetime.now(UTC),
            "Parameters": {"commands": [script], "executionTimeout": ["3600"]},
        }
        self.invocation = {
            "CommandId": COMMAND_ID,
            "InstanceId": "i-1",
            "Status": status,
            "StatusDetails": details,
            "ResponseCode": -1,
            "StandardOutputContent": stdout,
        }
        self.calls: list[str] = []
        self.error: Exception | None = None

    def get_paginator(self, name: str):
        assert name == "list_commands"
        stub = self

        class Paginator:
            def paginate(self, **kwargs):
                stub.calls.append("ListCommands")
                if stub.error is not None:
                    raise stub.error
                assert kwargs["InstanceId"] == "i-1"
                return [{"Commands": [stub.command]}]

        return Paginator()

    def get_command_invocation(self, CommandId: str, InstanceId: str) -> dict:
        self.calls.append("GetCommandInvocation")
        assert (CommandId, InstanceId) == (COMMAND_ID, "i-1")
        return self.invocation


class TestKilledChunk:
    """The chunk's command was killed (SIGKILL: cancel or timeout) after some of its files were done."""

    def start(self, s3, done: dict[int, int], stored: list[int]) -> None:
        s3.put_object(Bucket=OUTPUT, Key=FILES_KEY, Body=chunk_list(THREE))
        for index, size in done.items():
            s3.put_object(Bucket=OUTPUT, Key=f"{index}_sr.mp4", Body=b"x" * size)
        if stored:
            lines = "".join(result_line(index, done[index]) for index in stored)
            s3.put_object(Bucket=OUTPUT, Key=RESULTS_KEY, Body=lines.encode())

    def test_files_done_before_the_kill_are_credited_and_the_rest_name_the_cancel(self, s3):
        # File 1's line was printed, then the kill came before the script stored it.
        self.start(s3, done={0: 10, 1: 20}, stored=[0])
        ssm = StubSsm(stdout=result_line(0, 10) + result_line(1, 20))

        records = verify_chunks(s3, OUTPUT, TOKEN, [THREE], ssm=ssm)

        assert [(r["status"], r["bytes"]) for r in records[:2]] == [("ok", 10), ("ok", 20)]
        assert records[2]["status"] == "failed"
        assert records[2]["reason"] == "not finished when its chunk's command was cancelled"

    def test_missing_results_object_falls_back_to_the_commands_output(self, s3):
        self.start(s3, done={0: 10}, stored=[])
        ssm = StubSsm("TimedOut", "ExecutionTimedOut", stdout="noise\n" + result_line(0, 10))

        records = verify_chunks(s3, OUTPUT, TOKEN, [THREE], ssm=ssm)

        assert [r["status"] for r in records] == ["ok", "failed", "failed"]
        assert "timed out (ExecutionTimedOut" in records[1]["reason"]

    def test_output_printed_but_not_in_s3_is_still_failed(self, s3):
        self.start(s3, done={}, stored=[])

        records = verify_chunks(s3, OUTPUT, TOKEN, [THREE], ssm=StubSsm(stdout=result_line(0, 10)))

        assert records[0]["reason"] == "output object missing"

    def test_another_runs_command_is_not_taken_for_this_chunk(self, s3):
        self.start(s3, done={0: 10}, stored=[])

        records = verify_chunks(s3, OUTPUT, TOKEN, [THREE], ssm=StubSsm(stdout=result_line(0, 10), token="f" * 16))

        assert records[0]["status"] == "failed"
        assert "SSM has no command for its chunk" in records[0]["reason"]

    def test_finished_chunk_costs_no_ssm_call(self, s3):
        self.start(s3, done={0: 1, 1: 1, 2: 1}, stored=[0, 1, 2])
        ssm = StubSsm()

        records = verify_chunks(s3, OUTPUT, TOKEN, [THREE], ssm=ssm)

        assert [r["status"] for r in records] == ["ok", "ok", "ok"]
        assert ssm.calls == []

    def test_unreadable_ssm_still_credits_what_s3_holds(self, s3):
        self.start(s3, done={0: 10}, stored=[0])
        ssm = StubSsm()
        ssm.error = ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "ListCommands")

        records = verify_chunks(s3, OUTPUT, TOKEN, [THREE], ssm=ssm)

        assert [r["status"] for r in records] == ["ok", "failed", "failed"]
        assert records[1]["reason"].startswith("no result from the instance")

    @pytest.mark.parametrize(
        ("status", "details", "words"),
        [
            pytest.param("Cancelled", "Cancelled", "was cancelled", id="cancelled"),
            pytest.param("TimedOut", "ExecutionTimedOut", "timed out", id="execution-timeout"),
            pytest.param("TimedOut", "DeliveryTimedOut", "never delivered", id="delivery-timeout"),
            pytest.param("Failed", "Terminated", "failed (Terminated", id="instance-stopped"),
            pytest.param("InProgress", "InProgress", "still InProgress", id="still-running"),
        ],
    )
    def test_reason_says_how_the_command_ended(self, status, details, words):
        assert words in unfinished_reason({"Status": status, "StatusDetails": details, "ResponseCode": -1})


def media(text: str) -> Media:
    parsed = Media.parse(text)
    assert parsed is not None
    return parsed


class TestMediaChecks:
    def test_figures_parse_with_unknowns(self):
        assert Media.parse("1280x960 9.92 2") == Media(1280, 960, 9.92, 2)
        assert Media.parse("- - 0") == Media(None, None, None, 0)

    @pytest.mark.parametrize("text", ["", "1280x960 9.92", "1280 x 960 1", "axb 1 1", "1x1 soon 1", "1x1 1 -"])
    def test_missing_or_garbled_figures_are_none(self, text):
        assert Media.parse(text) is None

    def test_source_upscaled_passes(self):
        assert media_mismatch(media(SOURCE_MEDIA), media(OUTPUT_MEDIA), scale=2, duration_tolerance=0.5) == ""

    def test_duration_within_the_tolerance_passes(self):
        assert media_mismatch(media(SOURCE_MEDIA), media("1280x960 9.50 1"), scale=2, duration_tolerance=0.5) == ""

    def test_rotated_source_passes_upright(self):
        # ffmpeg applies a portrait phone clip's rotation: stored 640x480, played and upscaled as 960x1280.
        assert media_mismatch(media(SOURCE_MEDIA), media("960x1280 9.92 1"), scale=2, duration_tolerance=0.5) == ""

    def test_cut_short_output_names_both_durations(self):
        reason = media_mismatch(media("640x480 4.92 1"), media("1280x960 0.92 1"), scale=2, duration_tolerance=0.5)

        assert reason == "output video lasts 0.92 s, the source's 4.92 s (tolerance 0.5 s)"

    def test_output_at_the_sources_size_names_the_expected_one(self):
        reason = media_mismatch(media(SOURCE_MEDIA), media("640x480 9.92 1"), scale=2, duration_tolerance=0.5)

        assert reason == "output resolution 640x480, expected 1280x960 (2x the source's 640x480)"

    def test_resolution_follows_the_models_scale(self):
        assert media_mismatch(media(SOURCE_MEDIA), media("2560x1920 9.92 1"), scale=4, duration_tolerance=0.5) == ""
        assert "expected 2560x1920" in media_mismatch(
            media(SOURCE_MEDIA), media(OUTPUT_MEDIA), scale=4, duration_tolerance=0.5
        )

    def test_lost_audio_stream_is_named(self):
        reason = media_mismatch(media("640x480 9.92 2"), media(OUTPUT_MEDIA), scale=2, duration_tolerance=0.5)

        assert reason == "output lost audio: 1 audio stream(s), the source has 2"

    def test_every_mismatch_is_named(self):
        reason = media_mismatch(media(SOURCE_MEDIA), media("640x480 1.00 0"), scale=2, duration_tolerance=0.5)

        assert reason.count("; ") == 2

    @pytest.mark.parametrize(
        ("output", "reason"),
        [
            pytest.param("- - 1", "output has no video stream", id="no-video"),
            pytest.param("1280x960 - 1", "the video's duration is unknown", id="no-duration"),
        ],
    )
    def test_unmeasurable_output_fails(self, output, reason):
        assert media_mismatch(media(SOURCE_MEDIA), media(output), scale=2, duration_tolerance=0.5) == reason

    def test_result_without_figures_fails(self):
        assert media_mismatch(None, None, scale=2, duration_tolerance=0.5).startswith("no media figures")

    def test_verify_fails_a_cut_short_output_and_records_the_figures(self, s3):
        send_chunk(s3)
        instance_writes(s3, b"x" * 100, output_media="1280x960 0.92 1")

        record = verify(s3)

        assert (record["status"], record["reason"]) == (
            "failed",
            "output video lasts 0.92 s, the source's 9.92 s (tolerance 0.5 s)",
        )
        assert record["source_media"] == {"width": 640, "height": 480, "seconds": 9.92, "audio_streams": 1}
        assert media_summary(record) == "640x480, 9.92 s, 1 audio -> 1280x960, 0.92 s, 1 audio"

    def test_verify_takes_the_tolerance_and_scale_it_is_given(self, s3):
        send_chunk(s3)
        instance_writes(s3, b"x" * 100, output_media="2560x1920 8.92 1")

        assert verify(s3)["status"] == "failed"
        assert verify(s3, scale=4, duration_tolerance=1.5)["status"] == "ok"

    def test_custom_model_states_its_scale_and_it_survives_xcom(self):
        spec = {"title": "4x", "video_filter": "scale=iw*4:ih*4", "output_args": ["-c:v", "libx264"]}

        models = parse_custom_models(json.dumps({"x4": {**spec, "scale": 4}, "unstated": spec}))

        assert SrModel.from_xcom(models["x4"].to_xcom()).scale == 4
        assert models["unstated"].scale == 2

    @pytest.mark.parametrize("scale", [0, -2, 100, "2", True, None])
    def test_bad_scale_is_refused(self, scale):
        spec = {"title": "t", "video_filter": "scale=iw*2:ih*2", "output_args": ["-c:v", "libx264"], "scale": scale}

        with pytest.raises(ModelError, match="scale must be a number"):
            parse_custom_models(json.dumps({"bad": spec}))


class TestReport:
    OK = {"index": 0, "source": "s3://src/a.mp4", "output": "s3://o/a.mp4", "status": "ok", "reason": "", "bytes": 5}
    BAD = {
        "index": 1,
        "source": "s3://src/b.mp4",
        "output": "s3://o/b.mp4",
        "status": "failed",
        "reason": "ffmpeg failed",
        "bytes": 0,
    }
    PLANNED = [FileJob(n, S3Object("src", f"{k}.mp4"), S3Object("o", f"{k}.mp4")) for n, k in enumerate("abd")]
    SKIPPED = FileJob(3, S3Object("src", "c.mp4"), S3Object("o", "c.mp4"))
    PARAMS = {"sources": ["a.mp4", "b.mp4"], "prefixes": ["more/"], "manifest": "m.txt", "model": "A"}

    def build(self, verified, planned=None):
        return build_report(
            run_id="r1",
            run_token=TOKEN,
            params=self.PARAMS,
            planned=self.PLANNED[:2] if planned is None else planned,
            verified=verified,
            skipped=[self.SKIPPED],
        )

    def test_counts_and_retry_conf_with_only_the_failures(self):
        report = self.build([[self.OK, self.BAD]])

        assert report["counts"] == {"ok": 1, "failed": 1, "skipped": 1}
        assert report["retry_conf"] == {
            **self.PARAMS,
            "sources": ["s3://src/b.mp4"],
            "prefixes": [],
            "manifest": None,
            "overwrite": True,  # b's output may exist, broken: a re-run must redo it, not skip it
        }

    def test_failed_run_names_files_and_gives_a_paste_ready_conf(self):
        report = self.build([[self.OK, self.BAD]])

        with pytest.raises(BatchFailed) as failure:
            raise_if_failed(report)

        message = str(failure.value)
        assert "s3://src/b.mp4: ffmpeg failed" in message
        conf = json.loads(message.split("trigger with: ", 1)[1])
        assert conf["sources"] == ["s3://src/b.mp4"] and conf["model"] == "A" and conf["prefixes"] == []

    def test_failed_run_gives_a_one_click_link_that_carries_the_retry_conf(self):
        report = build_report(
            run_id="r1",
            run_token=TOKEN,
            params=self.PARAMS,
            planned=self.PLANNED[:2],
            verified=[[self.OK, self.BAD]],
            skipped=[],
            dag_id="vod_sr_batch",
            ui_base_url="https://airflow.example.com/",
        )

        with pytest.raises(BatchFailed) as failure:
            raise_if_failed(report)

        link = urllib.parse.urlsplit(report["rerun_link"])
        assert (link.netloc, link.path) == ("airflow.example.com", "/vod-sr/dags/vod_sr_batch/trigger")
        assert json.loads(urllib.parse.parse_qs(link.query)["conf"][0]) == report["retry_conf"]
        assert f"open {report['rerun_link']}" in str(failure.value)

    def test_a_conf_too_long_for_a_link_gives_the_conf_only(self):
        many = [FileJob(n, S3Object("src", f"{n:05d}-{'x' * 40}.mp4"), S3Object("o", f"{n}.mp4")) for n in range(300)]

        report = build_report(
            run_id="r1", run_token=TOKEN, params=self.PARAMS, planned=many, verified=[], skipped=[], dag_id="d"
        )

        assert report["rerun_link"] is None and len(report["retry_conf"]["sources"]) == 300

    def test_files_of_a_lane_that_never_verified_are_failed_by_name(self):
        report = self.build([[self.OK, self.BAD]], planned=self.PLANNED)

        (unverified,) = [r for r in report["files"] if r["source"] == "s3://src/d.mp4"]
        assert unverified["status"] == "failed" and unverified["reason"].startswith("not verified")
        assert report["retry_conf"]["sources"] == ["s3://src/b.mp4", "s3://src/d.mp4"]

    def test_all_ok_passes(self):
        raise_if_failed(self.build([[self.OK]], planned=self.PLANNED[:1]))

    def test_table_has_a_row_per_file(self):
        table = format_table(self.build([[self.OK, self.BAD]]))

        assert len(table.splitlines()) == 4
        assert "s3://src/b.mp4" in table and "ffmpeg failed" in table

    def test_report_is_stored_as_json(self, s3):
        uri = write_report(s3, OUTPUT, self.build([[self.OK]], planned=self.PLANNED[:1]))

        stored = json.loads(s3.get_object(Bucket=OUTPUT, Key=uri.split(f"{OUTPUT}/", 1)[1])["Body"].read())
        assert stored["counts"] == {"ok": 1, "skipped": 1}


def test_a_chunk_sent_twice_is_read_from_its_first_command_as_run_chunks_keeps_it():
    from datetime import timedelta

    from include.vod_sr.verify import chunk_commands

    first = StubSsm().command
    duplicate = {**first, "CommandId": "duplicate", "RequestedDateTime": first["RequestedDateTime"] + timedelta(1)}

    class TwoCommands:  # ListCommands holding the chunk twice, the duplicate listed first (newest first, as SSM does)
        def get_paginator(self, name: str):
            return self

        def paginate(self, **kwargs):
            return [{"Commands": [duplicate, first]}]

    assert chunk_commands(TwoCommands(), "i-1", TOKEN, first["RequestedDateTime"]) == {0: COMMAND_ID}


class TestSrSeconds:
    """The report shows how long each file's ffmpeg ran on the instance; a file whose ffmpeg never ran has none."""

    @pytest.mark.parametrize(
        ("status", "stage", "expected"),
        [
            ("ok", "", 42),
            ("failed", "ffmpeg", 42),
            ("failed", "ffmpeg (per-file limit 60 s reached)", 42),
            ("failed", "ffmpeg (not started: chunk budget 600 s reached)", None),
            ("failed", "download", None),
        ],
    )
    def test_of_a_file(self, status, stage, expected):
        reported = {"status": status, "bytes": 0, "seconds": 42, "stage": stage, "source_media": "", "output_media": ""}

        record = verify_file(JOB, reported, None, None, results_bucket=OUTPUT)

        assert record["sr_seconds"] == expected
