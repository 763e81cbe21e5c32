"""Every GPU of a multi-GPU instance busy: vod_sr_batch (dag.test() on the emulator, real AWS CLI and ffmpeg) on an
emulated g6e.12xlarge. The emulator gives the instance four GPUs through a stand-in `nvidia-smi` and records each
model ffmpeg run by the GPU it was given (CUDA_VISIBLE_DEVICES) through a stand-in `ffmpeg` wrapper (gpus.py)."""

from __future__ import annotations

import pytest

from include.local_aws.world import launch_stopped_instance

pytestmark = pytest.mark.e2e


def max_overlap(intervals: list[list[float]]) -> int:
    """The most intervals open at one moment."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    open_now = peak = 0
    for _, step in edges:
        open_now += step
        peak = max(peak, open_now)
    return peak


@pytest.fixture
def four_gpu_instance(world, monkeypatch):
    instance_id = launch_stopped_instance(world.emulator.endpoint_url, "g6e.12xlarge")
    monkeypatch.setenv("VOD_SR_INSTANCE_IDS", instance_id)
    return instance_id


def test_a_four_gpu_instance_keeps_four_ffmpeg_runs_going(world, four_gpu_instance, full_clip):
    keys = [f"gpus/clip {n}.mp4" for n in range(8)]
    for key in keys:
        world.upload(key, full_clip)  # model runs long enough to overlap

    run = world.run(sources=keys, chunk_size=1)

    assert run.state == "success", run.task_states
    timeline = world.emulator.timeline()[four_gpu_instance]
    assert timeline["gpus"] == 4
    busy = timeline["gpu_busy"]
    assert sorted(busy) == ["0", "1", "2", "3"]  # each GPU ran model ffmpeg runs
    assert sum(len(runs) for runs in busy.values()) == 8
    assert max_overlap([interval for runs in busy.values() for interval in runs]) == 4  # four at once


def test_two_streams_per_gpu_run_two_chunks_on_each_gpu(world, monkeypatch, full_clip):
    """A 1-GPU instance with VOD_SR_STREAMS_PER_GPU=2: two chunks at once, both on GPU 0."""
    monkeypatch.setenv("VOD_SR_STREAMS_PER_GPU", "2")
    keys = [f"streams/clip {n}.mp4" for n in range(4)]
    for key in keys:
        world.upload(key, full_clip)  # model runs long enough to overlap

    run = world.run(sources=keys, chunk_size=1)

    assert run.state == "success", run.task_states
    busy = world.emulator.timeline()[world.instance_id]["gpu_busy"]
    assert list(busy) == ["0"] and len(busy["0"]) == 4
    assert max_overlap(busy["0"]) == 2
