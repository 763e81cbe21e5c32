"""Deployment files: the IAM policies in iam/ grant what the code calls to the right principal; compose is sane."""

from __future__ import annotations

import json

from tests.conftest import REPO_ROOT


def actions(name: str) -> set[str]:
    policy = json.loads((REPO_ROOT / "iam" / name).read_text())
    found: set[str] = set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        value = statement["Action"]
        found.update([value] if isinstance(value, str) else value)
    return found


def test_the_sender_is_airflow_not_the_instance():
    # The seed gave ssm:SendCommand to the instance role; the principal that sends is the Airflow worker.
    assert "ssm:SendCommand" in actions("airflow-principal-policy.json")
    assert not any(a.startswith("ssm:") for a in actions("instance-role-policy.json"))


def test_airflow_principal_covers_every_call_vod_sr_makes():
    needed = {
        "ssm:SendCommand",
        "ssm:GetCommandInvocation",
        "ssm:ListCommands",
        "ssm:CancelCommand",
        "ssm:DescribeInstanceInformation",
        "ec2:DescribeInstances",
        "ec2:StartInstances",
        "ec2:StopInstances",
        "ec2:CreateTags",
        "ec2:DeleteTags",
        "ec2:DescribeTags",
        "s3:ListBucket",
        "s3:GetObject",
        "s3:PutObject",
    }

    assert needed <= actions("airflow-principal-policy.json")


def test_send_command_is_scoped_to_the_document_and_instances():
    policy = json.loads((REPO_ROOT / "iam" / "airflow-principal-policy.json").read_text())
    (send,) = [s for s in policy["Statement"] if "ssm:SendCommand" in s["Action"]]

    assert "*" not in send["Resource"]
    assert any("document/AWS-RunShellScript" in r for r in send["Resource"])


def test_instance_role_reads_sources_and_chunk_lists_and_writes_outputs():
    assert {"s3:GetObject", "s3:PutObject"} <= actions("instance-role-policy.json")


def test_compose_file_defines_every_airflow_component():
    import yaml

    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yaml").read_text())

    assert {"airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-apiserver"} <= set(
        compose["services"]
    )


def test_the_instance_writes_the_whole_output_of_commands_and_airflow_reads_it():
    # SendCommand names an output bucket (commands.send_command): SSM's agent writes each command's whole stdout and
    # stderr there with the instance role, and Airflow reads their ends when a command fails.
    from include.local_aws.ssm_agent import ssm_output_key
    from include.vod_sr.commands import ssm_output_prefix

    key = ssm_output_key(
        ssm_output_prefix("0123456789abcdef"), "11111111-2222-3333-4444-555555555555", "i-0123456789abcdef0", "stderr"
    )
    resource = f"arn:aws:s3:::OUTPUT_BUCKET/{key}"

    assert allows("instance-role-policy.json", "s3:PutObject", resource)
    assert allows("airflow-principal-policy.json", "s3:GetObject", resource)


def allows(name: str, action: str, resource: str) -> bool:
    """Whether an Allow statement of the policy names `action` and a Resource pattern (IAM's `*` and `?`) matching
    `resource`; these files have no Deny."""
    import re

    def matches(pattern: str) -> bool:
        return (
            re.fullmatch("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern), resource)
            is not None
        )

    policy = json.loads((REPO_ROOT / "iam" / name).read_text())
    return any(
        statement["Effect"] == "Allow"
        and action in ([statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"])
        and any(
            matches(r)
            for r in ([statement["Resource"]] if isinstance(statement["Resource"], str) else statement["Resource"])
        )
        for statement in policy["Statement"]
    )
