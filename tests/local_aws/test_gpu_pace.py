"""The emulator's ffmpeg stand-in paced to a GPU (`InstanceFaults.model_run_seconds`): a model run lasts a fixed time
whatever the host's CPU load, so a benchmark on a 2-core machine measures the orchestration. Real bash; a stub in
place of the real ffmpeg (it only has to end)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from include.local_aws.faults import InstanceFaults
from include.local_aws.gpus import GPU_BUSY_LOG, ffmpeg_stand_in, read_gpu_busy


def stand_in(tmp_path, pace: float | None, real: str = "/bin/true"):
    path = tmp_path / "ffmpeg"
    path.write_text(ffmpeg_stand_in(real, tmp_path / GPU_BUSY_LOG, pace))
    path.chmod(0o755)
    return path


def run(path, *, model_run: bool, **env: str) -> float:
    started = time.monotonic()
    marks = {"VOD_SR_SR_RUN": "1", "CUDA_VISIBLE_DEVICES": "2"} if model_run else {}
    subprocess.run([str(path), "-i", "x"], env={"PATH": "/usr/bin:/bin", **marks, **env}, check=True, timeout=30)
    return time.monotonic() - started


def test_a_paced_model_run_lasts_the_pace_and_is_logged_on_its_gpu(tmp_path):
    elapsed = run(stand_in(tmp_path, 1.5), model_run=True)

    assert 1.5 <= elapsed < 5
    ((start, end),) = read_gpu_busy(tmp_path)["2"]
    assert end - start >= 1.45


def test_measurements_and_contact_sheets_are_not_paced(tmp_path):
    assert run(stand_in(tmp_path, 3), model_run=False) < 1
    assert read_gpu_busy(tmp_path) == {}


def test_without_a_pace_a_model_run_takes_what_ffmpeg_takes(tmp_path):
    assert run(stand_in(tmp_path, None), model_run=True) < 1


def test_a_term_during_the_pace_ends_the_run(tmp_path):
    # The chunk script's `timeout --foreground` signals only the stand-in: a limit reached must still end the run.
    process = subprocess.Popen(
        [str(stand_in(tmp_path, 30)), "-i", "x"], env={"PATH": "/usr/bin:/bin", "VOD_SR_SR_RUN": "1"}
    )
    time.sleep(1)
    started = time.monotonic()
    os.kill(process.pid, signal.SIGTERM)
    process.wait(timeout=10)

    assert time.monotonic() - started < 3
    assert len(read_gpu_busy(tmp_path)["-"]) == 1


def test_the_pace_is_a_fault_setting_of_the_instance():
    faults = InstanceFaults.from_json({"model_run_seconds": 12.5})

    assert faults.model_run_seconds == 12.5
    assert InstanceFaults().model_run_seconds is None
