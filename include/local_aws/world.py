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
BLUEWHALE_AMI = "ami-0b1ue0000000000aa"  # stands for the vendor's AMI
INSTANCE_PROFILE = "vod-sr-bluewhale"  # the instances' role and instance profile
LAUNCH_TEMPLATE = "vod-sr-bluewhale"


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
    return launch_stopped_instance(endpoint_url)


def launch_stopped_instance(endpoint_url: str, instance_type: str = "g6e.xlarge") -> str:
    """A stopped instance of the Bluewhale AMI; its id. Launched, waited for until running (EC2 refuses to stop an
    instance that never reached `running`), then stopped and waited for."""
    ec2 = boto_client("ec2", endpoint_url)
    instance_id = ec2.run_instances(ImageId=BLUEWHALE_AMI, MinCount=1, MaxCount=1, InstanceType=instance_type)[
        "Instances"
    ][0]["InstanceId"]
    waiter_config = {"Delay": 1, "MaxAttempts": 60}
    ec2.get_waiter("instance_running").wait(InstanceIds=[instance_id], WaiterConfig=waiter_config)
    ec2.stop_instances(InstanceIds=[instance_id])
    ec2.get_waiter("instance_stopped").wait(InstanceIds=[instance_id], WaiterConfig=waiter_config)
    return instance_id


def create_instance_profile(endpoint_url: str, name: str = INSTANCE_PROFILE) -> str:
    """The instances' role and instance profile (if missing), as the operators' IAM setup makes them; the profile's
    ARN."""
    iam = boto_client("iam", endpoint_url)
    try:
        return iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]["Arn"]
    except iam.exceptions.NoSuchEntityException:
        pass
    trust = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
    }
    iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))
    arn = iam.create_instance_profile(InstanceProfileName=name)["InstanceProfile"]["Arn"]
    iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
    return arn


def create_launch_template(
    endpoint_url: str,
    name: str = LAUNCH_TEMPLATE,
    *,
    instance_type: str = "g6e.xlarge",
    spot: bool = False,
    tags: dict[str, str] | None = None,
) -> str:
    """A launch template as the operators keep one: the Bluewhale AMI, an instance type and the instance profile
    (created if missing), Spot when asked, instance tags when given. A template of that name gets a new default
    version instead. Returns the template's id."""
    data: dict[str, Any] = {
        "ImageId": BLUEWHALE_AMI,
        "InstanceType": instance_type,
        "IamInstanceProfile": {"Name": INSTANCE_PROFILE},
    }
    create_instance_profile(endpoint_url)
    if spot:
        data["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {"SpotInstanceType": "one-time"}}
    if tags:
        data["TagSpecifications"] = [
            {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
        ]
    ec2 = boto_client("ec2", endpoint_url)
    try:
        existing = ec2.describe_launch_templates(LaunchTemplateNames=[name])["LaunchTemplates"]
    except ec2.exceptions.ClientError as error:
        if "NotFound" not in error.response["Error"]["Code"]:
            raise
        existing = []
    if not existing:
        return ec2.create_launch_template(LaunchTemplateName=name, LaunchTemplateData=data)["LaunchTemplate"][
            "LaunchTemplateId"
        ]
    template_id = existing[0]["LaunchTemplateId"]
    version = ec2.create_launch_template_version(LaunchTemplateId=template_id, LaunchTemplateData=data)[
        "LaunchTemplateVersion"
    ]["VersionNumber"]
    ec2.modify_launch_template(LaunchTemplateId=template_id, DefaultVersion=str(version))
    return template_id


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
