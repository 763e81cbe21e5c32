"""
## VOD super-resolution batch

Runs a Bluewhale super-resolution model over a list of source videos on a GPU instance through SSM Run Command,
verifies every output in S3, writes a report and stops the instance again, also when something failed.

1. **plan** resolves and validates the sources and names the outputs; bad input fails here, before any GPU starts.
2. **acquire** (setup) takes a lease on the instance and starts it if needed.
3. **wait_for_agent** waits until EC2 says running *and* the SSM agent is Online.
4. **install_cli** installs the AWS CLI if the instance lacks it (a no-op otherwise).
5. **chunk.send / chunk.wait / chunk.verify**, per chunk of files: send one SSM command, wait for it deferred
   (no worker slot held), check each output exists, is non-empty and was written by this run.
6. **report** logs one row per file, stores a JSON report in S3 and fails the run if any file failed,
   printing a conf that re-runs only the failures.
7. **release** (teardown) drops the lease and stops the instance unless another run still uses it.

Trigger it with a list of keys or `s3://` URIs; see the README for configuration and IAM.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import PokeReturnValue, dag, get_current_context, task, task_group

from include.vod_sr.operators import WaitForSsmCommandOperator
from include.vod_sr.params import trigger_form
from include.vod_sr.settings import Settings

SETTINGS = Settings.from_env()


@dag(
    schedule=None,
    params=trigger_form(SETTINGS),
    doc_md=__doc__,
    tags=["vod-sr"],
    default_args={"retries": 2, "retry_delay": timedelta(seconds=30)},
)
def vod_sr_batch() -> None:
    @task(retries=0)
    def plan() -> list[dict[str, Any]]:
        """Resolve, validate and chunk the sources; fail here, before any GPU starts.

        Returns one work item per chunk (mapped over); the run's summary goes to the XCom key "summary".
        """
        from dataclasses import asdict

        from airflow.sdk import Variable
        from airflow.sdk.exceptions import AirflowFailException

        from include.vod_sr.aws import aws_client
        from include.vod_sr.catalog import ModelError, resolve_model
        from include.vod_sr.plan import BatchRequest, PlanError, plan_batch, run_token

        context = get_current_context()
        try:
            request = BatchRequest.from_params(context["params"])
            model = resolve_model(request.model, Variable.get(SETTINGS.models_variable, default=None))
            planned = plan_batch(
                request,
                aws_client("s3", SETTINGS.aws_conn_id),
                run_token=run_token(context["dag"].dag_id, context["run_id"]),
            )
        except (PlanError, ModelError) as error:
            raise AirflowFailException(f"bad input, nothing was started: {error}") from None
        summary = planned.to_xcom()
        print(
            f"Planned {summary['file_count']} file(s) in {len(planned.chunks)} chunk(s); "
            f"{len(planned.skipped)} skipped because their output exists"
        )
        context["ti"].xcom_push(key="summary", value={k: v for k, v in summary.items() if k != "chunks"})
        return [{"chunk": chunk, "run_token": planned.run_token, "model": asdict(model)} for chunk in summary["chunks"]]

    @task(retries=4, retry_exponential_backoff=True, retry_delay=timedelta(seconds=SETTINGS.start_retry_delay))
    def acquire(summary: dict[str, Any]) -> dict[str, str]:
        """Take a lease on the instance and start it if stopped (retried with backoff on capacity errors)."""
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

        from include.vod_sr.aws import aws_client
        from include.vod_sr.instance import InstanceUnusable, drop_lease, ensure_started, take_lease

        instance_id, run_token = summary["instance_id"], summary["run_token"]
        if summary["file_count"] == 0:
            raise AirflowSkipException("every output already exists: no instance needed")
        ec2 = aws_client("ec2", SETTINGS.aws_conn_id)
        take_lease(ec2, instance_id, run_token, get_current_context()["run_id"])
        try:
            ensure_started(
                ec2, instance_id, timeout=SETTINGS.instance_state_timeout, poll_interval=SETTINGS.poll_interval
            )
        except InstanceUnusable as error:
            drop_lease(ec2, instance_id, run_token)
            raise AirflowFailException(str(error)) from None
        except Exception:
            drop_lease(ec2, instance_id, run_token)
            raise
        return {"instance_id": instance_id, "lease_id": run_token}

    @task.sensor(poke_interval=SETTINGS.poll_interval, timeout=SETTINGS.agent_online_timeout, mode="reschedule")
    def wait_for_agent(acquired: dict[str, str]) -> PokeReturnValue:
        """Done when EC2 reports running and the SSM agent reports Online."""
        from include.vod_sr.aws import aws_client
        from include.vod_sr.instance import is_ready

        instance_id = acquired["instance_id"]
        ready = is_ready(aws_client("ec2", SETTINGS.aws_conn_id), aws_client("ssm", SETTINGS.aws_conn_id), instance_id)
        return PokeReturnValue(is_done=ready, xcom_value=acquired)

    @task
    def install_cli(acquired: dict[str, str]) -> str:
        """Install the AWS CLI on the instance unless `aws --version` already works there."""
        from include.vod_sr.aws import aws_client
        from include.vod_sr.commands import run_and_wait
        from include.vod_sr.instance import command_comment
        from include.vod_sr.script import INSTALL_CLI_SCRIPT

        instance_id = acquired["instance_id"]
        invocation = run_and_wait(
            aws_client("ssm", SETTINGS.aws_conn_id),
            instance_id,
            INSTALL_CLI_SCRIPT,
            comment=command_comment(acquired["lease_id"], "install AWS CLI"),
            timeout=SETTINGS.install_cli_timeout,
            poll_interval=SETTINGS.poll_interval,
            delivery_timeout=SETTINGS.command_delivery_timeout,
        )
        print(invocation["StandardOutputContent"])
        return instance_id

    @task_group
    def chunk(work: dict[str, Any]) -> Any:
        @task(retries=0)  # a retry could start the same files twice on the GPU
        def send(work: dict[str, Any]) -> dict[str, Any]:
            """Send one SSM command that runs the model over every file of the chunk."""
            from include.vod_sr.aws import aws_client
            from include.vod_sr.catalog import SrModel
            from include.vod_sr.commands import send_command
            from include.vod_sr.instance import command_comment
            from include.vod_sr.plan import Chunk
            from include.vod_sr.script import render_sr_script

            planned = Chunk.from_xcom(work["chunk"])
            run_token, model = work["run_token"], work["model"]
            sr_model = SrModel(
                **{
                    **model,
                    "output_args": tuple(model["output_args"]),
                    "env": tuple(tuple(pair) for pair in model["env"]),
                }
            )
            timeout = get_current_context()["params"]["execution_timeout"]
            command_id = send_command(
                aws_client("ssm", SETTINGS.aws_conn_id),
                planned.instance_id,
                render_sr_script(planned, sr_model, run_token),
                comment=command_comment(run_token, f"chunk {planned.index} ({len(planned.files)} files)"),
                execution_timeout=timeout,
                delivery_timeout=SETTINGS.command_delivery_timeout,
            )
            print(f"Sent command {command_id}: {len(planned.files)} file(s) on {planned.instance_id}")
            return {"command_id": command_id, "instance_id": planned.instance_id, "timeout": timeout}

        sent = send(work)
        waited = WaitForSsmCommandOperator(
            task_id="wait",
            command=sent,
            poll_interval=SETTINGS.poll_interval,
            delivery_timeout=SETTINGS.command_delivery_timeout,
            aws_conn_id=SETTINGS.aws_conn_id,
            retries=0,
        )

        @task(trigger_rule="all_done")
        def verify(work: dict[str, Any]) -> dict[str, Any]:
            """Check each output: exists, non-empty, written by this run, the size the instance reported."""
            from include.vod_sr.aws import aws_client
            from include.vod_sr.plan import Chunk
            from include.vod_sr.verify import verify_chunk

            ti = get_current_context()["ti"]
            waited_result = ti.xcom_pull(task_ids=waited.task_id, map_indexes=ti.map_index)
            results = waited_result["results"] if waited_result else None
            planned = Chunk.from_xcom(work["chunk"])
            files = verify_chunk(aws_client("s3", SETTINGS.aws_conn_id), planned, work["run_token"], results)
            return {"chunk": planned.index, "files": files}

        return sent >> waited >> verify(work)

    @task(trigger_rule="all_done", retries=0)
    def report(summary: dict[str, Any], verified: list[dict[str, Any]] | dict[str, Any]) -> dict[str, Any]:
        """Log a row per file, store the JSON report in S3, fail the run if any file failed."""
        from airflow.sdk.exceptions import AirflowFailException

        from include.vod_sr.aws import aws_client
        from include.vod_sr.plan import FileJob
        from include.vod_sr.report import BatchFailed, build_report, format_table, raise_if_failed, write_report

        context = get_current_context()
        result = build_report(
            run_id=context["run_id"],
            run_token=summary["run_token"],
            params=context["params"],
            # Airflow 3.3 hands over a mapped task's only result unwrapped when it has a single map index.
            verified=[chunk["files"] for chunk in ([verified] if isinstance(verified, dict) else verified or [])],
            skipped=[FileJob.from_xcom(f) for f in summary["skipped"]],
            planned_count=summary["file_count"],
        )
        print(format_table(result))
        print(
            "Report: "
            + write_report(aws_client("s3", SETTINGS.aws_conn_id), context["params"]["output_bucket"], result)
        )
        try:
            raise_if_failed(result)
        except BatchFailed as error:
            raise AirflowFailException(str(error)) from None
        return result["counts"]

    @task
    def release(acquired: dict[str, str]) -> str:
        """Drop this run's lease; stop the instance unless another run or command still uses it."""
        from include.vod_sr.aws import aws_client
        from include.vod_sr.instance import release as release_instance

        outcome = release_instance(
            aws_client("ec2", SETTINGS.aws_conn_id),
            aws_client("ssm", SETTINGS.aws_conn_id),
            acquired["instance_id"],
            acquired["lease_id"],
            stop=get_current_context()["params"]["stop_when_done"],
            timeout=SETTINGS.instance_state_timeout,
            poll_interval=SETTINGS.poll_interval,
        )
        print(f"Instance {acquired['instance_id']}: {outcome}")
        return outcome

    planned = plan()
    summary = planned["summary"]
    acquired = acquire(summary)
    verified = chunk.expand(work=planned)
    # The group returns its verify task's output; the CLI must be ready before the group's first task.
    install_cli(wait_for_agent(acquired)) >> verified.operator.task_group
    report(summary, verified)
    # The teardown must not be downstream of report: with on_failure_fail_dagrun it would then be the only
    # task that decides the run's state, and a failed report would end in a successful run.
    verified >> release(acquired).as_teardown(setups=acquired, on_failure_fail_dagrun=True)


vod_sr_batch()

if __name__ == "__main__":
    vod_sr_batch().test()
