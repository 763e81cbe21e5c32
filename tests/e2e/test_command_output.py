"""What vod-sr's SSM commands leave behind on the emulator: what install_cli sends and prints."""

from __future__ import annotations

import pytest

from include.local_aws.world import SAMPLE_KEY, boto_client

pytestmark = pytest.mark.e2e


def install_commands(world) -> list[dict]:
    ssm = boto_client("ssm", world.emulator.endpoint_url)
    commands = ssm.list_commands(InstanceId=world.instance_id)["Commands"]
    return [c for c in commands if c["Comment"].endswith(" install AWS CLI")]


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
        assert invocation["StandardOutputContent"].startswith("aws-cli/")  # the version, and nothing installed
