"""No false success from a broken output: the instance measures each source and output with its own ffmpeg, and
verify fails an output that is not its source upscaled (resolution, video duration, audio streams).

The models are what an operator can put in the `vod_sr_models` Variable; the emulated instance runs them with real
ffmpeg and the real AWS CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from include.local_aws.world import make_sample_clip, probe_video
from include.vod_sr.catalog import parse_custom_models
from include.vod_sr.verify import verify_chunks
from tests.e2e.test_batch_e2e import stored_report
from tests.e2e.test_killed_chunks import EmulatedInstance

pytestmark = pytest.mark.e2e

X264 = ["-c:v", "libx264", "-preset", "veryfast", "-c:a", "copy"]
# Keeps only the first second of the picture and copies the whole audio: the file's (container) duration is still
# the source's, so it looks whole to anything but the video stream's own duration.
CUT_MODEL = {"title": "2x, picture cut to 1 s", "video_filter": "trim=duration=1,scale=iw*2:ih*2", "output_args": X264}
CLIP_SECONDS = 5


@pytest.fixture(scope="module")
def five_second_clip(tmp_path_factory) -> Path:
    return make_sample_clip(tmp_path_factory.mktemp("media-checks") / "5s.mp4", seconds=CLIP_SECONDS)


def only_file(world, run) -> dict:
    (record,) = stored_report(world, run)["files"]
    return record


def test_output_cut_to_one_second_of_a_five_second_source_fails_the_run(world, five_second_clip, tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_VAR_VOD_SR_MODELS", json.dumps({"cut": CUT_MODEL}))
    world.upload("clip.mp4", five_second_clip)

    run = world.run(sources=["clip.mp4"], custom_model="cut")

    assert run.state == "failed"
    assert run.task_states["lane.run_chunks"] == ["success"]  # ffmpeg was happy with the model
    record = only_file(world, run)
    assert record["status"] == "failed"
    assert record["reason"].startswith("output video lasts 0.9")
    assert record["reason"].endswith(f"the source's {record['source_media']['seconds']:.2f} s (tolerance 0.5 s)")
    assert record["output_media"]["seconds"] < 1.1
    assert (record["output_media"]["width"], record["output_media"]["height"]) == (1280, 960)
    # What existence, size and timing checks saw: a non-empty object of this run, as long as its source.
    output = probe_video(world.download("clip_sr_cut.mp4", tmp_path / "cut.mp4"))
    assert output.seconds == pytest.approx(CLIP_SECONDS, abs=0.2)
    assert record["bytes"] > 0


def test_cpu_model_output_passes_and_the_report_shows_its_figures(world, five_second_clip):
    world.upload("clip.mp4", five_second_clip)

    run = world.run(sources=["clip.mp4"])

    assert run.state == "success", run.task_states
    record = only_file(world, run)
    assert (record["status"], record["reason"]) == ("ok", "")
    source, output = record["source_media"], record["output_media"]
    assert (source["width"], source["height"], source["audio_streams"]) == (640, 480, 1)
    assert (output["width"], output["height"], output["audio_streams"]) == (1280, 960, 1)
    assert output["seconds"] == pytest.approx(source["seconds"], abs=0.1)
    assert source["seconds"] == pytest.approx(CLIP_SECONDS, abs=0.2)


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        pytest.param(
            {"title": "claims 2x, keeps the size", "video_filter": "scale=iw:ih", "output_args": X264},
            "output resolution 320x240, expected 640x480 (2x the source's 320x240)",
            id="not-upscaled",
        ),
        pytest.param(
            {
                "title": "2x, drops the audio",
                "video_filter": "scale=iw*2:ih*2",
                "output_args": ["-c:v", "libx264", "-an"],
            },
            "output lost audio: 0 audio stream(s), the source has 1",
            id="audio-dropped",
        ),
        pytest.param(
            {"title": "states 4x, is 4x", "video_filter": "scale=iw*4:ih*4", "output_args": X264, "scale": 4},
            "",
            id="stated-4x",
        ),
    ],
)
def test_model_output_is_judged_against_the_source_and_the_models_scale(
    spec, reason, running_instance, emulator_env, tmp_path
):
    model = parse_custom_models(json.dumps({"custom": spec}))["custom"]
    clip = make_sample_clip(tmp_path / "clip.mp4", seconds=2, size="320x240")
    instance = EmulatedInstance(emulator_env.endpoint_url, running_instance)
    instance.s3.upload_file(str(clip), instance.source_bucket, "clip.mp4")
    chunk = instance.chunk(0, 0, ["clip.mp4"])

    invocation = instance.run(chunk, model, execution_timeout=120)

    assert invocation["Status"] == "Success"  # ffmpeg and the upload succeeded: only the figures tell
    (record,) = verify_chunks(instance.s3, instance.output_bucket, instance.run_token, [chunk], scale=model.scale)
    assert (record["status"], record["reason"]) == ("ok" if not reason else "failed", reason)
