"""How a run tells people how it went: SNS messages through Airflow's notifiers. Nothing configured: nothing is
added to the DAG, nothing is sent.

- **Success and failure** (`VOD_SR_SNS_TOPIC_ARN`): the DAG's `on_success_callback` / `on_failure_callback` is a
  `RunNotifier`. In Airflow 3 these DAG-level callbacks run once the run has ended, in the dag-processor (the
  scheduler sends it a DagCallbackRequest; `dag.test()` runs them in its own process), never in a task: nothing they
  do changes the run's state. The notifier reads the run's JSON report
  (`s3://<output bucket>/vod-sr-reports/<run token>.json`, `report.write_report`) through the Amazon provider's hook
  and the deployment's AWS connection, and publishes its summary through the provider's `SnsNotifier`: counts, the
  failed files (capped), each instance's running time, the run's estimated EC2 cost, the report's location and, for
  failures, the re-run link and conf. A run that ended before its report (bad input fails `plan`) says so and names
  the failed task.
- **Deadline** (`VOD_SR_DEADLINE_MINUTES`, scheduled DAGs only): a `DeadlineAlert` on `DAGRUN_QUEUED_AT` + the
  minutes, whose `AsyncCallback` is `deadline_alert`. Airflow 3.3.2 computes the deadline when the scheduler creates
  the run (queued_at: a scheduled run is created queued at the end of its data interval), checks it in every
  scheduler loop and, once it has passed, queues the callback, which runs in the triggerer with a small context (the
  run as the REST API shows it, and the deadline). Only a *successful* run's deadline is removed when it ends, so a
  run that failed before its deadline still fires it: `deadline_alert` sends nothing for a run that has ended (its
  failure was already published), nor for a backfill run (a backfill queues all its runs at once, so the minutes
  would count its waiting runs' turn in the queue).

A notification is never worth a failure or a hang: every AWS call has short timeouts and few retries, and any error
is logged and the message dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import urllib.parse
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import BaseNotifier

from include.vod_sr.settings import Settings

log = logging.getLogger(__name__)

MAX_FAILED_LISTED = 20  # failed files named in a message; the report has them all
MAX_REASON_CHARS = 200
MAX_CONF_CHARS = 4_000  # a re-run conf longer than this is left to the report (SNS takes 256 KB; mail readers less)
MAX_SUBJECT_CHARS = 100  # SNS: at most 100 printable ASCII characters, no line breaks
TOPIC_ARN = re.compile(r"arn:aws[a-z-]*:sns:(?P<region>[a-z0-9-]+):\d{12}:[A-Za-z0-9_-]{1,256}(\.fifo)?")
# Short timeouts, few retries: a DAG callback shares the dag-processor's file timeout (50 s by default) with the
# parse, and a notification must never hold anything up.
AWS_TIMEOUTS = {"connect_timeout": 3, "read_timeout": 5, "retries": {"mode": "standard", "total_max_attempts": 2}}
DEADLINE_PUBLISH_TIMEOUT = 30  # seconds the triggerer gives the deadline alert's publish
STILL_GOING = ("queued", "running")


def notification_kwargs(settings: Settings, *, scheduled: bool) -> dict[str, Any]:
    """DAG arguments (callbacks, deadline alerts) for the notifications the settings ask for: none without a topic.

    Raises ValueError for a topic ARN that is not one, and for a scheduled DAG given a deadline but no topic to
    alert (a DAG import error naming the setting, rather than a deadline nobody hears about).
    """
    if not settings.sns_topic_arn:
        if scheduled and settings.deadline_minutes:
            raise ValueError(
                f"VOD_SR_DEADLINE_MINUTES={settings.deadline_minutes} needs VOD_SR_SNS_TOPIC_ARN: the alert is "
                "published to that topic"
            )
        return {}
    topic_region(settings.sns_topic_arn)  # refuse a malformed ARN at parse time
    common = {"topic_arn": settings.sns_topic_arn, "aws_conn_id": settings.aws_conn_id}
    kwargs: dict[str, Any] = {
        "on_success_callback": RunNotifier(**common, output_bucket=settings.output_bucket, succeeded=True),
        "on_failure_callback": RunNotifier(**common, output_bucket=settings.output_bucket, succeeded=False),
    }
    if scheduled and settings.deadline_minutes:
        from airflow.sdk import AsyncCallback, DeadlineAlert, DeadlineReference

        kwargs["deadline"] = DeadlineAlert(
            name="vod-sr run still going",
            reference=DeadlineReference.DAGRUN_QUEUED_AT,
            interval=timedelta(minutes=settings.deadline_minutes),
            callback=AsyncCallback(
                deadline_alert,
                kwargs={**common, "output_bucket": settings.output_bucket, "minutes": settings.deadline_minutes},
            ),
        )
    return kwargs


def topic_region(topic_arn: str) -> str:
    """The region of an SNS topic ARN (a publish goes to the topic's region, whatever the connection's is)."""
    match = TOPIC_ARN.fullmatch(topic_arn)
    if not match:
        raise ValueError(
            f"VOD_SR_SNS_TOPIC_ARN={topic_arn!r} is not an SNS topic ARN (arn:aws:sns:<region>:<account>:<name>)"
        )
    return match.group("region")


class RunNotifier(BaseNotifier):
    """A vod-sr run's success or failure, published to the SNS topic (the DAG's on_success/on_failure callback).

    Its message is built from the run's stored report, not from a template: file names are data, and a key holding
    `{{` must reach the reader as it is.
    """

    template_fields = ()

    def __init__(self, *, topic_arn: str, aws_conn_id: str | None, output_bucket: str, succeeded: bool) -> None:
        super().__init__()
        self.topic_arn = topic_arn
        self.aws_conn_id = aws_conn_id
        self.output_bucket = output_bucket
        self.succeeded = succeeded

    def render_template_fields(self, context: Any, jinja_env: Any = None) -> None:
        """Nothing is templated (and a context without a real DAG, as in a test, needs no Jinja environment)."""

    def notify(self, context: Any) -> None:
        event = "success" if self.succeeded else "failure"
        try:
            dag_id, run_id = context["dag"].dag_id, context["run_id"]
            uri = report_uri(_output_bucket(context, self.output_bucket), dag_id, run_id)
            report, error = read_report(uri, self.aws_conn_id)
            ti = context.get("ti")
            subject, text = run_message(
                dag_id=dag_id,
                run_id=run_id,
                succeeded=self.succeeded,
                report=report,
                report_uri=uri,
                report_error=error,
                failed_task=_task_label(ti) if ti is not None and not self.succeeded else "",
                run_url=run_url(dag_id, run_id),
            )
            publish(self.topic_arn, self.aws_conn_id, subject, text, {"vod_sr_event": event, "dag_id": dag_id})
            log.info("Published the %s of %s %s to %s", event, dag_id, run_id, self.topic_arn)
        except Exception:
            log.exception("Could not publish the run's %s to %s (the run is not affected)", event, self.topic_arn)


async def deadline_alert(
    *,
    topic_arn: str,
    aws_conn_id: str | None,
    output_bucket: str,
    minutes: int,
    context: Mapping[str, Any] | None = None,
) -> str:
    """The DeadlineAlert's callback, run by the triggerer once a run's deadline has passed: publish that the run is
    still going, unless it has ended or is a backfill's. Returns what it did (the callback's result in Airflow)."""
    try:
        dag_run = dict((context or {}).get("dag_run") or {})
        deadline = dict((context or {}).get("deadline") or {})
        state, run_type = dag_run.get("state"), dag_run.get("run_type")
        if state not in STILL_GOING:
            log.info("Deadline passed for run %s, which had already ended (%s): nothing sent", dag_run, state)
            return f"not sent: the run had ended ({state})"
        if run_type == "backfill":
            log.info("Deadline passed for backfill run %s: nothing sent (backfill runs queue together)", dag_run)
            return "not sent: a backfill run"
        dag_id, run_id = dag_run.get("dag_id", "?"), dag_run.get("dag_run_id", "?")
        bucket = (dag_run.get("conf") or {}).get("output_bucket") or output_bucket
        subject, text = deadline_message(
            dag_run,
            deadline_time=deadline.get("deadline_time"),
            minutes=minutes,
            report_uri=report_uri(bucket, dag_id, run_id),
            run_url=run_url(dag_id, run_id),
        )
        claimed, why = await asyncio.wait_for(
            asyncio.to_thread(claim_alert, report_uri(bucket, dag_id, run_id), aws_conn_id), DEADLINE_PUBLISH_TIMEOUT
        )
        if not claimed:
            log.info("Deadline alert of %s %s not sent: %s", dag_id, run_id, why)
            return f"not sent: {why}"
        await asyncio.wait_for(
            apublish(topic_arn, aws_conn_id, subject, text, {"vod_sr_event": "deadline", "dag_id": dag_id}),
            DEADLINE_PUBLISH_TIMEOUT,
        )
        log.info("Published the deadline alert of %s %s to %s", dag_id, run_id, topic_arn)
        return "sent"
    except Exception as error:
        log.exception("Could not publish the deadline alert to %s (the run is not affected)", topic_arn)
        return f"not sent: {type(error).__name__}: {error}"


# The message -------------------------------------------------------------------------------------------------------


def report_uri(bucket: str, dag_id: str, run_id: str) -> str:
    from include.vod_sr.plan import run_token
    from include.vod_sr.report import REPORT_PREFIX

    return f"s3://{bucket}/{REPORT_PREFIX}{run_token(dag_id, run_id)}.json"


def run_url(dag_id: str, run_id: str) -> str:
    """The run's page in the Airflow UI, or "" when the deployment has no `[api] base_url`."""
    from airflow.configuration import conf

    base = (conf.get("api", "base_url", fallback="") or "").rstrip("/")
    if not base:
        return ""
    return f"{base}/dags/{urllib.parse.quote(dag_id, safe='')}/runs/{urllib.parse.quote(run_id, safe='')}"


def run_message(
    *,
    dag_id: str,
    run_id: str,
    succeeded: bool,
    report: Mapping[str, Any] | None,
    report_uri: str,
    report_error: str = "",
    failed_task: str = "",
    run_url: str = "",
    max_failed: int = MAX_FAILED_LISTED,
) -> tuple[str, str]:
    """(subject, text) of a run's success or failure message, from its stored report (None: there is none)."""
    outcome = "succeeded" if succeeded else "FAILED"
    lines = [f"{dag_id} run {run_id} {'succeeded' if succeeded else 'failed'}."]
    if failed_task:
        lines.append(f"Failed task: {failed_task}")
    if report is None:
        lines += [
            "",
            f"No report was stored ({report_error or 'not found'}): its report task did not get to write it"
            + ("" if succeeded else " (bad input refused by plan, before any instance started, is the usual cause)")
            + ". See the run's tasks in Airflow.",
            f"Report location: {report_uri}",
        ]
        if run_url:
            lines.append(f"Run in Airflow: {run_url}")
        return _subject(f"vod-sr {dag_id}: {outcome}, no report"), "\n".join(lines)
    counts = dict(report.get("counts") or {})
    total = sum(counts.values())
    failed = [f for f in report.get("files") or [] if f.get("status") == "failed"]
    lines += ["", f"Files: {_counts(counts)}"]
    if failed:
        lines.append(f"Failed files ({len(failed)}):")
        lines += [
            f"  {f.get('source', '?')}: {_shorten(f.get('reason', ''), MAX_REASON_CHARS)}" for f in failed[:max_failed]
        ]
        if len(failed) > max_failed:
            lines.append(f"  ... and {len(failed) - max_failed} more (all in the report)")
    lines.append(f"Instance time: {_instance_time(report.get('instance_seconds'))}")
    if report.get("cost"):
        lines.append(f"Estimated EC2 cost: {_cost(report['cost'])}")
    for instance_id, why in (report.get("instances_left_running") or {}).items():
        lines.append(f"Instance {instance_id} {why}")
    if report.get("transient_aws_errors"):
        lines.append(f"Transient AWS errors (each retried): {report['transient_aws_errors']}")
    lines.append(f"Report: {report_uri}")
    if report.get("command_output"):
        lines.append(f"Whole output of the run's SSM commands: {report['command_output']}")
    if report.get("retry_conf"):
        if report.get("rerun_link"):
            lines.append(f"Re-run only the failed files: {report['rerun_link']}")
        conf = json.dumps(report["retry_conf"], ensure_ascii=False)
        prefix = "or trigger" if report.get("rerun_link") else "Re-run only the failed files: trigger"
        if len(conf) <= MAX_CONF_CHARS:
            lines.append(f"{prefix} {dag_id} with: {conf}")
        else:
            lines.append(f"{prefix} {dag_id} with the report's retry_conf ({len(conf)} characters, too long here)")
    if run_url:
        lines.append(f"Run in Airflow: {run_url}")
    if failed:
        summary = f"{len(failed)} of {total} file(s) failed"
    elif total:
        summary = _counts(counts)
    else:
        summary = "no files to do"
    return _subject(f"vod-sr {dag_id}: {outcome}, {summary}"), "\n".join(lines)


def deadline_message(
    dag_run: Mapping[str, Any], *, deadline_time: Any, minutes: int, report_uri: str, run_url: str = ""
) -> tuple[str, str]:
    """(subject, text) of the alert for a run still going past its deadline."""
    dag_id, run_id = dag_run.get("dag_id", "?"), dag_run.get("dag_run_id", "?")
    if isinstance(deadline_time, datetime):
        deadline_time = deadline_time.isoformat(timespec="seconds")
    lines = [
        f"{dag_id} run {run_id} is still {dag_run.get('state')} {minutes} min after it was queued "
        f"(VOD_SR_DEADLINE_MINUTES; deadline {deadline_time}).",
        "",
        f"Queued at {dag_run.get('queued_at')}, started at {dag_run.get('start_date') or 'not yet'}.",
    ]
    if dag_run.get("data_interval_start") or dag_run.get("data_interval_end"):
        lines.append(f"Data interval: {dag_run.get('data_interval_start')} to {dag_run.get('data_interval_end')}.")
    lines += [
        "Its tasks in Airflow show where it is (a wait for an instance or a long chunk); it goes on unless stopped.",
        f"Its report will be at {report_uri} when it ends.",
    ]
    if run_url:
        lines.append(f"Run in Airflow: {run_url}")
    return _subject(f"vod-sr {dag_id}: still {dag_run.get('state')} past its deadline"), "\n".join(lines)


def _counts(counts: Mapping[str, int]) -> str:
    order = ["ok", "failed", "skipped", *sorted(set(counts) - {"ok", "failed", "skipped"})]
    parts = [f"{counts[status]} {status}" for status in order if counts.get(status)]
    return ", ".join(parts) if parts else "none (nothing to do)"


def _instance_time(seconds: Mapping[str, int | None] | None) -> str:
    if not seconds:
        return "none (no instance was used)"
    known = [s for s in seconds.values() if s is not None]
    each = ", ".join(f"{i} {'unknown' if s is None else _duration(s)}" for i, s in seconds.items())
    if len(seconds) == 1:
        return each
    return f"{_duration(sum(known))} in all ({each})"


def _cost(cost: Mapping[str, Any]) -> str:
    """The report's estimated cost: its total, and how many instances it leaves out (see the report for why)."""
    from include.vod_sr.cost import format_money

    text = format_money(cost.get("total") or 0, cost.get("currency") or "?")
    unpriced = len(cost.get("unpriced") or [])
    return text + (f" (partial: {unpriced} instance(s) unpriced, see the report)" if unpriced else "")


def _duration(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _shorten(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _subject(text: str) -> str:
    """SNS's subject rule: printable ASCII, no line breaks, at most 100 characters."""
    text = "".join(c if " " <= c <= "~" else "?" for c in " ".join(text.split()))
    return text if len(text) <= MAX_SUBJECT_CHARS else text[: MAX_SUBJECT_CHARS - 3] + "..."


def _task_label(ti: Any) -> str:
    map_index = getattr(ti, "map_index", -1)
    return f"{ti.task_id}" + (f" (lane {map_index})" if map_index is not None and map_index >= 0 else "")


def _output_bucket(context: Mapping[str, Any], default: str) -> str:
    """The run's output bucket (the form may override the deployment's): its params, else its conf, else the
    deployment's default."""
    params = context.get("params") or {}
    bucket = params.get("output_bucket") if isinstance(params, Mapping) else None
    if not bucket:
        conf = getattr(context.get("dag_run"), "conf", None) or {}
        bucket = conf.get("output_bucket") if isinstance(conf, Mapping) else None
    return bucket or default


# AWS ---------------------------------------------------------------------------------------------------------------


def _config() -> Any:
    from botocore.config import Config

    return Config(**AWS_TIMEOUTS)


def read_report(uri: str, aws_conn_id: str | None) -> tuple[dict[str, Any] | None, str]:
    """The stored report and "", or None and why not (no such report, access denied, ...)."""
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
    from botocore.exceptions import ClientError

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    s3 = AwsBaseHook(aws_conn_id=aws_conn_id, client_type="s3", config=_config()).get_conn()
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        return None, "not found" if code in ("NoSuchKey", "404") else f"could not read it: {code or error}"
    except Exception as error:  # a timeout, no credentials: the message still goes out, without the report
        return None, f"could not read it: {type(error).__name__}: {error}"
    try:
        return json.loads(body), ""
    except ValueError as error:
        return None, f"it is not JSON: {error}"


def claim_alert(report: str, aws_conn_id: str | None) -> tuple[bool, str]:
    """Whether this process may send a run's deadline alert: it creates `<report>.deadline-alert` only if it does not
    exist (S3's conditional write). Airflow 3.3.2 may run one deadline callback in two triggerers at once (seen with
    two: both fired within half a second); the second finds the marker and sends nothing. The marker names its
    writer: when botocore retries our own write after its answer was lost (a read timeout on a busy triggerer), the
    retry meets our marker (412) and the claim is still ours; taking it for another triggerer's lost the alert (seen
    in the full-stack test under load: both triggerers said "already sent", nothing was sent). If the marker cannot be
    written for another reason, the alert goes out anyway: a duplicate is better than silence."""
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
    from botocore.exceptions import ClientError

    bucket, _, key = f"{report.removesuffix('.json')}.deadline-alert".removeprefix("s3://").partition("/")
    writer = f"claimed by {uuid.uuid4()}\n".encode()
    try:
        s3 = AwsBaseHook(aws_conn_id=aws_conn_id, client_type="s3", config=_config()).get_conn()
        s3.put_object(Bucket=bucket, Key=key, Body=writer, IfNoneMatch="*")
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
            if _marker(s3, bucket, key) == writer:
                return True, ""  # our own write, retried
            return False, "already sent by another triggerer"
        log.warning("Could not mark the deadline alert as sent (%s): sending it anyway", code or error)
    except Exception as error:
        why = f"{type(error).__name__}: {error}"
        log.warning("Could not mark the deadline alert as sent (%s): sending it anyway", why)
    return True, ""


def _marker(s3: Any, bucket: str, key: str) -> bytes:
    """The deadline-alert marker's body; b"" when it cannot be read (then the claim is taken for another's)."""
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as error:
        log.warning("Could not read the deadline-alert marker s3://%s/%s: %s", bucket, key, error)
        return b""


def _sns_notifier(topic_arn: str, aws_conn_id: str | None, subject: str, text: str, attributes: dict[str, str]) -> Any:
    """The Amazon provider's SnsNotifier for one message, its hook given short timeouts."""
    from airflow.providers.amazon.aws.hooks.sns import SnsHook
    from airflow.providers.amazon.aws.notifications.sns import SnsNotifier

    region = topic_region(topic_arn)
    notifier = SnsNotifier(
        aws_conn_id=aws_conn_id,
        target_arn=topic_arn,
        message=text,
        subject=subject,
        message_attributes=attributes,
        region_name=region,
    )
    notifier.hook = SnsHook(aws_conn_id=aws_conn_id, region_name=region, config=_config())  # a cached_property
    return notifier


def publish(topic_arn: str, aws_conn_id: str | None, subject: str, text: str, attributes: dict[str, str]) -> None:
    # notify() directly, not the notifier's __call__: that would render the text (file names) as a Jinja template.
    _sns_notifier(topic_arn, aws_conn_id, subject, text, attributes).notify({})


async def apublish(
    topic_arn: str, aws_conn_id: str | None, subject: str, text: str, attributes: dict[str, str]
) -> None:
    await _sns_notifier(topic_arn, aws_conn_id, subject, text, attributes).async_notify({})
