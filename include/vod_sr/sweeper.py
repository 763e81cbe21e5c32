"""The sweeper: ends the instances vod-sr left running after their runs ended, and says why.

A run's own teardown stops or terminates what it used; the sweeper (dags/vod_sr_sweeper.py, every 15 minutes) is
for when the teardown never ran: a crashed scheduler, a worker lost with its task, a run deleted from the UI.

- **Launched instances** (tag `vod-sr:launched-by` = `<dag_id>/<run_id>`, a fleet's) are terminated once their run
  has ended (success or failed) or no longer exists; an instance launched less than the grace period ago whose run
  cannot be found yet is left alone, and one whose run is queued or running is never touched.
- **Named instances** (the settings' instance ids, and any instance carrying a vod-sr lease tag) that are running are
  stopped when no live lease and no live vod-sr command keeps them up. A lease whose holder run has ended, or no
  longer exists, is dead whatever its 49-hour TTL says: it is dropped (and said so), and that run's commands still
  live are cancelled, so a crashed run cannot keep a GPU running for two days.
- Everything else (**strangers**: no vod-sr tag, not in the settings) is never looked at.

An instance tagged `vod-sr:keep-running` (any value) is reported and left alone: an operator working on it by hand.
An AWS error on one instance does not stop the sweep of the others; the report names it, and the task fails at the
end. Nothing here imports Airflow: the run states come from a callable (`RunStates`).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from include.vod_sr.instance import (
    LEASE_TAG_PREFIX,
    Lease,
    _age,
    command_comment,
    keeping_commands,
    lease_tag_key,
    live_commands,
)

log = logging.getLogger(__name__)

LAUNCHED_BY_TAG = "vod-sr:launched-by"
RUN_TOKEN_TAG = "vod-sr:run-token"
KEEP_RUNNING_TAG = "vod-sr:keep-running"
# The DAG ids whose runs hold leases. A lease names its holder by run id only; its lease id is the run's token,
# run_token(dag_id, run_id), so the holder's DAG is the one among these (and the DAGs named by launched-by tags) whose
# token matches. A lease of any other DAG cannot be placed and is left to its TTL.
VOD_SR_DAG_IDS = ("vod_sr_batch", "vod_sr_nightly", "vod_sr_events")
ENDED_RUN_STATES = ("success", "failed")
DEFAULT_GRACE = timedelta(minutes=10)
# States a launched instance is found in and terminated from (shutting-down and terminated are on their way already).
LAUNCHED_STATES = ("pending", "running", "stopping", "stopped")
FILTER_VALUES_PER_CALL = 200  # EC2 takes at most 200 values in one filter

# (dag_id, run_id) -> the run's state ("queued", "running", "success", "failed"), or None when there is no such run.
RunStates = Callable[[str, str], str | None]


class Action(enum.Enum):
    TERMINATE = "terminate"
    STOP = "stop"
    LEAVE = "leave"


_DONE = {Action.TERMINATE: "terminated", Action.STOP: "stopped", Action.LEAVE: "left"}


@dataclass(frozen=True)
class SweepEntry:
    """What the sweep did (or, in a dry run, would do) with one instance, and why."""

    instance_id: str
    action: Action
    reason: str
    run: str = ""  # the run(s) the decision rests on, as dag_id/run_id
    error: str = ""  # the action, or deciding it, failed with this
    dropped_leases: tuple[str, ...] = ()  # lease ids dropped (a dry run drops none)

    def outcome(self, dry_run: bool) -> str:
        if self.error:
            return "left" if self.action is Action.LEAVE else f"{self.action.value} FAILED"
        if dry_run and self.action is not Action.LEAVE:
            return f"would {self.action.value}"
        return _DONE[self.action]

    def to_xcom(self, dry_run: bool) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "action": self.outcome(dry_run),
            "reason": self.reason,
            "run": self.run,
            "error": self.error,
            "dropped_leases": list(self.dropped_leases),
        }


@dataclass(frozen=True)
class SweepReport:
    dry_run: bool
    entries: tuple[SweepEntry, ...] = ()

    @property
    def failures(self) -> tuple[SweepEntry, ...]:
        return tuple(e for e in self.entries if e.error)

    def by_instance(self) -> dict[str, SweepEntry]:
        return {e.instance_id: e for e in self.entries}

    def counts(self) -> dict[str, int]:
        counts = {"terminated": 0, "stopped": 0, "left": 0, "failed": 0}
        for entry in self.entries:
            if entry.error:
                counts["failed"] += 1
            elif entry.action is Action.LEAVE:
                counts["left"] += 1
            else:
                counts[_DONE[entry.action]] += 1
        return counts

    def table(self) -> str:
        """One row per instance looked at: instance, action, reason, run."""
        title = "vod-sr sweep" + (" (dry run: nothing was changed)" if self.dry_run else "")
        if not self.entries:
            return f"{title}: no vod-sr instance running, launched or leased"
        rows = [("instance", "action", "run", "reason")]
        for e in sorted(self.entries, key=lambda e: (e.action is Action.LEAVE, e.instance_id)):
            reason = e.reason + (f"; ERROR: {e.error}" if e.error else "")
            rows.append((e.instance_id, e.outcome(self.dry_run), e.run or "-", reason))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3] for row in rows]
        counts = ", ".join(f"{n} {what}" for what, n in self.counts().items())
        return "\n".join([f"{title}: {counts}", *lines])

    def failure_message(self) -> str:
        return "; ".join(f"{e.instance_id} ({e.outcome(self.dry_run)}: {e.error})" for e in self.failures)

    def to_xcom(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "counts": self.counts(),
            "instances": [e.to_xcom(self.dry_run) for e in self.entries],
        }


def split_launched_by(value: str) -> tuple[str, str] | None:
    """`<dag_id>/<run_id>` -> (dag_id, run_id) (dag ids hold no `/`), or None when it is not of that form."""
    dag_id, slash, run_id = value.partition("/")
    return (dag_id, run_id) if slash and dag_id and run_id else None


def lease_run(lease: Lease, dag_ids: Iterable[str]) -> tuple[str, str] | None:
    """The run holding the lease, as (dag_id, run_id), or None when it cannot be placed.

    A holder of the form `<dag_id>/<run_id>` names both. A bare run id (what vod_sr_dag's acquire writes) is placed
    by the lease id, which is the run's token: the DAG is the one of `dag_ids` whose run_token(dag_id, run_id) it is.
    """
    from include.vod_sr.plan import run_token

    if (named := split_launched_by(lease.holder)) is not None:
        return named
    if not lease.holder:
        return None
    return next(((d, lease.holder) for d in dag_ids if run_token(d, lease.holder) == lease.lease_id), None)


def launched_action(state: str | None, age: timedelta | None, grace: timedelta) -> tuple[Action, str]:
    """What to do with an instance a run launched, from that run's state (None: no such run) and the instance's
    age (None: EC2 gave no launch time)."""
    if state in ENDED_RUN_STATES:
        return Action.TERMINATE, f"its run ended ({state})"
    if state is not None:
        return Action.LEAVE, f"its run is {state}"
    if age is not None and age < grace:
        return Action.LEAVE, f"launched {_age(age)} ago and its run is not visible yet (grace {_age(grace)})"
    return Action.TERMINATE, "its run no longer exists"


@dataclass
class _Lookup:
    """Run states, each asked once per sweep; a failed lookup is remembered as its error."""

    run_states: RunStates
    known: dict[tuple[str, str], str | None] = field(default_factory=dict)
    failed: dict[tuple[str, str], str] = field(default_factory=dict)

    def state(self, dag_id: str, run_id: str) -> str | None:
        key = (dag_id, run_id)
        if key in self.failed:
            raise RunStateUnknown(self.failed[key])
        if key not in self.known:
            try:
                state = self.run_states(dag_id, run_id)
            except Exception as error:
                self.failed[key] = f"could not read the state of run {dag_id}/{run_id}: {_error_text(error)}"
                raise RunStateUnknown(self.failed[key]) from error
            self.known[key] = None if state is None else str(getattr(state, "value", state))
        return self.known[key]


class RunStateUnknown(RuntimeError):
    """The state of a run could not be read: nothing that rests on it is ended."""


def sweep(
    ec2: Any,
    ssm: Any,
    run_states: RunStates,
    *,
    named_instance_ids: Iterable[str] = (),
    grace: timedelta = DEFAULT_GRACE,
    dry_run: bool = False,
    now: datetime | None = None,
    dag_ids: Iterable[str] = VOD_SR_DAG_IDS,
) -> SweepReport:
    """Terminate launched instances whose run ended, stop named instances nothing keeps up; see the module doc.

    A failure listing the instances raises; a failure on one instance is recorded in its entry and the sweep goes
    on. `now` is for tests (instance ages, lease TTLs, stuck commands).
    """
    now = now or datetime.now(UTC)
    lookup = _Lookup(run_states)
    launched = list(_launched_instances(ec2))
    launched_ids = {i["InstanceId"] for i in launched}
    known_dags = list(dict.fromkeys([*dag_ids, *_launching_dags(launched)]))
    entries: list[SweepEntry] = []
    for instance in launched:
        entries.append(_guarded(instance, lambda i: _sweep_launched(ec2, i, lookup, grace, dry_run, now)))
    named = [i for i in _running_named_instances(ec2, named_instance_ids) if i["InstanceId"] not in launched_ids]
    for instance in named:
        entries.append(_guarded(instance, lambda i: _sweep_named(ec2, ssm, i, lookup, known_dags, grace, dry_run, now)))
    report = SweepReport(dry_run, tuple(entries))
    for entry in report.entries:
        if entry.error:
            log.error("Sweep of %s: %s", entry.instance_id, entry.error)
    return report


def _guarded(instance: Mapping[str, Any], sweep_one: Callable[[Mapping[str, Any]], SweepEntry]) -> SweepEntry:
    """Sweep one instance; an error becomes its entry, so the others are still swept."""
    try:
        return sweep_one(instance)
    except _ActionFailed as failed:
        return failed.entry
    except RunStateUnknown as error:
        return SweepEntry(instance["InstanceId"], Action.LEAVE, "its run's state could not be read", error=str(error))
    except Exception as error:
        log.exception("Sweep of %s failed", instance["InstanceId"])
        return SweepEntry(instance["InstanceId"], Action.LEAVE, "the sweep of it failed", error=_error_text(error))


class _ActionFailed(Exception):
    def __init__(self, entry: SweepEntry) -> None:
        super().__init__(entry.error)
        self.entry = entry


def _sweep_launched(
    ec2: Any, instance: Mapping[str, Any], lookup: _Lookup, grace: timedelta, dry_run: bool, now: datetime
) -> SweepEntry:
    instance_id, tags = instance["InstanceId"], _tags(instance)
    launched_by = tags[LAUNCHED_BY_TAG]
    run = split_launched_by(launched_by)
    if run is None:
        return SweepEntry(instance_id, Action.LEAVE, f"its {LAUNCHED_BY_TAG} tag {launched_by!r} names no run")
    if KEEP_RUNNING_TAG in tags:
        return SweepEntry(instance_id, Action.LEAVE, f"tagged {KEEP_RUNNING_TAG}", launched_by)
    action, reason = launched_action(lookup.state(*run), _since(instance.get("LaunchTime"), now), grace)
    reason = f"launched by vod-sr ({instance['State']['Name']}); {reason}"
    entry = SweepEntry(instance_id, action, reason, launched_by)
    if action is Action.TERMINATE and not dry_run:
        _act(entry, lambda: ec2.terminate_instances(InstanceIds=[instance_id]))
    return entry


def _sweep_named(
    ec2: Any,
    ssm: Any,
    instance: Mapping[str, Any],
    lookup: _Lookup,
    dag_ids: list[str],
    grace: timedelta,
    dry_run: bool,
    now: datetime,
) -> SweepEntry:
    instance_id, tags = instance["InstanceId"], _tags(instance)
    if KEEP_RUNNING_TAG in tags:
        return SweepEntry(instance_id, Action.LEAVE, f"tagged {KEEP_RUNNING_TAG}")
    live, dead = _judge_leases(_leases(instance), lookup, dag_ids, now)
    # Dead leases go whatever happens next: left, they would keep later sweeps and releases from stopping it.
    dropped = () if dry_run else tuple(_drop_dead_leases(ec2, instance_id, dead))
    said = "; ".join(f"{'dead' if dry_run else 'dropped'} lease {j.lease.lease_id}: {j.why}" for j in dead)

    def left(reason: str, run: str = "") -> SweepEntry:
        return SweepEntry(instance_id, Action.LEAVE, "; ".join(filter(None, [reason, said])), run, "", dropped)

    if live:
        return left("; ".join(f"live lease {j.lease.lease_id}: {j.why}" for j in live), _run_list(live))
    started = _since(instance.get("LaunchTime"), now)
    if started is not None and started < grace:
        return left(f"started {_age(started)} ago (grace {_age(grace)})")
    commands = live_commands(ssm, instance_id, now=now)
    orphans = [c for c in commands if any(_of_lease(c, j.lease.lease_id) for j in dead)]
    keepers = keeping_commands([c for c in commands if c not in orphans], now=now)
    if keepers:
        return left(
            "live vod-sr command(s): "
            + "; ".join(f"{c['CommandId']} ({c.get('Comment', '')}, {c.get('Status')})" for c in keepers)
        )
    reason = "running with no live lease and no live vod-sr command"
    if orphans:
        reason += f"; {'cancelled' if not dry_run else 'would cancel'} the ended run's command(s) " + ", ".join(
            c["CommandId"] for c in orphans
        )
    entry = SweepEntry(instance_id, Action.STOP, "; ".join(filter(None, [reason, said])), _run_list(dead), "", dropped)
    if dry_run:
        return entry
    taken = _leases_taken_since(ec2, instance_id, {j.lease.lease_id for j in dead})
    if taken:
        return left(f"a lease was taken while sweeping: {', '.join(taken)}")
    for command in orphans:
        if command.get("Status") == "Cancelling":
            continue
        try:
            ssm.cancel_command(CommandId=command["CommandId"], InstanceIds=[instance_id])
        except Exception as error:  # the stop ends it anyway
            log.warning("Could not cancel %s on %s (the stop ends it): %s", command["CommandId"], instance_id, error)
    _act(entry, lambda: ec2.stop_instances(InstanceIds=[instance_id]))
    return entry


@dataclass(frozen=True)
class _Judged:
    lease: Lease
    run: str  # dag_id/run_id, or the holder as written when the run cannot be placed
    why: str


def _judge_leases(
    leases: list[Lease], lookup: _Lookup, dag_ids: list[str], now: datetime
) -> tuple[list[_Judged], list[_Judged]]:
    """Split the leases into live and dead ones, each with its run and why."""
    live, dead = [], []
    for lease in leases:
        placed = lease_run(lease, dag_ids)
        run = f"{placed[0]}/{placed[1]}" if placed else (lease.holder or "?")
        if lease.expired(now) and lease.refreshed is not None:
            dead.append(_Judged(lease, run, f"{run} has not refreshed it for {_age(now - lease.refreshed)}"))
        elif placed is None:
            live.append(_Judged(lease, run, f"held by {run}, a run the sweeper cannot place (left to its TTL)"))
        elif (state := lookup.state(*placed)) is None:
            dead.append(_Judged(lease, run, f"its run {run} no longer exists"))
        elif state in ENDED_RUN_STATES:
            dead.append(_Judged(lease, run, f"its run {run} ended ({state})"))
        else:
            live.append(_Judged(lease, run, f"its run {run} is {state}"))
    return live, dead


def _run_list(judged: list[_Judged]) -> str:
    return ", ".join(dict.fromkeys(j.run for j in judged))


def _drop_dead_leases(ec2: Any, instance_id: str, dead: list[_Judged]) -> Iterator[str]:
    for judged in dead:
        lease = judged.lease
        log.warning("Dropping %s on %s: %s", lease.describe(datetime.now(UTC)), instance_id, judged.why)
        # With its value: a lease refreshed since it was read is not deleted.
        ec2.delete_tags(Resources=[instance_id], Tags=[{"Key": lease_tag_key(lease.lease_id), "Value": lease.value}])
        yield lease.lease_id


def _leases_taken_since(ec2: Any, instance_id: str, dropped: set[str]) -> list[str]:
    """Lease ids on the instance now that were not dropped by this sweep: a run that took it meanwhile."""
    tags = ec2.describe_tags(
        Filters=[{"Name": "resource-id", "Values": [instance_id]}, {"Name": "key", "Values": [f"{LEASE_TAG_PREFIX}*"]}]
    )["Tags"]
    return [lease.lease_id for lease in map(Lease.from_tag, tags) if lease.lease_id not in dropped]


def _of_lease(command: Mapping[str, Any], lease_id: str) -> bool:
    return str(command.get("Comment", "")).startswith(command_comment(lease_id, ""))


def _act(entry: SweepEntry, call: Callable[[], Any]) -> None:
    """Carry out the entry's action; a failure becomes the entry's error."""
    try:
        call()
    except Exception as error:
        raise _ActionFailed(
            SweepEntry(
                entry.instance_id, entry.action, entry.reason, entry.run, _error_text(error), entry.dropped_leases
            )
        ) from error
    log.warning("%s %s: %s", _DONE[entry.action].capitalize(), entry.instance_id, entry.reason)


def _launched_instances(ec2: Any) -> Iterator[dict[str, Any]]:
    filters = [
        {"Name": "tag-key", "Values": [LAUNCHED_BY_TAG]},
        {"Name": "instance-state-name", "Values": list(LAUNCHED_STATES)},
    ]
    yield from _describe(ec2, filters)


def _running_named_instances(ec2: Any, named_instance_ids: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Running instances among the named ones and those carrying a vod-sr lease tag."""
    ids = set(named_instance_ids)
    for page in ec2.get_paginator("describe_tags").paginate(
        Filters=[
            {"Name": "resource-type", "Values": ["instance"]},
            {"Name": "key", "Values": [f"{LEASE_TAG_PREFIX}*"]},
        ]
    ):
        ids.update(tag["ResourceId"] for tag in page.get("Tags", []))
    ordered = sorted(ids)
    for start in range(0, len(ordered), FILTER_VALUES_PER_CALL):
        chunk = ordered[start : start + FILTER_VALUES_PER_CALL]
        filters = [
            {"Name": "instance-id", "Values": chunk},  # a filter: an id that does not exist is no error
            {"Name": "instance-state-name", "Values": ["running"]},
        ]
        yield from _describe(ec2, filters)


def _describe(ec2: Any, filters: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        for reservation in page.get("Reservations", []):
            yield from reservation.get("Instances", [])


def _launching_dags(instances: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    for instance in instances:
        if (run := split_launched_by(_tags(instance).get(LAUNCHED_BY_TAG, ""))) is not None:
            yield run[0]


def _tags(instance: Mapping[str, Any]) -> dict[str, str]:
    return {t["Key"]: t.get("Value", "") for t in instance.get("Tags") or ()}


def _leases(instance: Mapping[str, Any]) -> list[Lease]:
    tags = [t for t in instance.get("Tags") or () if t["Key"].startswith(LEASE_TAG_PREFIX)]
    return sorted((Lease.from_tag(t) for t in tags), key=lambda lease: lease.lease_id)


def _since(when: datetime | None, now: datetime) -> timedelta | None:
    if not isinstance(when, datetime):
        return None
    return now - (when if when.tzinfo else when.replace(tzinfo=UTC))


def _error_text(error: BaseException) -> str:
    response = getattr(error, "response", None)
    if isinstance(response, dict) and "Error" in response:
        return f"{response['Error'].get('Code', '')}: {response['Error'].get('Message', '')}"
    return f"{type(error).__name__}: {error}"


def airflow_run_states(ti: Any) -> RunStates:
    """Run states through the Task SDK (`ti.get_dagrun_state`, tasks have no metadata-DB access in Airflow 3); a run
    the API server does not know (HTTP 404) is None. Other errors are raised.

    The 404 reaches the task as AirflowRuntimeError (detail `status_code` 404) from a supervisor in another process, and
    as the client's own ServerResponseError under `dag.test()`, whose in-process supervisor does not translate it."""
    from airflow.sdk.api.client import ServerResponseError
    from airflow.sdk.exceptions import AirflowRuntimeError

    def run_state(dag_id: str, run_id: str) -> str | None:
        try:
            return str(getattr(state := ti.get_dagrun_state(dag_id, run_id), "value", state))
        except AirflowRuntimeError as error:
            if (error.error.detail or {}).get("status_code") == 404:
                return None
            raise
        except ServerResponseError as error:
            if error.response.status_code == 404:
                return None
            raise

    return run_state


def sweep_task(settings: Any, ti: Any, *, dry_run: bool) -> dict[str, Any]:
    """The sweeper DAG's task: sweep through the settings' AWS connection, log the table, return the report (XCom);
    fail at the end, naming them, when an instance could not be ended or judged."""
    from airflow.sdk.exceptions import AirflowFailException

    from include.vod_sr.aws import aws_client

    report = sweep(
        aws_client("ec2", settings.aws_conn_id),
        aws_client("ssm", settings.aws_conn_id),
        airflow_run_states(ti),
        named_instance_ids=settings.instance_ids,
        grace=timedelta(seconds=settings.sweep_grace),
        dry_run=dry_run,
    )
    print(report.table())
    if report.failures:
        raise AirflowFailException(f"the sweep could not end or judge: {report.failure_message()}")
    return report.to_xcom()
