from __future__ import annotations

import json

import boto3
import pytest
from moto import mock_aws

from include.vod_sr.plan import Chunk, FileJob
from include.vod_sr.report import BatchFailed, build_report, format_table, raise_if_failed, write_report
from include.vod_sr.sources import S3Object
from include.vod_sr.verify import RUN_METADATA_KEY, verify_chunk, verify_file

OUTPUT = "out-bucket"
TOKEN = "1111222233334444"
JOB = FileJob(0, S3Object("src", "a.mp4"), S3Object(OUTPUT, "a_sr.mp4"))


@pytest.fixture
def s3():
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=OUTPUT)
        yield client


def upload(s3, key: str, body: bytes, token: str | None = TOKEN) -> None:
    metadata = {RUN_METADATA_KEY: token} if token else {}
    s3.put_object(Bucket=OUTPUT, Key=key, Body=body, Metadata=metadata)


class TestVerifyFile:
    def test_output_written_by_this_run_passes(self, s3):
        upload(s3, "a_sr.mp4", b"x" * 100)

        record = verify_file(s3, JOB, TOKEN, {"status": "ok", "bytes": 100})

        assert (record["status"], record["bytes"]) == ("ok", 100)

    def test_missing_output_fails(self, s3):
        assert verify_file(s3, JOB, TOKEN, None)["reason"] == "output object missing"

    def test_empty_output_fails(self, s3):
        upload(s3, "a_sr.mp4", b"")

        assert verify_file(s3, JOB, TOKEN, None)["reason"] == "output object is empty"

    @pytest.mark.parametrize("earlier", ["9999888877776666", None], ids=["other-run", "no-token"])
    def test_object_left_by_an_earlier_run_does_not_count(self, s3, earlier):
        upload(s3, "a_sr.mp4", b"old output", token=earlier)

        record = verify_file(s3, JOB, TOKEN, None)

        assert record["status"] == "failed"
        assert "not written by this run" in record["reason"]

    def test_size_must_match_what_the_instance_wrote(self, s3):
        upload(s3, "a_sr.mp4", b"x" * 10)

        record = verify_file(s3, JOB, TOKEN, {"status": "ok", "bytes": 11})

        assert record["reason"] == "output is 10 bytes; the instance wrote 11"

    def test_file_the_script_reported_failed_is_failed_even_if_an_object_exists(self, s3):
        upload(s3, "a_sr.mp4", b"x")

        record = verify_file(s3, JOB, TOKEN, {"status": "failed", "stage": "ffmpeg"})

        assert record["reason"].startswith("ffmpeg failed on the instance")

    def test_chunk_without_a_result_line_for_a_file_fails_that_file(self, s3):
        upload(s3, "a_sr.mp4", b"x")
        chunk = Chunk(0, "i-1", (JOB,))

        (record,) = verify_chunk(s3, chunk, TOKEN, results={})

        assert record["status"] == "failed"


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
    SKIPPED = FileJob(2, S3Object("src", "c.mp4"), S3Object("o", "c.mp4"))
    PARAMS = {"sources": ["a.mp4", "b.mp4", "c.mp4"], "model": "A", "overwrite": False}

    def build(self, verified, planned_count=2):
        return build_report(
            run_id="r1",
            run_token=TOKEN,
            params=self.PARAMS,
            verified=verified,
            skipped=[self.SKIPPED],
            planned_count=planned_count,
        )

    def test_counts_and_retry_conf_with_only_the_failures(self):
        report = self.build([[self.OK, self.BAD]])

        assert report["counts"] == {"ok": 1, "failed": 1, "skipped": 1}
        assert report["retry_conf"] == {**self.PARAMS, "sources": ["s3://src/b.mp4"]}

    def test_failed_run_names_files_and_gives_a_paste_ready_conf(self):
        report = self.build([[self.OK, self.BAD]])

        with pytest.raises(BatchFailed) as failure:
            raise_if_failed(report)

        message = str(failure.value)
        assert "s3://src/b.mp4: ffmpeg failed" in message
        conf = json.loads(message.split("trigger with: ", 1)[1])
        assert conf["sources"] == ["s3://src/b.mp4"] and conf["model"] == "A"

    def test_chunks_that_never_verified_fail_the_run(self):
        report = self.build([[self.OK]], planned_count=3)

        with pytest.raises(BatchFailed, match="2 file\\(s\\) not verified"):
            raise_if_failed(report)

    def test_all_ok_passes(self):
        raise_if_failed(self.build([[self.OK]], planned_count=1))

    def test_table_has_a_row_per_file(self):
        table = format_table(self.build([[self.OK, self.BAD]]))

        assert len(table.splitlines()) == 4
        assert "s3://src/b.mp4" in table and "ffmpeg failed" in table

    def test_report_is_stored_as_json(self, s3):
        uri = write_report(s3, OUTPUT, self.build([[self.OK]], planned_count=1))

        stored = json.loads(s3.get_object(Bucket=OUTPUT, Key=uri.split(f"{OUTPUT}/", 1)[1])["Body"].read())
        assert stored["counts"] == {"ok": 1, "skipped": 1}
