"""Test-wide setup: a fresh Airflow home per session, set before anything imports Airflow."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Each session (and each xdist worker) has a home of its own, removed when it ends.
os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="vod-sr-airflow-")
atexit.register(shutil.rmtree, os.environ["AIRFLOW_HOME"], ignore_errors=True)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO_ROOT / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(REPO_ROOT / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
# Unit tests must never reach a real AWS account, whatever the developer's shell holds.
for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
    os.environ.pop(name, None)
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
# Every process a test starts inherits this: `make test` lists any still running with it once pytest has exited.
os.environ.setdefault("VOD_SR_PROCESS_TAG", f"pytest-{os.getpid()}")


def _one_botocore_loader_per_process() -> None:
    """Every botocore session in a test process shares one model loader, so each service model is parsed once per
    process, not once per client.

    botocore caches the JSON models it parses per loader, and each new boto3 session (the Amazon provider's hook makes
    one per client) has a loader of its own. In production a task is a process of its own and pays the parse once;
    `dag.test()` runs every task of every run in the test process, where re-parsing ec2's model for each task took
    more than half of an e2e tier worker's CPU (py-spy: 54% under `JSONFileLoader.load_file`). Sharing the loader is
    what one session would do anyway: the same files, parsed by botocore itself, cached by its own `instance_cache`.
    """
    import functools

    import botocore.session

    botocore.session.create_loader = functools.cache(botocore.session.create_loader)


_one_botocore_loader_per_process()


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


class DurationsRecorder:
    """Writes each test's time (setup + call + teardown) and the session's wall time to `path`, a tab-separated file
    `scripts/durations.py` merges into test-artifacts/durations.txt (`make test` sets VOD_SR_DURATIONS_FILE per tier).
    Under pytest-xdist the reports of every worker reach the controller, which alone writes."""

    def __init__(self, path: Path, tier: str) -> None:
        self.path, self.tier = path, tier
        self.seconds: dict[str, float] = {}
        self.outcomes: dict[str, str] = {}
        self.started = 0.0

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        import time

        self.started = time.monotonic()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration
        if report.when == "call" or report.outcome != "passed":
            self.outcomes[report.nodeid] = report.outcome if not hasattr(report, "wasxfail") else "xfailed"
        else:
            self.outcomes.setdefault(report.nodeid, report.outcome)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = [f"# tier\t{self.tier}\twall\t{time.monotonic() - self.started:.1f}"]
        lines += [f"{seconds:.2f}\t{self.outcomes[nodeid]}\t{nodeid}" for nodeid, seconds in self.seconds.items()]
        self.path.write_text("\n".join(lines) + "\n")


def pytest_configure(config: pytest.Config) -> None:
    path = os.environ.get("VOD_SR_DURATIONS_FILE")
    if path and not hasattr(config, "workerinput"):  # an xdist worker reports to the controller instead
        config.pluginmanager.register(DurationsRecorder(Path(path), Path(path).stem), "vod-sr-durations")
