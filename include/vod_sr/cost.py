"""The estimated EC2 cost of a run: each instance's running time in the start the run used (`instance.release_record`)
at its type's hourly rate.

An estimate of the instances' compute only: EBS volumes (billed while stopped too), S3, data transfer and SSM are not
counted, nor taxes, credits or discounts. Linux instances are billed per second with a minimum of 60 seconds per
start. The running time is the whole start the run used, so runs sharing an instance each count that start.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

DEFAULT_CURRENCY = "USD"
MINIMUM_BILLED_SECONDS = 60  # EC2 Linux: per second, at least a minute each time the instance starts
MONEY_DECIMALS = 4
DESCRIBE_FILTER_VALUES = 200  # values one DescribeInstances filter takes

# AWS list prices: us-east-1, Linux, On-Demand, USD per hour. Check them against the EC2 pricing page before relying
# on them, and override them (VOD_SR_HOURLY_RATES) for other regions, Spot, Savings Plans or Reserved Instances.
# A plain dict, not a MappingProxyType: Settings holds it, and Airflow may deep-copy or pickle what tasks hold.
DEFAULT_HOURLY_RATES: Mapping[str, float] = {
    "g6e.xlarge": 1.861,
    "g6e.2xlarge": 2.24208,
    "g6e.4xlarge": 3.00424,
    "g6e.8xlarge": 4.52856,
    "g6e.12xlarge": 10.49264,
    "g6e.16xlarge": 7.57719,
    "g6e.24xlarge": 15.06559,
    "g6e.48xlarge": 30.13118,
}


@dataclass(frozen=True)
class Rates:
    """Price per hour of each instance type, in `currency`."""

    currency: str = DEFAULT_CURRENCY
    hourly: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_HOURLY_RATES), hash=False)


def instance_cost(seconds: int | None, instance_type: str | None, rates: Rates) -> dict[str, Any]:
    """One instance's cost for `seconds` of running time in one start: `cost` is None when the time, the type or its
    rate is unknown (`unpriced_reason` says which)."""
    rate = rates.hourly.get(instance_type) if instance_type else None
    billed = None if seconds is None else max(MINIMUM_BILLED_SECONDS, seconds)
    return {
        "instance_type": instance_type,
        "seconds": seconds,
        "billed_seconds": billed,
        "hourly_rate": rate,
        "cost": None if billed is None or rate is None else round(billed * rate / 3600, MONEY_DECIMALS),
    }


def unpriced_reason(entry: Mapping[str, Any], currency: str = DEFAULT_CURRENCY) -> str | None:
    """Why an `instance_cost` entry has no cost, or None when it has one."""
    reasons = []
    if entry.get("seconds") is None:
        reasons.append("its running time is unknown (EC2 gave no launch or stop time)")
    if not entry.get("instance_type"):
        reasons.append("its instance type is unknown")
    elif entry.get("hourly_rate") is None:
        reasons.append(f"no {currency} hourly rate for {entry['instance_type']} (set VOD_SR_HOURLY_RATES)")
    return "; ".join(reasons) or None


def run_cost(released_records: Iterable[Mapping[str, Any]], rates: Rates) -> dict[str, Any]:
    """The run's estimated cost from the release records (`instance_id`, `instance_seconds`, `instance_type`).

    `total` sums the instances that could be priced; `partial` is True when some could not (they are listed under
    `unpriced` with the reason), so a partial total is never read as the whole.
    """
    instances = {
        r["instance_id"]: instance_cost(r.get("instance_seconds"), r.get("instance_type"), rates)
        for r in released_records
    }
    unpriced = [
        {"instance_id": instance_id, "reason": reason}
        for instance_id, entry in instances.items()
        if (reason := unpriced_reason(entry, rates.currency)) is not None
    ]
    known = [entry["cost"] for entry in instances.values() if entry["cost"] is not None]
    return {
        "currency": rates.currency,
        "total": round(math.fsum(known), MONEY_DECIMALS),
        "partial": bool(unpriced),
        "instances": instances,
        "unpriced": unpriced,
    }


def format_money(amount: float, currency: str) -> str:
    """An amount as reports and messages show it: "1.2345 USD"."""
    return f"{amount:.{MONEY_DECIMALS}f} {currency}"


@dataclass(frozen=True)
class Spend:
    """What a run's instances have cost so far (`spend_so_far`), in `currency`."""

    currency: str
    total: float
    unpriced: tuple[str, ...] = ()  # instances left out of `total`: type, rate or running time unknown

    def line(self) -> str:
        left_out = ""
        if self.unpriced:
            left_out = f" ({len(self.unpriced)} instance(s) not priced: {', '.join(self.unpriced)})"
        return f"about {format_money(self.total, self.currency)} spent so far{left_out}"


def spend_so_far(ec2: Any, instance_ids: Iterable[str], rates: Rates, *, since: datetime, now: datetime) -> Spend:
    """The run's instances' cost so far: each one's running time in its current (or last) start, counted from its
    LaunchTime or `since` (the run's start: an instance already up for another run is counted from there), whichever
    is later, to now (or to its stop), billed with EC2's 60 s minimum per start at its type's hourly rate.

    Instances are looked up with an `instance-id` filter, 200 ids per call (the filter's limit): unlike InstanceIds,
    it skips an id EC2 no longer knows (a launched instance terminated an hour ago) instead of failing the whole
    call, which would leave the run with no budget. Such an instance is left out, as are those whose type has no rate
    or whose stop time EC2 does not give (both listed in `unpriced`)."""
    from include.vod_sr.instance import _stop_time

    ids = sorted(set(instance_ids))
    total, unpriced = 0.0, []
    if not ids:
        return Spend(rates.currency, 0.0)
    paginator = ec2.get_paginator("describe_instances")
    found: dict[str, Mapping[str, Any]] = {}
    for start in range(0, len(ids), DESCRIBE_FILTER_VALUES):
        batch = ids[start : start + DESCRIBE_FILTER_VALUES]
        for page in paginator.paginate(Filters=[{"Name": "instance-id", "Values": batch}]):
            for reservation in page.get("Reservations", []):
                for instance in reservation.get("Instances", []):
                    found[instance["InstanceId"]] = instance
    for instance_id in ids:
        instance = found.get(instance_id)
        if instance is None:
            continue
        launched = instance.get("LaunchTime")
        state = instance.get("State", {}).get("Name", "")
        if launched is None:
            unpriced.append(instance_id)
            continue
        launched = launched if launched.tzinfo else launched.replace(tzinfo=UTC)
        until = now if state in ("pending", "running") else _stop_time(instance.get("StateTransitionReason", ""))
        start_at = max(launched, since)
        if until is None:
            unpriced.append(instance_id)  # stopped, but EC2 does not say when
            continue
        if until < start_at:
            continue  # stopped before the run started: nothing of this run's
        entry = instance_cost(round((until - start_at).total_seconds()), instance.get("InstanceType"), rates)
        if entry["cost"] is None:
            unpriced.append(instance_id)
        else:
            total += entry["cost"]
    return Spend(rates.currency, round(total, MONEY_DECIMALS), tuple(unpriced))
