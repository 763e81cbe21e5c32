"""What vod-sr's SSM commands leave behind on the emulator: their whole output in S3, what the log and the report
show of it when a command fails, and what run_chunks sends first to install the CLI and prints.

GetCommandInvocation returns only the first 24,000 characters of stdout and 8,000 of stderr, so the end of a long
output, where the error usually is, is only in the copy SSM's agent writes to S3 (OutputS3BucketName).
"""

from __future__ import annotations

import time
import uuid

import pytest

from include.local_aws.world import OUTPUT_BUCKET, SAMPLE_KEY, boto_client
from include.vod_sr.commands import CommandFailed, get_invocation, run_and_wait, send_command
from include.vod_sr.instance import command_comment
from include.vod_sr.operators import RunChunksOperator
from tests.e2e.test_batch_e2e import stored_report

pytestmark = pytest.mark.e2e

# About 20,000 characters of stderr (400 lines of noise), then the line that says what went wrong.
LONG_STDERR = (
    "yes '[h264 @ 0x55d0c0ffee00] error while decoding MB 12 34, bytestream -5' | head -n 400 >&2\n"
    "echo 'THE REAL ERROR' >&2\n"
    "exit 1\n"
)
LAYOUT = "{prefix}{command_id}/{instance_id}/awsrunShellScript/0.awsrunShellScript/{stream}"


def ended(ssm, command_id: str, instance_id: str) -> dict:
    deadline = time.monotonic() + 60
    while (invocation := get_invocation(ssm, command_id, instance_id)) is None or invocation["Status"] in (
        "Pending",
        "InProgress",
        "Delayed",
    ):
        assert time.monotonic() < deadline, "the command never ended"
        time.sleep(0.3)
    return invocation


@pytest.fixture
def output_bucket(emulator_env) -> str:
    s3 = boto_client("s3", emulator_env.endpoint_url)
    if OUTPUT_BUCKET not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=OUTPUT_BUCKET)
    return OUTPUT_BUCKET  # also the deployment's (VOD_SR_OUTPUT_BUCKET), which emulator_env sets


class TestTheAgentStoresTheWholeOutput:
    def test_at_the_aws_key_layout_while_get_command_invocation_stays_truncated(
        self, running_instance, output_bucket, emulator_env
    ):
        ssm, s3 = boto_client("ssm", emulator_env.endpoint_url), boto_client("s3", emulator_env.endpoint_url)
        prefix = f"vod-sr-runs/{uuid.uuid4().hex[:16]}/ssm-output/"
        written = {"stdout": b"o\n" * 15_000, "stderr": b"e\n" * 5_000}  # 30,000 and 10,000 characters

        command_id = ssm.send_command(
            InstanceIds=[running_instance],
            DocumentName="AWS-RunShellScript",
            Parameters={"commands": ["yes o | head -c 30000; yes e | head -c 10000 >&2"]},
            OutputS3BucketName=output_bucket,
            OutputS3KeyPrefix=prefix,
        )["Command"]["CommandId"]
        invocation = ended(ssm, command_id, running_instance)

        assert (len(invocation["StandardOutputContent"]), len(invocation["StandardErrorContent"])) == (24_000, 8_000)
        for stream, url_field in (("stdout", "StandardOutputUrl"), ("stderr", "StandardErrorUrl")):
            key = LAYOUT.format(prefix=prefix, command_id=command_id, instance_id=running_instance, stream=stream)
            assert s3.get_object(Bucket=output_bucket, Key=key)["Body"].read() == written[stream]
            assert invocation[url_field].endswith(f"/{output_bucket}/{key}")
        (command,) = ssm.list_commands(CommandId=command_id)["Commands"]
        assert (command["OutputS3BucketName"], command["OutputS3KeyPrefix"]) == (output_bucket, prefix)


class TestAFailedCommandShowsTheEndOfItsOutput:
    def test_a_failed_chunks_log_shows_the_real_end_of_a_long_stderr_and_its_link(
        self, running_instance, output_bucket, emulator_env, capsys, caplog
    ):
        ssm = boto_client("ssm", emulator_env.endpoint_url)
        token = uuid.uuid4().hex[:16]
        # Sent as run_chunks sends a chunk: the comment names the run, the output bucket is the deployment's.
        command_id = send_command(
            ssm,
            running_instance,
            LONG_STDERR,
            comment=command_comment(token, "chunk 0 (1 files)"),
            execution_timeout=60,
            delivery_timeout=30,
        )
        ended(ssm, command_id, running_instance)
        lane = {"instance_id": running_instance, "run_token": token, "output_bucket": output_bucket, "chunks": [{}]}
        operator = RunChunksOperator(task_id="run_chunks", lane=lane)

        operator._report_end(
            {"chunk": 0, "command_id": command_id, "instance_id": running_instance, "outcome": "failed"}
        )

        log = caplog.text + capsys.readouterr().out
        key = LAYOUT.format(
            prefix=f"vod-sr-runs/{token}/ssm-output/", command_id=command_id, instance_id=running_instance, stream=""
        )
        assert f"last 20 lines of stderr (all of it: s3://{output_bucket}/{key}stderr)" in log
        assert "THE REAL ERROR" in log

    def test_a_failed_install_names_the_real_end_of_its_stderr_and_its_link(
        self, running_instance, output_bucket, emulator_env
    ):
        ssm, s3 = boto_client("ssm", emulator_env.endpoint_url), boto_client("s3", emulator_env.endpoint_url)
        token = uuid.uuid4().hex[:16]

        with pytest.raises(CommandFailed) as failure:
            run_and_wait(
                ssm,
                running_instance,
                LONG_STDERR,
                comment=command_comment(token, "install AWS CLI"),
                timeout=60,
                poll_interval=1,
                delivery_timeout=30,
                output_bucket=output_bucket,
                s3=s3,
            )

        message = str(failure.value)
        assert message.rstrip().endswith("THE REAL ERROR")
        assert f"(all of it: s3://{output_bucket}/vod-sr-runs/{token}/ssm-output/" in message


class TestAFailedRun:
    def test_links_the_whole_output_of_its_commands_in_the_log_and_the_report(self, world, capfd, caplog):
        world.upload("good.mp4")
        world.upload("corrupt.mp4", body=b"this is not a video" * 100)

        run = world.run(sources=["good.mp4", "corrupt.mp4"])

        assert run.state == "failed"
        report = stored_report(world, run)
        prefix = f"vod-sr-runs/{report['run_token']}/ssm-output/"
        assert report["command_output"] == f"s3://{OUTPUT_BUCKET}/{prefix}"
        stored = [o["Key"] for o in world.s3.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix=prefix)["Contents"]]
        (chunk_stderr,) = [
            key
            for key in stored
            if key.endswith("/stderr")
            and b"Invalid data found" in world.s3.get_object(Bucket=OUTPUT_BUCKET, Key=key)["Body"].read()
        ]
        logs = capfd.readouterr()
        task_log = caplog.text + logs.out + logs.err
        assert f"(all of it: s3://{OUTPUT_BUCKET}/{chunk_stderr})" in task_log  # run_chunks' log of the chunk
        assert f"whole output of the run's SSM commands: s3://{OUTPUT_BUCKET}/{prefix}" in task_log  # the report
        # The deferred wait's progress line for the two-file chunk, with its final count.
        assert f"chunk 1/1 on {world.instance_id}: 2/2 files done (1 failed); its command ended (failed)" in task_log


class TestInstallCliOnTheEmulatedInstance:
    """The emulated instance has the AWS CLI on its PATH, as an AMI with the CLI baked in does."""

    def test_skip_setting_only_checks_the_cli(self, world, monkeypatch):
        monkeypatch.setenv("VOD_SR_SKIP_CLI_INSTALL", "true")  # read when the DAG file is parsed
        world.upload(SAMPLE_KEY)

        run = world.run(sources=[SAMPLE_KEY])

        assert run.state == "success", run.task_states
        (command,) = install_commands(world)
        script = command["Parameters"]["commands"][0]
        assert "aws --version" in script and "apt-get" not in script and "awscli-exe" not in script
        invocation = boto_client("ssm", world.emulator.endpoint_url).get_command_invocation(
            CommandId=command["CommandId"], InstanceId=world.instance_id
        )
        # the GPU count (the install command counts them), then the version, and nothing installed
        assert invocation["StandardOutputContent"].splitlines()[0] == "vod-sr: gpus=1"
        assert invocation["StandardOutputContent"].splitlines()[1].startswith("aws-cli/")


def install_commands(world) -> list[dict]:
    ssm = boto_client("ssm", world.emulator.endpoint_url)
    commands = ssm.list_commands(InstanceId=world.instance_id)["Commands"]
    return [c for c in commands if c["Comment"].endswith(" install AWS CLI")]
