"""vod_sr_batch end to end: dag.test() + emulator + real AWS CLI on the "instance" + real ffmpeg."""

from __future__ import annotations

import json

import pytest

from include.local_aws.world import OUTPUT_BUCKET, SAMPLE_KEY, create_world, probe_video
from include.vod_sr.report import REPORT_PREFIX
from tests.vod_sr.test_script import jpeg_size

pytestmark = pytest.mark.e2e

NASTY_KEY = 'nasty dir/it\'s a "test" $(id); rm -rf ~ 한글 `uname`.mp4'


def output_key(source_key: str) -> str:
    return source_key[: -len(".mp4")] + "_sr_cpu.mp4"


def stored_report(world, run) -> dict:
    reports = [o["Key"] for o in world.s3.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix=REPORT_PREFIX)["Contents"]]
    assert len(reports) == 1
    return json.loads(world.s3.get_object(Bucket=OUTPUT_BUCKET, Key=reports[0])["Body"].read())


def assert_contact_sheets(world, report: dict) -> list[int]:
    """Each ok file's record names its QC contact sheet, a JPEG in the emulator's S3 made of two 640x360 crops (of
    the 1280x960 outputs); returns the JPEGs' sizes in bytes."""
    sizes = []
    for record in report["files"]:
        if record["status"] != "ok":
            continue
        assert (record["qc"] or "").startswith(f"s3://{OUTPUT_BUCKET}/vod-sr-runs/"), record
        assert record["qc_reason"] == ""
        bucket, key = record["qc"].removeprefix("s3://").split("/", 1)
        stored = world.s3.get_object(Bucket=bucket, Key=key)
        jpeg = stored["Body"].read()
        assert stored["ContentType"] == "image/jpeg"
        assert jpeg.startswith(b"\xff\xd8")
        assert jpeg_size(jpeg) == (1280, 360)
        sizes.append(len(jpeg))
    return sizes


def test_two_files_become_verified_2x_outputs_and_the_instance_stops(world, tmp_path, full_clip):
    world.upload(SAMPLE_KEY, full_clip)
    world.upload(NASTY_KEY, full_clip)

    run = world.run(sources=[SAMPLE_KEY, NASTY_KEY])

    assert run.state == "success", run.task_states
    for n, key in enumerate((SAMPLE_KEY, NASTY_KEY)):
        video = probe_video(world.download(output_key(key), tmp_path / f"out-{n}.mp4"))
        assert (video.width, video.height) == (1280, 960)
        assert video.seconds == pytest.approx(10, abs=0.2)
        assert video.has_audio
    assert world.instance_state() == "stopped"
    assert stored_report(world, run)["counts"] == {"ok": 2}
    assert len(assert_contact_sheets(world, stored_report(world, run))) == 2


def test_corrupt_file_fails_the_run_keeps_the_other_output_and_stops_the_instance(world, tmp_path, capfd, caplog):
    world.upload("good.mp4")
    world.upload("corrupt.mp4", body=b"this is not a video" * 100)

    run = world.run(sources=["good.mp4", "corrupt.mp4"])

    assert run.state == "failed"
    assert run.task_states["lane.run_chunks"] == ["failed"]
    assert run.task_states["report"] == ["failed"]
    assert run.task_states["lane.release"] == ["success"]
    logs = capfd.readouterr()
    task_log = caplog.text + logs.out + logs.err
    assert "Invalid data found when processing input" in task_log  # ffmpeg's words, from the instance's stderr
    assert "Status=Failed StatusDetails=Failed exit code=1" in task_log
    assert probe_video(world.download("good_sr_cpu.mp4", tmp_path / "good.mp4")).width == 2 * 320  # 2x the clip
    files = {f["source"].rsplit("/", 1)[-1]: f for f in stored_report(world, run)["files"]}
    assert files["good.mp4"]["status"] == "ok"
    assert files["corrupt.mp4"]["status"] == "failed"
    assert len(assert_contact_sheets(world, stored_report(world, run))) == 1
    assert (files["corrupt.mp4"]["qc"], files["corrupt.mp4"]["qc_reason"]) == (None, "not made")
    assert world.instance_state() == "stopped"
    report = stored_report(world, run)
    assert report["transient_aws_errors"] == 0  # pulled from every lane's run_chunks
    assert report["retry_conf"]["sources"] == ["s3://vod-sr-demo-source/corrupt.mp4"]
    assert report["rerun_link"].startswith("/vod-sr/dags/vod_sr_batch/trigger?conf=")
    assert f"open {report['rerun_link']}" in task_log


def test_bad_input_fails_in_plan_before_any_instance_starts(world):
    world.upload("present.mp4")

    run = world.run(sources=["present.mp4", "absent.mp4"])

    assert run.state == "failed"
    assert run.task_states["plan"] == ["failed"]
    assert run.task_states["lane.acquire"] == ["upstream_failed"]
    assert "StartInstances" not in world.actions()
    assert world.instance_state() == "stopped"


def test_rerun_skips_finished_outputs_without_starting_the_instance(world):
    world.upload(SAMPLE_KEY)
    assert world.run(sources=[SAMPLE_KEY]).state == "success"
    world.emulator.reset_calls()

    rerun = world.run(sources=[SAMPLE_KEY])

    assert rerun.state == "success"
    assert rerun.task_states["lane.acquire"] == ["skipped"]
    assert "StartInstances" not in world.actions()


def test_capacity_error_is_retried_then_the_batch_runs(world):
    world.upload(SAMPLE_KEY)
    world.emulator.set_faults({"instances": {world.instance_id: {"insufficient_capacity_starts": 1}}})

    run = world.run(sources=[SAMPLE_KEY])

    assert run.state == "success", run.task_states
    assert world.actions().count("StartInstances") == 2
    assert world.instance_state() == "stopped"


def test_agent_that_never_comes_online_fails_the_run_and_the_instance_is_stopped(world, monkeypatch):
    monkeypatch.setenv("VOD_SR_AGENT_ONLINE_TIMEOUT", "4")
    world.upload(SAMPLE_KEY)
    world.emulator.set_faults({"instances": {world.instance_id: {"agent_never_online": True}}})

    run = world.run(sources=[SAMPLE_KEY])

    assert run.state == "failed"
    assert run.task_states["lane.wait_for_agent"] == ["failed"]
    assert "SendCommand" not in world.actions()
    assert world.instance_state() == "stopped"


def test_chunks_spread_over_two_instances_and_a_broken_one_does_not_strand_the_other(world, tmp_path):
    healthy = world.instance_id
    broken = create_world(world.emulator.endpoint_url)
    world.ec2.terminate_instances(InstanceIds=[broken])
    keys = [f"spread/{n}.mp4" for n in range(4)]
    for key in keys:
        world.upload(key)

    run = world.run(sources=keys, instance_ids=[healthy, broken], chunk_size=1)

    assert run.state == "failed"
    assert sorted(run.task_states["lane.acquire"]) == ["failed", "success"]
    assert sorted(run.task_states["lane.run_chunks"]) == ["success", "upstream_failed"]
    files = {f["source"].rsplit("/", 1)[-1]: f for f in stored_report(world, run)["files"]}
    # chunks 0 and 2 went to the healthy instance, 1 and 3 to the terminated one
    assert [files[f"{n}.mp4"]["status"] for n in range(4)] == ["ok", "failed", "ok", "failed"]
    assert stored_report(world, run)["retry_conf"]["sources"] == [
        "s3://vod-sr-demo-source/spread/1.mp4",
        "s3://vod-sr-demo-source/spread/3.mp4",
    ]
    assert world.instance_state() == "stopped"


def test_prefix_and_manifest_sources(world):
    world.upload("incoming/a.mp4")
    world.upload("incoming/b.mp4")
    world.upload("incoming/readme.txt", body=b"not a video")
    world.upload("manifests/extra.txt", body=f"{SAMPLE_KEY}\n".encode())
    world.upload(SAMPLE_KEY)

    run = world.run(prefixes=["incoming/"], manifest="manifests/extra.txt")

    assert run.state == "success", run.task_states
    outputs = {o["Key"] for o in world.s3.list_objects_v2(Bucket=OUTPUT_BUCKET)["Contents"]}
    assert {"incoming/a_sr_cpu.mp4", "incoming/b_sr_cpu.mp4", output_key(SAMPLE_KEY)} <= outputs
