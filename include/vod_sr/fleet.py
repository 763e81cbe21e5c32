"""Fleets: GPU instances launched for one run from an EC2 launch template, used as its lanes, terminated at its end.

A run that asks for a fleet names a launch template (the Bluewhale AMI, the instance profile, network and disks live
there) and a count instead of instance ids. The plan task launches the instances once the input is validated, tags
each with the run (`LAUNCHED_BY_TAG` = "<dag_id>/<run_id>", the contract the sweeper reads to find instances whose run
has ended; `RUN_TOKEN_TAG` = the run token, which the teardown compares with its lease id), deals the chunks to them,
and each lane's teardown terminates its instance (instance.release), also when the run failed.

Capacity: `launch_fleet` goes through the launch options in order, for each instance type (the run's list, or the
template's own type) Spot first when asked, then On-Demand, each RunInstances asking for MinCount=1 and MaxCount=what
is still missing, until the count is reached. A capacity error (CAPACITY_ERROR_CODES) moves on to the next option; any
other error fails at once and terminates what was already launched. Fewer than asked after every option: the run
goes on with what it got (at least one), or fails when it got none.

No AWS SDK import at module level: params.py (DAG parse time) reads the limits here.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

LAUNCHED_BY_TAG = "vod-sr:launched-by"  # "<dag_id>/<run_id>": read by the sweeper, keep the key and value format
RUN_TOKEN_TAG = "vod-sr:run-token"  # the run token (plan.run_token): the run's lease id on the instance
NAME_TAG = "Name"
# A run's lanes are capped at SendCommand's 50 targets, as named instances are (limits.MAX_SSM_TARGETS): one run
# never holds more GPUs than one deployment's polling is sized for (README, Scaling); a bigger night is several runs.
MAX_FLEET_SIZE = 50
MAX_INSTANCE_TYPES = 10  # fallback types tried in turn; each is one or two RunInstances calls
TEMPLATE_ID = re.compile(r"lt-[0-9a-f]{17}")
# EC2's rules for a launch template name: 3 to 128 characters, letters, digits and ( ) . - / _
TEMPLATE_NAME = re.compile(r"[A-Za-z0-9().\-/_]{3,128}")
TEMPLATE_VERSION = re.compile(r"\$Default|\$Latest|[1-9][0-9]{0,9}")
INSTANCE_TYPE = re.compile(r"[a-z][a-z0-9-]*\.[a-z0-9-]+")
# RunInstances errors that mean "not this type or market now": the next launch option is tried. No room for the
# type (On-Demand or Spot), the Spot quota or a Spot price above MaxPrice, the account's On-Demand quota for the
# type's family (another family may have room), a type not offered in the subnet's zone.
CAPACITY_ERROR_CODES = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InsufficientCapacity",
        "InsufficientHostCapacity",
        "InsufficientReservedInstanceCapacity",
        "SpotMaxPriceTooLow",
        "MaxSpotInstanceCountExceeded",
        "InstanceLimitExceeded",
        "VcpuLimitExceeded",
        "Unsupported",
    }
)
# A throttled or 5xx RunInstances is retried on the same option this many times (the ClientToken makes a retry of a
# call that did launch return the same instances instead of launching more).
TRANSIENT_ATTEMPTS = 4
TERMINATE_BATCH = 1000  # TerminateInstances' limit of ids per call
# How launch_fleet waits for EC2 to know what it launched: (seconds between DescribeInstances, attempts). The first
# call is at once; AWS advises retrying for up to a few minutes.
VISIBLE_WAIT = (2, 90)


class FleetError(RuntimeError):
    """The fleet could not be launched; what had been launched was terminated."""


@dataclass(frozen=True)
class LaunchOption:
    """One way of launching: an instance type (None: the template's) in one market."""

    instance_type: str | None
    spot: bool

    def __str__(self) -> str:
        market = "Spot" if self.spot else "On-Demand"
        return f"{market} {self.instance_type or '(the template type)'}"


@dataclass(frozen=True)
class FleetRequest:
    """A run's fleet: `count` instances from `launch_template` (an id `lt-...` or a name) at `version`."""

    launch_template: str
    count: int
    version: str = "$Default"
    spot: bool = False
    instance_types: tuple[str, ...] = ()  # tried in turn on capacity errors; empty: the template's type

    def problems(self) -> list[str]:
        """What is wrong with the request, each in words (empty: nothing)."""
        found = []
        if not TEMPLATE_ID.fullmatch(self.launch_template) and not TEMPLATE_NAME.fullmatch(self.launch_template):
            found.append(
                f"launch_template {self.launch_template!r} is neither a launch template id (lt- and 17 hex digits) "
                "nor a name (3 to 128 letters, digits and ( ) . - / _)"
            )
        if not 1 <= self.count <= MAX_FLEET_SIZE:
            found.append(
                f"fleet_size {self.count} is outside 1..{MAX_FLEET_SIZE} (a run's lanes are capped like its named "
                "instances; split a bigger batch into several runs)"
            )
        if not TEMPLATE_VERSION.fullmatch(self.version):
            found.append(f"launch_template_version {self.version!r} is not $Default, $Latest or a version number")
        if len(self.instance_types) > MAX_INSTANCE_TYPES:
            found.append(f"{len(self.instance_types)} fleet_instance_types given; at most {MAX_INSTANCE_TYPES}")
        bad_types = [t for t in self.instance_types if not INSTANCE_TYPE.fullmatch(t)]
        if bad_types:
            found.append(f"fleet_instance_types {bad_types} are not EC2 instance types (such as g6e.xlarge)")
        return found

    @property
    def template_spec(self) -> dict[str, str]:
        """RunInstances' LaunchTemplate parameter."""
        key = "LaunchTemplateId" if TEMPLATE_ID.fullmatch(self.launch_template) else "LaunchTemplateName"
        return {key: self.launch_template, "Version": self.version}

    def options(self) -> list[LaunchOption]:
        """The launch options in the order they are tried: per type, Spot first when asked, then On-Demand."""
        types: Sequence[str | None] = list(dict.fromkeys(self.instance_types)) or [None]
        markets = (True, False) if self.spot else (False,)
        return [LaunchOption(instance_type, spot) for instance_type in types for spot in markets]


def fleet_tags(dag_id: str, run_id: str, run_token: str) -> dict[str, str]:
    """The tags every instance of the run's fleet is launched with (and its volumes)."""
    launched_by = f"{dag_id}/{run_id}"
    if len(launched_by) > 256:  # EC2's limit for a tag value; the sweeper needs it whole
        raise ValueError(f"{LAUNCHED_BY_TAG} would be {len(launched_by)} characters; EC2 allows 256")
    return {LAUNCHED_BY_TAG: launched_by, RUN_TOKEN_TAG: run_token, NAME_TAG: f"vod-sr {run_token}"}


def _error_code(error: BaseException) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _describe(error: BaseException) -> str:
    from include.vod_sr.commands import describe_error

    return describe_error(error)


def _fix_for(code: str) -> str:
    if code.startswith(("UnauthorizedOperation", "AccessDenied", "Unauthorized")):
        return (
            "the AWS principal of Airflow's connection may not launch from this template: see "
            "iam/airflow-principal-policy.launch.json (RunInstances scoped to the template, the launch tags, "
            "iam:PassRole on the instance role)"
        )
    if code.startswith(("InvalidLaunchTemplate", "InvalidLaunchTemplateName", "InvalidLaunchTemplateId")):
        return "check launch_template / launch_template_version (VOD_SR_LAUNCH_TEMPLATE) and the connection's region"
    return "no retry or other instance type fixes this"


def _run_instances(
    ec2: Any,
    request: FleetRequest,
    option: LaunchOption,
    wanted: int,
    tags: Mapping[str, str],
    client_token: str,
    sleep: Callable[[float], None],
) -> list[str]:
    """One RunInstances for `option` (MinCount 1, MaxCount `wanted`), retried on throttling and 5xx other than
    capacity errors; returns the ids launched. Raises the ClientError of a refusal."""
    from include.vod_sr.commands import is_transient_error

    tag_list = [{"Key": key, "Value": value} for key, value in tags.items()]
    kwargs: dict[str, Any] = {
        "LaunchTemplate": request.template_spec,
        "MinCount": 1,
        "MaxCount": wanted,
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": tag_list},
            {"ResourceType": "volume", "Tags": tag_list},
        ],
    }
    if client_token:
        kwargs["ClientToken"] = client_token
    if option.instance_type:
        kwargs["InstanceType"] = option.instance_type
    if option.spot:
        kwargs["InstanceMarketOptions"] = {
            "MarketType": "spot",
            "SpotOptions": {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"},
        }
    for attempt in range(1, TRANSIENT_ATTEMPTS + 1):
        try:
            reservation = ec2.run_instances(**kwargs)
        except Exception as error:
            if _error_code(error) in CAPACITY_ERROR_CODES or not is_transient_error(error):
                raise
            if attempt == TRANSIENT_ATTEMPTS:
                raise
            log.warning("RunInstances (%s) failed with %s; trying again", option, _describe(error))
            sleep(2.0**attempt)
            continue
        return [instance["InstanceId"] for instance in reservation["Instances"]]
    raise AssertionError("unreachable")


def launch_fleet(
    ec2: Any,
    request: FleetRequest,
    tags: Mapping[str, str],
    *,
    client_token: str = "",
    sleep: Callable[[float], None] = time.sleep,
) -> list[str]:
    """Launch `request.count` instances from the launch template, going through `request.options()` on capacity
    errors; returns their ids in launch order (fewer than asked when every option ran out of room, never none).

    Each instance and its volumes get `tags` at launch; instance n is then named "<tags' Name> <n>". Raises
    FleetError when nothing could be launched, or at once on an error other than capacity (a permission missing, an
    unknown template), after terminating what was launched. `client_token` (at most 40 ASCII characters) makes each
    RunInstances idempotent: use one per run and try.

    Give it a client that does not retry capacity errors itself: EC2 answers them with HTTP 500, which botocore
    retries (see `launch_client`).
    """
    launched: list[str] = []
    refused: list[str] = []
    try:
        for n, option in enumerate(request.options()):
            wanted = request.count - len(launched)
            if wanted <= 0:
                break
            try:
                token = f"{client_token}-{n}" if client_token else ""
                ids = _run_instances(ec2, request, option, wanted, tags, token, sleep)
            except Exception as error:
                if _error_code(error) not in CAPACITY_ERROR_CODES:
                    raise _refused(request, option, error, ec2, launched) from error
                log.warning("No %s for this run: %s; trying the next option", option, _describe(error))
                refused.append(f"{option}: {_describe(error)}")
                continue
            log.info("Launched %s instance(s) as %s: %s", len(ids), option, ", ".join(ids))
            launched += ids
    except FleetError:
        raise
    except BaseException:  # any error, KeyboardInterrupt too: nothing else knows these instances yet
        if launched:
            log.error("Launch interrupted%s", _terminated_after_failure(ec2, launched))
        raise
    if not launched:
        raise FleetError(
            f"no instance could be launched from launch template {request.launch_template!r}: every option ran out of "
            f"capacity ({'; '.join(refused)}). Add instance types to fall back to (fleet_instance_types), allow "
            "On-Demand (spot off), or try again later"
        )
    if len(launched) < request.count:
        log.warning(
            "Launched %s of the %s instance(s) asked for: EC2 had no more capacity (%s). The run goes on with %s",
            len(launched),
            request.count,
            "; ".join(refused),
            len(launched),
        )
    _wait_until_visible(ec2, launched)
    _name_instances(ec2, launched, tags.get(NAME_TAG, "vod-sr"))
    return launched


def _wait_until_visible(ec2: Any, instance_ids: Sequence[str]) -> None:
    """Wait (botocore's InstanceExists waiter) until DescribeInstances knows every launched id: the EC2 API is
    eventually consistent, and right after RunInstances a request naming a new id may answer
    InvalidInstanceID.NotFound though the instance exists (EC2 Developer Guide, "Eventual consistency in the Amazon EC2
    API"). Without the wait the name tags failed and the lane's acquire took the instance for gone. Raises FleetError
    (after terminating them) if they are still unknown after VISIBLE_WAIT."""
    from botocore.exceptions import WaiterError

    delay, attempts = VISIBLE_WAIT
    try:
        ec2.get_waiter("instance_exists").wait(
            InstanceIds=list(instance_ids), WaiterConfig={"Delay": delay, "MaxAttempts": attempts}
        )
    except WaiterError as error:
        raise FleetError(
            f"EC2 still did not know the instance(s) it had launched after {delay * attempts} s ({error})"
            + _terminated_after_failure(ec2, instance_ids)
        ) from error


def _refused(
    request: FleetRequest, option: LaunchOption, error: BaseException, ec2: Any, launched: Sequence[str]
) -> FleetError:
    """The FleetError of a RunInstances refused for a reason other than capacity, once what was launched is
    terminated."""
    code = _error_code(error)
    what = f"RunInstances ({option}) from launch template {request.launch_template!r} failed: {_describe(error)}"
    if launched:
        what += _terminated_after_failure(ec2, launched)
    fix = _fix_for(code)
    return FleetError(f"{what.rstrip('.')}. {fix[:1].upper()}{fix[1:]}")


def _name_instances(ec2: Any, instance_ids: Sequence[str], base: str) -> None:
    """Name tags "<base> <n>", so the console tells a run's instances apart; a failure is logged, never fatal (each
    is already named <base> by its launch tags)."""
    for n, instance_id in enumerate(instance_ids):
        try:
            ec2.create_tags(Resources=[instance_id], Tags=[{"Key": NAME_TAG, "Value": f"{base} {n}"}])
        except Exception as error:
            log.warning("Could not name %s %r: %s", instance_id, f"{base} {n}", _describe(error))


def terminate_fleet(ec2: Any, instance_ids: Sequence[str]) -> list[str]:
    """Terminate the instances (in batches of TERMINATE_BATCH); returns the ids asked to terminate. Raises the
    error of a call that failed, once every batch was tried."""
    errors: list[BaseException] = []
    done: list[str] = []
    for start in range(0, len(instance_ids), TERMINATE_BATCH):
        batch = list(instance_ids[start : start + TERMINATE_BATCH])
        try:
            ec2.terminate_instances(InstanceIds=batch)
        except Exception as error:
            log.error("Could not terminate %s: %s", ", ".join(batch), _describe(error))
            errors.append(error)
            continue
        done += batch
    if errors:
        raise errors[0]
    if done:
        log.info("Terminating %s", ", ".join(done))
    return done


def _terminated_after_failure(ec2: Any, instance_ids: Sequence[str]) -> str:
    """terminate_fleet for a launch that is already failing (its own error is logged, not raised); what became of
    the instances, for the launch's error message."""
    try:
        terminate_fleet(ec2, instance_ids)
    except Exception as error:
        return (
            f"; the {len(instance_ids)} instance(s) it had launched could not be terminated ({_describe(error)}) and "
            f"may still be running: {', '.join(instance_ids)} (the sweeper terminates them)"
        )
    return f"; the {len(instance_ids)} instance(s) it had launched were terminated: {', '.join(instance_ids)}"


def launch_client(aws_conn_id: str | None) -> Any:
    """An EC2 client from the Airflow connection whose calls are not retried by botocore: EC2 answers a capacity error
    with HTTP 500, which botocore would retry for long before `launch_fleet` could move on to the next option.
    `launch_fleet` retries throttling and other 5xx itself."""
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "total_max_attempts": 1}, connect_timeout=10, read_timeout=60)
    return AwsBaseHook(aws_conn_id=aws_conn_id, client_type="ec2", config=config).get_conn()
