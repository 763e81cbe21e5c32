"""Deployment defaults, read from the environment so a deployment never edits code.

Everything here is read at DAG parse time, so it must stay cheap: environment variables only, no Airflow
Variables, no network. Each value can still be overridden per run through the trigger form.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from include.vod_sr.cost import DEFAULT_CURRENCY, DEFAULT_HOURLY_RATES, Rates
from include.vod_sr.fleet import MAX_FLEET_SIZE


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a whole number") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r} must be at least {minimum}")
    return value


def _env_list(name: str) -> tuple[str, ...]:
    """A list: a JSON array (for values holding commas) or comma-separated."""
    raw = os.environ.get(name, "").strip()
    if raw.startswith("["):
        try:
            values = json.loads(raw)
        except ValueError as error:
            raise ValueError(f"{name} is not a JSON list: {error}") from None
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{name} must be a JSON list of strings")
    else:
        values = raw.split(",")
    return tuple(v.strip() for v in values if v.strip())


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if not value > 0:
        raise ValueError(f"{name}={raw!r} must be greater than zero")
    return value


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if raw.lower() in ("true", "1", "yes", "on"):
        return True
    if raw.lower() in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{name}={raw!r} is not true or false")


def _env_rates(name: str, defaults: Mapping[str, float]) -> dict[str, float]:
    """Hourly rates: a JSON object of instance type -> price per hour, merged over `defaults`."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return dict(defaults)
    example = '{"g6e.xlarge": 1.861}'
    try:
        given = json.loads(raw)
    except ValueError as error:
        raise ValueError(f"{name} is not JSON ({error}); give an object such as {example}") from None
    if not isinstance(given, dict):
        raise ValueError(f"{name} must be a JSON object of instance type -> price per hour, such as {example}")
    rates = dict(defaults)
    for instance_type, rate in given.items():
        if not instance_type.strip():
            raise ValueError(f"{name} has an empty instance type")
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate):
            raise ValueError(f"{name}: the rate of {instance_type!r} is {rate!r}, not a number")
        if rate < 0:
            raise ValueError(f"{name}: the rate of {instance_type!r} is {rate!r}, below zero")
        rates[instance_type.strip()] = float(rate)
    return rates


def _env_cost_rates() -> Rates:
    """VOD_SR_COST_CURRENCY and VOD_SR_HOURLY_RATES. The built-in rates are USD prices: in another currency only the
    rates given apply (an instance type without one is reported unpriced, not priced in the wrong currency)."""
    currency = os.environ.get("VOD_SR_COST_CURRENCY", "").strip() or DEFAULT_CURRENCY
    defaults = DEFAULT_HOURLY_RATES if currency == DEFAULT_CURRENCY else {}
    return Rates(currency, _env_rates("VOD_SR_HOURLY_RATES", defaults))


def _env_fleet() -> dict[str, object]:
    """VOD_SR_LAUNCH_TEMPLATE, VOD_SR_LAUNCH_TEMPLATE_VERSION, VOD_SR_FLEET_SIZE, VOD_SR_SPOT and
    VOD_SR_FLEET_INSTANCE_TYPES, checked together: a default fleet needs a template and excludes default instances."""
    template = os.environ.get("VOD_SR_LAUNCH_TEMPLATE", "").strip()
    size = _env_int("VOD_SR_FLEET_SIZE", 0, minimum=0)
    if size > MAX_FLEET_SIZE:
        raise ValueError(f"VOD_SR_FLEET_SIZE={size} is over {MAX_FLEET_SIZE}, the most instances one run may have")
    if size and not template:
        raise ValueError("VOD_SR_FLEET_SIZE is set but VOD_SR_LAUNCH_TEMPLATE is not: name the launch template")
    if size and os.environ.get("VOD_SR_INSTANCE_IDS", os.environ.get("VOD_SR_INSTANCE_ID", "")).strip():
        raise ValueError(
            "VOD_SR_FLEET_SIZE and VOD_SR_INSTANCE_IDS are both set, but a run uses either a fleet or named instances: "
            "unset one (a run can still ask for the other in its conf)"
        )
    return {
        "launch_template": template,
        "launch_template_version": os.environ.get("VOD_SR_LAUNCH_TEMPLATE_VERSION", "").strip() or "$Default",
        "fleet_size": size,
        "spot": _env_bool("VOD_SR_SPOT", False),
        "fleet_instance_types": _env_list("VOD_SR_FLEET_INSTANCE_TYPES"),
    }


@dataclass(frozen=True)
class Settings:
    """Deployment-wide defaults for `vod_sr_batch`; see the README's Configuration table."""

    aws_conn_id: str = "aws_default"
    instance_ids: tuple[str, ...] = ()
    # Fleets (include/vod_sr/fleet.py): runs launch `fleet_size` instances from this EC2 launch template (id lt-... or
    # name) instead of using `instance_ids`, and terminate them at the end. 0: runs use the named instances.
    launch_template: str = ""
    launch_template_version: str = "$Default"
    fleet_size: int = 0
    spot: bool = False  # Spot first, On-Demand when Spot has no room
    fleet_instance_types: tuple[str, ...] = ()  # tried in turn on capacity errors; empty: the template's type
    source_bucket: str = ""
    output_bucket: str = ""
    default_model: str = "A"
    models_variable: str = "vod_sr_models"
    # Bounds of every wait, in seconds. GPU cold starts and SSM registration can each take minutes.
    instance_state_timeout: int = 600
    agent_online_timeout: int = 600
    install_cli_timeout: int = 900
    # For AMIs with the AWS CLI baked in: install_cli only checks `aws --version` (and fails clearly without it).
    skip_cli_install: bool = False
    poll_interval: int = 15
    command_delivery_timeout: int = 300
    # Retry delay for starting the instance (doubles each retry): EC2 capacity often returns within minutes.
    start_retry_delay: int = 60
    # Seconds before a failed task's next try (every vod-sr task but acquire, which has start_retry_delay).
    retry_delay: int = 30
    # Seconds after run_chunks defers before its trigger first polls: a resume within a second or two of the deferral
    # can meet the scheduler still handling the deferral and lose the try (apache/airflow#72716). 0 only where no
    # scheduler races the resume (dag.test()).
    defer_settle: int = 5
    # Seconds each wait_for_agent poke looks for the agent (once a second) before it is rescheduled.
    agent_quick_wait: int = 20
    # Runs of one DAG share its GPU instances: a second run would wait for the GPU with its execution timeouts
    # already ticking. One at a time queues it visibly instead; raise it when runs name disjoint instances.
    max_active_runs: int = 1
    # SR streams per GPU: each GPU slot runs one chunk at a time (script.py). 1 is the safe choice for vendor SR.
    streams_per_gpu: int = 1
    # Commands the instances' SSM agent executes at once: 5 unless the AMI's amazon-ssm-agent.json raises
    # Mds.CommandWorkersLimit. run_chunks keeps no more than this in flight per instance.
    agent_command_workers: int = 5
    # Seconds an output's duration may differ from its source's before verify fails the file.
    duration_tolerance: float = 0.5
    # The Airflow pool of every vod-sr task: a pool of its own caps how many of them call EC2 and SSM at once
    # across all runs and DAGs (deferred waits hold no slot unless the pool counts deferred tasks).
    pool: str = "default_pool"
    # vod_sr_nightly (dags/vod_sr_nightly.py), defined only when it has prefixes to watch.
    nightly_prefixes: tuple[str, ...] = ()
    nightly_schedule: str = "@daily"  # cron or preset; each run takes its data interval [start, end)
    nightly_timezone: str = "UTC"
    # A multipart upload's LastModified is when it *began*: a window is taken this long after it ends, so an upload
    # that began inside it has had this long to complete before the listing. It bounds the upload time, not the delay.
    nightly_settle: int = 3600
    nightly_start_date: str = "2026-01-01"  # earliest date a backfill may cover
    # vod_sr_events (dags/vod_sr_events.py), defined only when S3 event notifications reach this SQS queue.
    events_queue_url: str = ""
    # Seconds the queue watcher pauses after a long poll (20 s) that found nothing: an upload made in the pause waits
    # up to this long before it is seen. Each poll is an SQS request (about 100,000 a month at 5 s).
    events_poll_pause: int = 5
    # vod_sr_sweeper (dags/vod_sr_sweeper.py): when it runs (cron or preset; "none": only when triggered), and how long
    # after its launch an instance whose run cannot be found yet is left alone (the run may not be visible yet).
    sweep_schedule: str = "*/15 * * * *"
    sweep_grace: int = 600
    # Notifications (include/vod_sr/notify.py). An SNS topic ARN: each run's success or failure is published there.
    sns_topic_arn: str = ""
    # Scheduled DAGs (vod_sr_nightly): alert the topic when a run is still going this many minutes after it was
    # queued (Airflow's DeadlineAlert on DAGRUN_QUEUED_AT). 0: no deadline.
    deadline_minutes: int = 0
    # The report's estimated EC2 cost (include/vod_sr/cost.py): price per hour of each instance type, and its currency
    # (VOD_SR_HOURLY_RATES over the built-in us-east-1 On-Demand list prices; VOD_SR_COST_CURRENCY).
    rates: Rates = field(default_factory=Rates)
    # vod_sr_nightly's default run budget, in the rates' currency (the `budget` param; None: no budget): once the
    # run's instance time at those rates reaches it, no new chunk is sent (operators.RunChunksOperator).
    nightly_budget: float | None = None

    @classmethod
    def from_env(cls) -> Settings:
        defaults = cls()
        return cls(
            aws_conn_id=os.environ.get("VOD_SR_AWS_CONN_ID", defaults.aws_conn_id),
            instance_ids=tuple(
                i.strip()
                for i in os.environ.get("VOD_SR_INSTANCE_IDS", os.environ.get("VOD_SR_INSTANCE_ID", "")).split(",")
                if i.strip()
            ),
            **_env_fleet(),
            source_bucket=os.environ.get("VOD_SR_SOURCE_BUCKET", defaults.source_bucket),
            output_bucket=os.environ.get("VOD_SR_OUTPUT_BUCKET", defaults.output_bucket),
            default_model=os.environ.get("VOD_SR_DEFAULT_MODEL", defaults.default_model),
            models_variable=os.environ.get("VOD_SR_MODELS_VARIABLE", defaults.models_variable),
            instance_state_timeout=_env_int("VOD_SR_INSTANCE_STATE_TIMEOUT", defaults.instance_state_timeout),
            agent_online_timeout=_env_int("VOD_SR_AGENT_ONLINE_TIMEOUT", defaults.agent_online_timeout),
            install_cli_timeout=_env_int("VOD_SR_INSTALL_CLI_TIMEOUT", defaults.install_cli_timeout),
            skip_cli_install=_env_bool("VOD_SR_SKIP_CLI_INSTALL", defaults.skip_cli_install),
            poll_interval=_env_int("VOD_SR_POLL_INTERVAL", defaults.poll_interval),
            command_delivery_timeout=_env_int("VOD_SR_COMMAND_DELIVERY_TIMEOUT", defaults.command_delivery_timeout),
            start_retry_delay=_env_int("VOD_SR_START_RETRY_DELAY", defaults.start_retry_delay),
            retry_delay=_env_int("VOD_SR_RETRY_DELAY", defaults.retry_delay, minimum=0),
            defer_settle=_env_int("VOD_SR_DEFER_SETTLE_SECONDS", defaults.defer_settle, minimum=0),
            agent_quick_wait=_env_int("VOD_SR_AGENT_QUICK_WAIT_SECONDS", defaults.agent_quick_wait, minimum=0),
            max_active_runs=_env_int("VOD_SR_MAX_ACTIVE_RUNS", defaults.max_active_runs),
            streams_per_gpu=_env_int("VOD_SR_STREAMS_PER_GPU", defaults.streams_per_gpu),
            agent_command_workers=_env_int("VOD_SR_AGENT_COMMAND_WORKERS", defaults.agent_command_workers),
            duration_tolerance=_env_float("VOD_SR_DURATION_TOLERANCE", defaults.duration_tolerance),
            pool=os.environ.get("VOD_SR_POOL", "").strip() or defaults.pool,
            nightly_prefixes=_env_list("VOD_SR_NIGHTLY_PREFIXES"),
            nightly_schedule=os.environ.get("VOD_SR_NIGHTLY_SCHEDULE", "").strip() or defaults.nightly_schedule,
            nightly_timezone=os.environ.get("VOD_SR_NIGHTLY_TIMEZONE", "").strip() or defaults.nightly_timezone,
            nightly_settle=_env_int("VOD_SR_NIGHTLY_SETTLE_SECONDS", defaults.nightly_settle, minimum=0),
            nightly_start_date=os.environ.get("VOD_SR_NIGHTLY_START_DATE", "").strip() or defaults.nightly_start_date,
            events_queue_url=os.environ.get("VOD_SR_EVENTS_QUEUE_URL", "").strip(),
            events_poll_pause=_env_int("VOD_SR_EVENTS_POLL_PAUSE_SECONDS", defaults.events_poll_pause, minimum=0),
            sweep_schedule=os.environ.get("VOD_SR_SWEEP_SCHEDULE", "").strip() or defaults.sweep_schedule,
            sweep_grace=_env_int("VOD_SR_SWEEP_GRACE_SECONDS", defaults.sweep_grace, minimum=0),
            sns_topic_arn=os.environ.get("VOD_SR_SNS_TOPIC_ARN", "").strip(),
            deadline_minutes=_env_int("VOD_SR_DEADLINE_MINUTES", defaults.deadline_minutes, minimum=0),
            rates=_env_cost_rates(),
            nightly_budget=_env_float("VOD_SR_NIGHTLY_BUDGET", 0) or None,
        )
