"""
## vod-sr sweeper

Ends what vod-sr left running after its runs ended, when a run's own teardown could not (a crashed scheduler, a
worker lost with its task, a run deleted). Every 15 minutes by default (`VOD_SR_SWEEP_SCHEDULE`):

- an instance vod-sr **launched** (tag `vod-sr:launched-by` = `<dag_id>/<run_id>`) is **terminated** once that run
  has ended (success or failed) or no longer exists; one launched less than `VOD_SR_SWEEP_GRACE_SECONDS` (600) ago
  whose run cannot be found yet is left alone, and one whose run is queued or running is never touched;
- a **named** instance (`VOD_SR_INSTANCE_IDS`, or any instance with a `vod-sr:lease:*` tag) that is running is
  **stopped** when no live lease and no live vod-sr command keeps it up. A lease whose run has ended is dead, however
  young: it is dropped and that run's commands still live are cancelled. A lease of a queued or running run, or a live
  vod-sr command, leaves the instance alone, as does a start less than the grace period ago;
- an instance tagged `vod-sr:keep-running` is left alone, and any other instance is never looked at.

The task logs a table of every instance it looked at (instance, action, run, reason) and returns it. An AWS error on
one instance does not stop the others; the task then fails at the end, naming them. Trigger it with
`{"dry_run": true}` to see what it would do without changing anything. Logic and tests: `include/vod_sr/sweeper.py`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param, get_current_context, task

from include.vod_sr.settings import Settings

SETTINGS = Settings.from_env()

with DAG(
    "vod_sr_sweeper",
    schedule=None if SETTINGS.sweep_schedule.lower() == "none" else SETTINGS.sweep_schedule,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["vod-sr"],
    params={
        "dry_run": Param(
            False,
            type="boolean",
            title="Dry run",
            description="Only report what the sweep would terminate and stop; change nothing.",
        )
    },
    default_args={"pool": SETTINGS.pool, "retries": 0, "execution_timeout": timedelta(minutes=10)},
) as vod_sr_sweeper:

    @task
    def sweep() -> dict:
        """Terminate launched instances whose run ended, stop named instances nothing keeps up; report each."""
        from include.vod_sr.sweeper import sweep_task

        context = get_current_context()
        return sweep_task(SETTINGS, context["ti"], dry_run=bool(context["params"]["dry_run"]))

    sweep()
