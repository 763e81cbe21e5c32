"""Test-wide setup: a fresh Airflow home per session, set before anything imports Airflow."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="vod-sr-airflow-")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO_ROOT / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(REPO_ROOT / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
# Unit tests must never reach a real AWS account, whatever the developer's shell holds.
for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
    os.environ.pop(name, None)
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
# Every process a test starts inherits this: `make test` lists any still running with it once pytest has exited.
os.environ.setdefault("VOD_SR_PROCESS_TAG", f"pytest-{os.getpid()}")


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    """The local AWS emulator (`python -m include.local_aws`) in a child process, shared by the session."""
    from include.local_aws.world import EmulatorProcess

    with EmulatorProcess(
        tmp_path_factory.mktemp("emulator"),
        "--pending-seconds",
        "0.5",
        "--stopping-seconds",
        "0.5",
        "--agent-registration-seconds",
        "0.5",
    ) as process:
        yield process


@pytest.fixture
def emulator_env(emulator, monkeypatch):
    """Point boto3, the AWS CLI and the `aws_default` Airflow connection at the emulator for one test."""
    from include.local_aws.world import airflow_env

    for name, value in airflow_env(emulator.endpoint_url, instance_id="").items():
        monkeypatch.setenv(name, value)
    yield emulator
    emulator.set_faults({"defaults": {}, "throttle_fraction": 0.0})


@pytest.fixture
def running_instance(emulator_env):
    """A fresh emulated instance whose SSM agent is Online."""
    import time

    from include.local_aws.world import boto_client

    ec2, ssm = boto_client("ec2", emulator_env.endpoint_url), boto_client("ssm", emulator_env.endpoint_url)
    instance_id = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    deadline = time.monotonic() + 30
    while not any(
        i["PingStatus"] == "Online"
        for i in ssm.describe_instance_information(Filters=[{"Key": "InstanceIds", "Values": [instance_id]}])[
            "InstanceInformationList"
        ]
    ):
        assert time.monotonic() < deadline, "the emulated agent never came Online"
        time.sleep(0.2)
    return instance_id
