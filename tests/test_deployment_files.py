"""Deployment files: the IAM policies in iam/ are valid, grant each principal only what the README says it may do,
and compose is sane.

Which actions the code really calls, and on which resources, is checked against the same files end to end, from the
emulator's call log (tests/e2e/test_iam_least_privilege.py). Both use `IamPolicy`, a small evaluator of the policy
grammar these files use, with sample values in place of the placeholders.
"""

from __future__ import annotations

import json
import re
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
        known = {*PRINCIPAL_POLICIES.values(), TRUST_POLICY, FLEET_VARIANT, *KMS_ADDITIONS}

        assert {p.name for p in IAM.glob("*")} == known  # a grant in an unknown file would escape every check

    def test_the_kms_additions_grant_only_kms_actions(self):
        for name in KMS_ADDITIONS:
            assert all(a.startswith("kms:") for a in IamPolicy.load(name).granted_actions()), name

    def test_the_fleet_variant_grants_the_same_actions_as_the_per_instance_policy(self):
        assert (
            IamPolicy.load(FLEET_VARIANT).granted_actions()
            == IamPolicy.load(PRINCIPAL_POLICIES["airflow"]).granted_actions()
        )

    def test_allowed_actions_are_named_one_by_one(self):
        # The end-to-end test compares granted actions with called ones: a wildcard would hide what it grants.
        for name in (*PRINCIPAL_POLICIES.values(), FLEET_VARIANT, *KMS_ADDITIONS):
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


def test_compose_file_defines_every_airflow_component():
    import yaml

    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yaml").read_text())

    assert {"airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-apiserver"} <= set(
        compose["services"]
    )
