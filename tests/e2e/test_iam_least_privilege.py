"""Least privilege, checked against what the code really calls (issue 8, points 16 and 17).

The module drives a representative set of vod_sr_batch runs itself (dag.test() on the emulator, with the real AWS CLI
and ffmpeg on the instance) and records every AWS call the emulator served during each run. A call is attributed to
the principal whose credentials it would use on AWS, by its User-Agent: the instance's AWS CLI (`aws-cli/...`, the
instance role) or Airflow (the Amazon provider's hooks add `Airflow/...`, the Airflow principal). Then per principal:

- the IAM actions it called equal the actions its policy file grants: an action used but not granted, or granted but
  never used (outside NOT_EXERCISED, each entry with its reason), fails;
- every call, with the bucket and key, instance, document and tag keys it named, is allowed by that policy file
  evaluated as IAM would (tests.test_deployment_files.IamPolicy), the emulator's names in place of the placeholders;
  the fleet variant must allow every Airflow call too, on an instance carrying the fleet tag.

The policy files are the only source of truth: a call the code starts making shows up in the call log and fails here
until the policy grants it, and a grant the code stops needing fails until it is removed.

The runs: a success naming files, a folder and a manifest; a failure (a corrupt file) that also
overwrites an existing output; a chunk cut off mid-way (every read of its command is refused, so run_chunks fails at
once and the teardown cancels the live command, and verify asks SSM about the unfinished chunk). The instance also
carries an expired lease of an abandoned run and the fleet tag. Notifications are on (VOD_SR_SNS_TOPIC_ARN): each run's
callback reads its report and publishes to the topic, so the Airflow principal is checked with its notifications
addition (iam/airflow-principal-policy.notifications.json).
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest

from include.local_aws.server import EMULATOR_REGION
from include.local_aws.ssm_agent import ssm_output_key
from include.local_aws.world import (
    OUTPUT_BUCKET,
    SOURCE_BUCKET,
    airflow_env,
    boto_client,
    create_world,
    make_sample_clip,
)
from tests.e2e.conftest import BatchRun, World
from tests.test_deployment_files import (
    FLEET_TAG,
    FLEET_VARIANT,
    NOTIFICATIONS_ADDITION,
    PRINCIPAL_POLICIES,
    SAMPLE,
    IamPolicy,
    instance_arn,
    tagged,
)

pytestmark = pytest.mark.e2e

# Granted but not exercised by the runs below: each needs a reason.
NOT_EXERCISED = {
    "airflow": {},
    "instance": {
        "s3:AbortMultipartUpload": "the AWS CLI aborts a multipart upload (outputs over 8 MB) that failed; the runs' "
        "outputs are smaller, and without it a failed upload's parts stay stored and billed",
    },
}
REALTIME_MODEL = {
    "title": "cpu 2x at the source's playing speed",
    "video_filter": "realtime,scale=iw*2:ih*2:flags=lanczos",
    "output_args": ["-c:v", "libx264", "-preset", "veryfast", "-c:a", "copy"],
}
# The runs publish their success or failure (VOD_SR_SNS_TOPIC_ARN): the Airflow principal's policy is checked with the
# notifications addition, as a deployment with notifications has it.
ADDITIONS = {"airflow": (NOTIFICATIONS_ADDITION,), "instance": ()}
TOPIC_NAME = "vod-sr-iam-notifications"
REFUSED_READS = {"invocation_read_errors": 10_000, "invocation_read_error": "AccessDeniedException"}
EXPIRED_LEASE = ("vod-sr:lease:00000000abandoned", "2020-01-01T00:00:00Z a run that never released")

# S3 requests by (method, level, subresource): the IAM action that authorizes each.
S3_SUBRESOURCES = ("uploads", "uploadId", "location", "versions", "delete", "tagging", "acl")
S3_ACTIONS = {
    ("GET", "service", ""): "s3:ListAllMyBuckets",
    ("HEAD", "bucket", ""): "s3:ListBucket",  # HeadBucket
    ("GET", "bucket", ""): "s3:ListBucket",  # ListObjects(V2)
    ("GET", "bucket", "location"): "s3:GetBucketLocation",
    ("GET", "bucket", "uploads"): "s3:ListBucketMultipartUploads",
    ("GET", "bucket", "versions"): "s3:ListBucketVersions",
    ("POST", "bucket", "delete"): "s3:DeleteObject",  # DeleteObjects
    ("HEAD", "object", ""): "s3:GetObject",  # HeadObject
    ("GET", "object", ""): "s3:GetObject",
    ("GET", "object", "uploadId"): "s3:ListMultipartUploadParts",
    ("GET", "object", "tagging"): "s3:GetObjectTagging",
    ("PUT", "object", ""): "s3:PutObject",
    ("PUT", "object", "uploadId"): "s3:PutObject",  # UploadPart
    ("POST", "object", "uploads"): "s3:PutObject",  # CreateMultipartUpload
    ("POST", "object", "uploadId"): "s3:PutObject",  # CompleteMultipartUpload
    ("PUT", "object", "tagging"): "s3:PutObjectTagging",
    ("DELETE", "object", "uploadId"): "s3:AbortMultipartUpload",
    ("DELETE", "object", ""): "s3:DeleteObject",
}


@dataclass
class Request:
    """One AWS call as IAM authorizes it: an action on each of its resources, each in its request context."""

    principal: str
    run: str
    action: str
    resources: list[tuple[str, dict[str, Any]]]  # (resource ARN, request context)
    bucket: str = ""
    key: str = ""

    def refused_by(self, policy: IamPolicy) -> list[str]:
        return [
            f"{self.action} on {arn} {context or ''}: {policy.decide(self.action, arn, context)} (run {self.run!r})"
            for arn, context in self.resources
            if not policy.allows(self.action, arn, context)
        ]


def principal_of(call: dict[str, Any]) -> str | None:
    """Whose credentials the call uses on AWS: the instance role's (its AWS CLI), Airflow's (the provider's hooks),
    or None (the test's own set-up and checks)."""
    if call["caller"] == "instance":
        return "instance"
    return "airflow" if "Airflow/" in call.get("user_agent", "") else None


def iam_requests(call: dict[str, Any], principal: str, run: str, tags: dict[str, dict[str, str]]) -> list[Request]:
    """What IAM authorizes for a served call (see include/local_aws/server.py's call log), plus what SSM's agent
    does with the instance role for a SendCommand (`agent_requests`)."""
    request = iam_request(call, principal, run, tags)
    if request.action == "ssm:SendCommand":
        return [request, *agent_requests(call.get("params") or {}, run)]
    return [request]


def agent_requests(send_command: dict[str, Any], run: str) -> list[Request]:
    """SSM's agent stores a command's whole output in SendCommand's OutputS3BucketName with the instance role: it
    reads the bucket's encryption configuration (s3:GetEncryptionConfiguration, which the SSM docs require for an
    encrypted bucket, and since 2023 every bucket is) and writes each stream under OutputS3KeyPrefix, at
    `<command id>/<instance id>/awsrunShellScript/0.awsrunShellScript/<stream>`. The emulator's agent writes the copy
    straight into its S3, so the call log never shows these calls: they are derived from the SendCommand."""
    bucket = send_command.get("OutputS3BucketName")
    if not bucket:
        return []
    prefix = send_command.get("OutputS3KeyPrefix", "")
    command_id = "00000000-0000-4000-8000-000000000000"  # SSM's answer names it; any id stands for it here
    requests = [Request("instance", run, "s3:GetEncryptionConfiguration", [(f"arn:aws:s3:::{bucket}", {})], bucket)]
    for instance_id in send_command.get("InstanceIds", []):
        for stream in ("stdout", "stderr"):
            key = ssm_output_key(prefix, command_id, instance_id, stream)
            requests.append(
                Request("instance", run, "s3:PutObject", [(f"arn:aws:s3:::{bucket}/{key}", {})], bucket, key)
            )
    return requests


def iam_request(call: dict[str, Any], principal: str, run: str, tags: dict[str, dict[str, str]]) -> Request:
    """The IAM action, resources and request context of a served call."""
    service, params = call["service"], call.get("params") or {}
    if service == "s3":
        bucket, key = call["bucket"], call["key"]
        level = "object" if key else "bucket" if bucket else "service"
        subresource = next((q for q in S3_SUBRESOURCES if q in call["query"]), "")
        method = call["action"].split(" ", 1)[0]
        action = S3_ACTIONS.get((method, level, subresource))
        assert action, f"an S3 request this test cannot map to an IAM action yet: {(method, level, subresource)}"
        arn = f"arn:aws:s3:::{bucket}/{key}" if key else f"arn:aws:s3:::{bucket}" if bucket else "*"
        return Request(principal, run, action, [(arn, {})], bucket, key)
    action = f"{service}:{call['action']}"
    context: dict[str, Any] = {}
    resources: list[tuple[str, dict[str, Any]]] = []
    if action == "ssm:SendCommand":
        document = params["DocumentName"]
        owner = "" if document.startswith("AWS-") else SAMPLE["ACCOUNT_ID"]  # AWS-owned documents have no account
        resources.append((f"arn:aws:ssm:{EMULATOR_REGION}:{owner}:document/{document}", {}))
        if params.get("OutputS3BucketName"):  # SendCommand is authorized on the output bucket too (SSM docs)
            resources.append((f"arn:aws:s3:::{params['OutputS3BucketName']}", {}))
        instance_ids = params.get("InstanceIds", [])
    elif service == "ec2" and not call["action"].startswith("Describe"):
        instance_ids = [v for k, v in params.items() if re.fullmatch(r"(InstanceId|ResourceId)\.\d+", k)]
        tag_keys = {k.split(".")[1]: v for k, v in params.items() if re.fullmatch(r"Tag\.\d+\.Key", k)}
        if call["action"] in ("CreateTags", "DeleteTags"):
            context["aws:TagKeys"] = list(tag_keys.values())
        if call["action"] == "CreateTags":
            context |= {f"aws:RequestTag/{k}": params.get(f"Tag.{n}.Value", "") for n, k in tag_keys.items()}
    else:
        instance_ids = []
    if action == "sns:Publish":  # authorized on the topic it publishes to
        resources.append((params.get("TargetArn") or params.get("TopicArn") or "*", {}))
    resources += [(instance_arn(i, EMULATOR_REGION), tagged(tags.get(i, {})) | context) for i in instance_ids]
    return Request(principal, run, action, resources or [("*", context)])


def refuse_command_reads_once_a_new_chunk_runs(emulator: Any, instance_id: str) -> threading.Thread:
    """From the moment a chunk command not yet in the instance's timeline runs, every GetCommandInvocation about the
    instance is refused (AccessDenied): run_chunks fails at once while its command is still live."""

    def chunks_run() -> int:
        return sum(" chunk " in run["comment"] for run in emulator.timeline().get(instance_id, {}).get("commands", []))

    chunks_before = chunks_run()

    def arm() -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if chunks_run() > chunks_before:
                    emulator.set_faults({"instances": {instance_id: REFUSED_READS}})
                    return
            except OSError:  # the emulator, busy serving the run, reset a connection: ask again
                pass
            time.sleep(0.1)

    thread = threading.Thread(target=arm, name="refuse-command-reads", daemon=True)
    thread.start()
    return thread


@dataclass
class Served:
    """What the representative runs did and the AWS calls served during each."""

    runs: dict[str, BatchRun]
    prefix: str  # every source and output key of the runs starts with it
    values: dict[str, str]  # placeholder values: the emulator's region, buckets and instance
    instance_tags: dict[str, dict[str, str]]
    requests: list[Request] = field(default_factory=list)
    unattributed: list[str] = field(default_factory=list)
    seconds: dict[str, int] = field(default_factory=dict)  # each run's duration, shown when a path test fails

    def of(self, principal: str) -> list[Request]:
        return [r for r in self.requests if r.principal == principal]


@pytest.fixture(scope="module")
def served(emulator, airflow_db, tmp_path_factory) -> Served:
    media = tmp_path_factory.mktemp("iam-media")
    short = make_sample_clip(media / "short.mp4", seconds=1, size="320x240")
    long = make_sample_clip(media / "long.mp4", seconds=30, size="320x240")
    endpoint = emulator.endpoint_url
    instance_id = create_world(endpoint)
    world = World(emulator, instance_id, boto_client("s3", endpoint), boto_client("ec2", endpoint), short)
    prefix = f"iam-{uuid.uuid4().hex[:8]}"  # fresh keys: no output of an earlier test is skipped as already done
    world.ec2.create_tags(
        Resources=[instance_id],
        Tags=[{"Key": FLEET_TAG, "Value": SAMPLE["FLEET"]}, {"Key": EXPIRED_LEASE[0], "Value": EXPIRED_LEASE[1]}],
    )
    for name in ("a", "folder/b", "m"):
        world.upload(f"{prefix}/{name}.mp4")
    world.upload(f"{prefix}/corrupt.mp4", body=b"this is not a video" * 100)
    world.upload(f"{prefix}/long.mp4", long)
    world.upload(f"manifests/{prefix}.txt", body=f"{prefix}/m.mp4\n".encode())
    result = Served(
        runs={},
        prefix=prefix,
        values={
            **SAMPLE,
            "REGION": EMULATOR_REGION,
            "INSTANCE_ID": instance_id,
            "SOURCE_BUCKET": SOURCE_BUCKET,
            "OUTPUT_BUCKET": OUTPUT_BUCKET,
            "SNS_TOPIC_NAME": TOPIC_NAME,
        },
        instance_tags={instance_id: {FLEET_TAG: SAMPLE["FLEET"]}},
    )

    def run(name: str, cut_off: bool = False, **conf: Any) -> None:
        emulator.reset_calls()
        armed = refuse_command_reads_once_a_new_chunk_runs(emulator, instance_id) if cut_off else None
        started = time.monotonic()
        try:
            result.runs[name] = world.run(**conf)
        finally:
            if armed is not None:
                armed.join(timeout=1)
                emulator.set_faults({"instances": {instance_id: {"invocation_read_errors": 0}}})
            result.seconds[name] = round(time.monotonic() - started)
        for call in emulator.calls():
            principal = principal_of(call)
            if principal is None:
                result.unattributed.append(f"{call['service']} {call['action']} ({call.get('user_agent', '')})")
            else:
                result.requests += iam_requests(call, principal, name, result.instance_tags)

    with pytest.MonkeyPatch.context() as patch:
        for variable, value in airflow_env(endpoint, instance_id).items():
            patch.setenv(variable, value)
        patch.setenv("VOD_SR_START_RETRY_DELAY", "1")
        patch.setenv("AIRFLOW_VAR_VOD_SR_MODELS", json.dumps({"rt": REALTIME_MODEL}))
        patch.setenv("VOD_SR_SNS_TOPIC_ARN", boto_client("sns", endpoint).create_topic(Name=TOPIC_NAME)["TopicArn"])
        run(
            "success",
            sources=[f"{prefix}/a.mp4"],
            prefixes=[f"{prefix}/folder/"],
            manifest=f"manifests/{prefix}.txt",
        )
        run("failure with overwrite", sources=[f"{prefix}/a.mp4", f"{prefix}/corrupt.mp4"], overwrite=True)
        run("chunk cut off", cut_off=True, sources=[f"{prefix}/long.mp4"], custom_model="rt")
    return result


def test_the_runs_took_the_paths_they_stand_for(served):
    def path(name: str) -> tuple[str, list[str], list[str]]:
        run = served.runs[name]
        return run.state, run.task_states.get("lane.run_chunks", []), run.task_states.get("lane.release", [])

    assert {name: path(name) for name in served.runs} == {
        "success": ("success", ["success"], ["success"]),
        "failure with overwrite": ("failed", ["failed"], ["success"]),  # ffmpeg fails on the corrupt file
        "chunk cut off": ("failed", ["failed"], ["success"]),  # run_chunks failed at once, its command still live
    }, ({name: run.task_states for name, run in served.runs.items()}, served.seconds)


def test_every_call_during_a_run_comes_from_airflow_or_the_instance(served):
    # A task building its own boto3 client, not through the AWS connection's hook, would show here: on AWS it would
    # run with whatever credentials the worker happens to have.
    assert served.unattributed == []
    assert {r.principal for r in served.requests} == {"airflow", "instance"}


def policy_of(name: str, principal: str, values: dict[str, str]) -> IamPolicy:
    """A policy file with the principal's additions for the features the runs use (ADDITIONS), as one policy."""
    statements = [s for n in (name, *ADDITIONS[principal]) for s in IamPolicy.load(n, values).statements]
    return IamPolicy({"Statement": statements}, " + ".join((name, *ADDITIONS[principal])))


@pytest.mark.parametrize("principal", sorted(PRINCIPAL_POLICIES))
def test_each_principal_calls_exactly_the_actions_its_policy_grants(served, principal):
    used = {r.action for r in served.of(principal)}
    granted = policy_of(PRINCIPAL_POLICIES[principal], principal, served.values).granted_actions()
    not_exercised = set(NOT_EXERCISED[principal])

    assert {
        "used but not granted": sorted(used - granted),
        "granted but never used": sorted(granted - used - not_exercised),
        "NOT_EXERCISED entries that are used or not granted": sorted(not_exercised & used | not_exercised - granted),
    } == {
        "used but not granted": [],
        "granted but never used": [],
        "NOT_EXERCISED entries that are used or not granted": [],
    }


@pytest.mark.parametrize("principal", sorted(PRINCIPAL_POLICIES))
def test_every_call_is_allowed_by_its_principals_policy(served, principal):
    policy = policy_of(PRINCIPAL_POLICIES[principal], principal, served.values)

    assert sorted({refusal for r in served.of(principal) for refusal in r.refused_by(policy)}) == []


def test_the_fleet_variant_allows_every_airflow_call_on_a_fleet_instance(served):
    policy = policy_of(FLEET_VARIANT, "airflow", served.values)

    assert sorted({refusal for r in served.of("airflow") for refusal in r.refused_by(policy)}) == []


def test_s3_writes_stay_in_their_principals_places(served):
    def writes(principal: str) -> set[str]:
        return {r.key for r in served.of(principal) if r.action == "s3:PutObject" and r.bucket == OUTPUT_BUCKET}

    instance, airflow = writes("instance"), writes("airflow")

    # The instance: outputs (under the runs' prefix) and its results; never a report or a chunk list.
    assert [k for k in instance if not k.startswith(f"{served.prefix}/") and not k.startswith("vod-sr-runs/")] == []
    assert [k for k in instance if k.startswith("vod-sr-runs/") and k.endswith(".files")] == []
    assert [k for k in instance if re.fullmatch(r"vod-sr-runs/[^/]+/plan/.+", k)] == []
    assert any(k.endswith(".results") for k in instance)
    # Airflow: the plan and verify's records (stored_plan.py), chunk lists, reports and (only for a chunk sent again)
    # merged results; never an output.
    assert any(re.fullmatch(r"vod-sr-runs/[^/]+/plan/lane-i-.+\.json", k) for k in airflow)
    assert [
        k
        for k in airflow
        if not re.fullmatch(r"vod-sr-runs/.+\.(files|results)|vod-sr-runs/[^/]+/plan/.+|vod-sr-reports/.+", k)
    ] == []


def test_manifests_are_read_only_where_they_live(served):
    reads = {r.key for r in served.of("airflow") if r.action == "s3:GetObject" and r.bucket == SOURCE_BUCKET}

    assert reads == {f"manifests/{served.prefix}.txt"}  # and no video
