"""Setting up an emulated deployment: the emulator process, buckets, a stopped GPU instance and sample videos.

Shared by `make demo`, the end-to-end tests and the benchmark, so all three exercise the same world.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

from include.local_aws.server import emulator_client_env

REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCE_BUCKET = "vod-sr-demo-source"
OUTPUT_BUCKET = "vod-sr-demo-output"
SAMPLE_KEY = "original_640x480_10s.mp4"  # the seed procedure's sample file name


class EmulatorProcess:
    """`python -m include.local_aws` as a child process on a free port."""

    def __init__(self, state_dir: Path, *extra_args: str) -> None:
        self.state_dir = state_dir
        self.extra_args = extra_args
        self.process: subprocess.Popen[str] | None = None
        self.endpoint_url = ""

    def start(self) -> EmulatorProcess:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "include.local_aws",
                "--port",
                "0",
                "--state-dir",
                str(self.state_dir),
                *self.extra_args,
            ],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # stop() ends the emulator with every command its agents are still running
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if "ready at" not in line:
            self.stop()
            raise RuntimeError(f"the emulator did not start: {line!r}")
        self.endpoint_url = line.rsplit(" ", 1)[-1].strip()
        return self

    def stop(self) -> None:
        from include.local_aws.services import stop_process_group

        if self.process is not None:
            stop_process_group(self.process)

    def env(self) -> dict[str, str]:
        return emulator_client_env(self.endpoint_url)

    def _control(self, path: str, payload: Any | None = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            f"{self.endpoint_url}/_local_aws/{path}", data=data, method="POST" if data is not None else "GET"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def calls(self) -> list[dict[str, Any]]:
        return self._control("calls")

    def timeline(self) -> dict[str, Any]:
        return self._control("timeline")

    def reset_calls(self) -> None:
        self._control("calls/reset", {})

    def set_faults(self, faults: dict[str, Any]) -> None:
        self._control("faults", faults)

    def set_last_modified(self, bucket: str, key: str, when: datetime) -> None:
        """Date an object as if uploaded at `when` (a tz-aware datetime)."""
        self._control("s3/last-modified", {"bucket": bucket, "key": key, "last_modified": when.isoformat()})

    def __enter__(self) -> EmulatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def airflow_env(endpoint_url: str, instance_id: str, poll_interval: int = 1) -> dict[str, str]:
    """Environment for Airflow processes that run vod_sr_batch against the emulator."""
    connection = {"conn_type": "aws", "extra": {"endpoint_url": endpoint_url, "region_name": "us-east-1"}}
    return {
        **emulator_client_env(endpoint_url),
        "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(connection),
        "VOD_SR_INSTANCE_IDS": instance_id,
        "VOD_SR_SOURCE_BUCKET": SOURCE_BUCKET,
        "VOD_SR_OUTPUT_BUCKET": OUTPUT_BUCKET,
        "VOD_SR_DEFAULT_MODEL": "cpu",
        "VOD_SR_POLL_INTERVAL": str(poll_interval),
    }


def boto_client(service: str, endpoint_url: str, config: Any = None) -> Any:
    """A boto3 client for the emulator; `config` is an optional botocore Config (retries, say)."""
    import boto3

    env = emulator_client_env(endpoint_url)
    return boto3.client(
        service,
        endpoint_url=endpoint_url,
        region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        config=config,
    )


def create_world(endpoint_url: str) -> str:
    """Buckets (if missing) and a stopped g6e instance; returns the instance id."""
    s3 = boto_client("s3", endpoint_url)
    existing = {b["Name"] for b in s3.list_buckets()["Buckets"]}
    for bucket in (SOURCE_BUCKET, OUTPUT_BUCKET):
        if bucket not in existing:
            s3.create_bucket(Bucket=bucket)
    ec2 = boto_client("ec2", endpoint_url)
    instance_id = ec2.run_instances(ImageId="ami-0b1ue0000000000aa", MinCount=1, MaxCount=1, InstanceType="g6e.xlarge")[
        "Instances"
    ][0]["InstanceId"]
    ec2.stop_instances(InstanceIds=[instance_id])
    ec2.get_waiter("instance_stopped").wait(InstanceIds=[instance_id], WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    return instance_id


def make_sample_clip(path: Path, seconds: int = 10, size: str = "640x480") -> Path:
    """A test-pattern clip with a tone, like the seed's original_640x480_10s.mp4 (H.264 + AAC)."""
    import imageio_ffmpeg

    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-y",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            f"testsrc2=size={size}:rate=25:duration={seconds}",
            "-f",
            "lavfi",
            "-i",
            f"sine=frequency=440:duration={seconds}",
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            "-shortest",
            str(path),
        ],
        check=True,
    )
    return path


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    seconds: float
    has_audio: bool


def probe_video(path: Path) -> VideoInfo:
    """Resolution, duration and audio presence, read with PyAV (the imageio-ffmpeg wheel has no ffprobe)."""
    import av

    with av.open(str(path)) as container:
        video = container.streams.video[0]
        duration = (
            float(container.duration / 1_000_000)
            if container.duration
            else float(video.duration * Fraction(video.time_base))
        )
        return VideoInfo(video.codec_context.width, video.codec_context.height, duration, bool(container.streams.audio))
