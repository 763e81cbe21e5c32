"""The vod-sr DAG, built once for every DAG id that runs it (see `vod_sr_dag`). The DAG files in `dags/` only name
the DAG, its schedule and where its sources come from; the tasks are wired here."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

from airflow.sdk import DAG, PokeReturnValue, get_current_context, task, task_group

from include.vod_sr.assets import OUTPUTS_ALIAS, outputs_asset, outputs_event_extra
from include.vod_sr.operators import CliInstall, RunChunksOperator
from include.vod_sr.params import trigger_form
from include.vod_sr.settings import Settings

Selection = Literal["params", "interval", "events"]


def vod_sr_dag(
    dag_id: str,
    *,
    doc_md: str,
    schedule: Any = None,
    selection: Selection = "params",
    settings: Settings | None = None,
    **dag_kwargs: Any,
) -> DAG:
    """The vod-sr DAG under `dag_id`: the one implementation behind vod_sr_batch, vod_sr_nightly and the event
    mode. `selection` says where the sources come from:

    - "params": the run's params (sources, prefixes, manifest), as an operator or the REST API gives them;
    - "interval": the objects under the params' prefixes whose LastModified falls in the run's data interval,
      shifted back by the settle time (`nightly.selection_window`); an empty interval is a quick success;
    - "events": the objects named by the S3 event notifications behind the run's triggering asset events
      (`events.sources_from_asset_events`), added to the params' sources.

    Notifications (SNS on success and failure, a deadline alert for scheduled runs) come from the settings
    (`notify.notification_kwargs`); nothing configured adds nothing.
    """
    from include.vod_sr.notify import notification_kwargs

    settings = settings or Settings.from_env()
    dag_kwargs = {**notification_kwargs(settings, scheduled=schedule is not None), **dag_kwargs}
    with DAG(
        dag_id,
        schedule=schedule,
        params=trigger_form(
            settings,
            prefixes=settings.nightly_prefixes if selection == "interval" else (),
            budget=settings.nightly_budget if selection == "interval" else None,
        ),
        max_active_runs=settings.max_active_runs,  # runs share the GPU instances: queue them (README, Configuration)
        doc_md=doc_md,
        tags=["vod-sr"],
        default_args={"retries": 2, "retry_delay": timedelta(seconds=settings.retry_delay), "pool": settings.pool},
        **dag_kwargs,
    ) as dag:
        _wire(settings, selection)
    return dag


def _name_lane(lane: dict[str, Any] | None = None, *, label: str = "") -> str:
    """Name the running mapped task in the UI by its lane, or by a `label` made from it (the tasks'
    map_index_template reads `lane_label`); returns the name."""
    from include.vod_sr.plan import lane_label

    name = lane_label(lane) if lane is not None else label
    get_current_context()["lane_label"] = name  # type: ignore[typeddict-unknown-key]
    return name


def _wire(settings: Settings, selection: Selection) -> None:
    @task(retries=0)
    def plan() -> list[dict[str, Any]]:
        """Resolve, validate and chunk the sources; fail here, before any GPU starts.

        Returns one lane per instance that has work (mapped over); the run's summary goes to XCom key "summary".
        """
        from airflow.sdk import Variable
        from airflow.sdk.exceptions import AirflowFailException

        from include.vod_sr.aws import aws_client
        from include.vod_sr.catalog import ModelError, resolve_model
        from include.vod_sr.fleet import fleet_tags
        from include.vod_sr.nightly import selection_window
        from include.vod_sr.plan import BatchRequest, PlanError, deal, run_token, select_files
        from include.vod_sr.stored_plan import store_plan

        context = get_current_context()
        dag_id, run_id = context["dag"].dag_id, context["run_id"]
        token = run_token(dag_id, run_id)
        try:
            window = None
            if selection == "interval":
                window = selection_window(
                    context.get("data_interval_start"), context.get("data_interval_end"), settings.nightly_settle
                )
            params = context["params"]
            if selection == "events":
                from include.vod_sr.events import late_asset_events, sources_from_asset_events, still_present

                # Non-videos, test events and malformed messages are logged and left out, as are uploads deleted
                # since; the events Airflow 3.3 queued after this run's first one are taken too (events.py).
                triggering = context["triggering_asset_events"]
                arrived = sources_from_asset_events(triggering, params.get("extensions"))
                late = sources_from_asset_events(late_asset_events(context), params.get("extensions"))
                late = [uri for uri in late if uri not in arrived]
                arrived = still_present([*arrived, *late], aws_client("s3", settings.aws_conn_id))
                # An event batch with no usable upload is an empty plan: a quick success, no instance started.
                params = {
                    **params,
                    "sources": [*(params.get("sources") or []), *arrived],
                    "allow_empty": bool(triggering),
                }
                print(f"{len(arrived)} upload(s) named by the S3 events behind this run ({len(late)} queued late)")
            request = BatchRequest.from_params(params, modified_window=window)
            model = resolve_model(request.model, Variable.get(settings.models_variable, default=None))
            s3 = aws_client("s3", settings.aws_conn_id)
            files = select_files(request, s3)
            try:
                tags = fleet_tags(dag_id, run_id, token) if request.fleet is not None else {}
            except ValueError as error:
                raise PlanError(str(error)) from None
        except (PlanError, ModelError) as error:
            raise AirflowFailException(f"bad input, nothing was started: {error}") from None
        # Everything is checked: a fleet is launched now, never for a run that has nothing to do.
        launched = _launch_fleet(request, files, tags) if request.fleet is not None and files.todo else []
        try:
            planned = deal(request, token, files, tuple(launched) or request.instance_ids, launched=bool(launched))
            print(
                f"Planned {planned.file_count} file(s) in {len(planned.chunks)} chunk(s) on "
                f"{len({c.instance_id for c in planned.chunks})} instance(s); {len(planned.skipped)} skipped because "
                "their output exists"
            )
            # The chunks go to S3, XCom gets references: O(instances) whatever the number of files (stored_plan.py).
            lanes, summary = store_plan(s3, planned, model.to_xcom())
            context["ti"].xcom_push(key="summary", value=summary)
        # Any error (BaseException too): no lane would ever terminate what was launched. A task ended by Airflow
        # (a run marked failed: SIGTERM, which only calls on_kill, then SIGKILL) runs no cleanup: the sweeper's case.
        except BaseException:
            if launched:
                _terminate_launched(launched, "the plan task failed after launching them")
            raise
        return [lane.to_xcom() for lane in lanes]

    def _launch_fleet(request: Any, files: Any, tags: dict[str, str]) -> list[str]:
        """Launch the run's fleet (plan.BatchRequest.fleet): as many instances as asked, but never more than the run
        has chunks. Fails the task, with nothing left running, when none could be launched."""
        from dataclasses import replace

        from airflow.sdk.exceptions import AirflowFailException

        from include.vod_sr.fleet import FleetError, launch_client, launch_fleet

        fleet = request.fleet
        wanted = min(fleet.count, files.chunk_count(request.chunk_size))
        if wanted < fleet.count:
            print(f"Launching {wanted} instance(s), not {fleet.count}: the run has only {wanted} chunk(s)")
        ti = get_current_context()["ti"]
        try:
            launched = launch_fleet(
                launch_client(settings.aws_conn_id),
                replace(fleet, count=wanted),
                tags,
                # One RunInstances per try of this task and launch option: a retried call returns what it launched.
                client_token=f"vod-sr-{tags['vod-sr:run-token']}-{ti.try_number}",
            )
        except FleetError as error:
            raise AirflowFailException(f"the fleet could not be launched: {error}") from None
        print(
            f"Launched {len(launched)} of {wanted} instance(s) from launch template {fleet.launch_template!r} "
            f"({fleet.version}), terminated at the end of the run: {', '.join(launched)}"
        )
        return launched

    def _terminate_launched(instance_ids: list[str], why: str) -> None:
        """Terminate instances launched for this run that no teardown will terminate; never raises (the caller is
        already failing): what could not be terminated is left to the sweeper, and said so."""
        from include.vod_sr.fleet import launch_client, terminate_fleet

        try:
            terminate_fleet(launch_client(settings.aws_conn_id), instance_ids)
        except Exception as error:
            print(f"Could not terminate {', '.join(instance_ids)} ({why}): {error}; the sweeper terminates them")
        else:
            print(f"Terminated {', '.join(instance_ids)}: {why}")

    @task_group
    def lane(lane: dict[str, Any]) -> Any:
        # Mapped task instances are named by their lane in the UI ("i-0abc… (10 files)"), not by a map index: each task
        # puts the lane's label in its context; run_chunks' template reads its own lane argument, so its name shows
        # from its start, also while it is deferred.
        by_lane = {"map_index_template": "{{ lane_label | default('') }}"}

        @task(
            retries=4,
            retry_exponential_backoff=True,
            retry_delay=timedelta(seconds=settings.start_retry_delay),
            **by_lane,
        )
        def acquire(lane: dict[str, Any]) -> dict[str, str]:
            """Take a lease on the instance and start it if stopped. Capacity errors are retried with backoff; errors
            no retry fixes (a permission missing, an unknown instance) fail at once, naming the error."""
            label = _name_lane(lane)
            from airflow.sdk.exceptions import AirflowFailException

            from include.vod_sr.aws import aws_client
            from include.vod_sr.instance import InstanceUnusable, acquire_instance

            instance_id, lease_id = lane["instance_id"], lane["run_token"]
            ti = get_current_context()["ti"]
            try:
                acquire_instance(
                    aws_client("ec2", settings.aws_conn_id),
                    instance_id,
                    lease_id,
                    get_current_context()["run_id"],
                    timeout=settings.instance_state_timeout,
                    poll_interval=settings.poll_interval,
                )
            except Exception as error:
                # The teardown is skipped when its setup failed: an instance launched for this run is terminated here
                # once no retry will follow.
                final = isinstance(error, InstanceUnusable) or ti.try_number > ti.max_tries
                if lane.get("terminate_when_done") and final:
                    _terminate_launched([instance_id], "its lane could not acquire it")
                if isinstance(error, InstanceUnusable):
                    raise AirflowFailException(str(error)) from None
                raise
            return {"instance_id": instance_id, "lease_id": lease_id, "label": label}

        @task.sensor(
            poke_interval=settings.poll_interval,
            timeout=settings.agent_online_timeout,
            mode="reschedule",
            **by_lane,
        )
        def wait_for_agent(acquired: dict[str, str]) -> PokeReturnValue:
            """Done when EC2 reports running and the SSM agent reports Online. An instance stopped under this run
            (another run's release) is started again, within this wait's bound."""
            _name_lane(label=acquired.get("label", ""))
            from airflow.sdk.exceptions import AirflowFailException

            from include.vod_sr.aws import aws_client
            from include.vod_sr.instance import InstanceUnusable, ready_within, refresh_lease

            instance_id, lease_id = acquired["instance_id"], acquired["lease_id"]
            holder = get_current_context()["run_id"]
            ec2, ssm = aws_client("ec2", settings.aws_conn_id), aws_client("ssm", settings.aws_conn_id)
            try:
                # Each poke looks every second for a while: the agent is usually Online within seconds of `running`.
                ready = ready_within(
                    ec2, ssm, instance_id, lease_id=lease_id, holder=holder, seconds=settings.agent_quick_wait
                )
            except InstanceUnusable as error:
                raise AirflowFailException(str(error)) from None
            if ready:
                refresh_lease(ec2, instance_id, lease_id, holder)
            return PokeReturnValue(is_done=ready, xcom_value=acquired)

        @task(trigger_rule="all_done", **by_lane)
        def verify(lane: dict[str, Any]) -> dict[str, Any]:
            """Check each output: exists, non-empty, written by this run, the size the instance reported."""
            _name_lane(lane)
            from include.vod_sr.aws import aws_client
            from include.vod_sr.catalog import SrModel
            from include.vod_sr.plan import Chunk
            from include.vod_sr.stored_plan import Lane, load_chunks, load_left, store_verified
            from include.vod_sr.verify import split_left_for_budget, verify_chunks

            work = Lane.from_xcom(lane)
            s3 = aws_client("s3", settings.aws_conn_id)
            # Chunks the run's budget kept from being sent are not verified: their files are left for the next run.
            sent, left = split_left_for_budget([Chunk.from_xcom(c) for c in load_chunks(s3, work)], load_left(s3, work))
            files = verify_chunks(
                s3,
                work.output_bucket,
                work.run_token,
                sent,
                ssm=aws_client("ssm", settings.aws_conn_id),
                ec2=aws_client("ec2", settings.aws_conn_id),
                scale=SrModel.from_xcom(work.model).scale,
                duration_tolerance=settings.duration_tolerance,
            )
            return store_verified(s3, work, [*files, *left])  # the records go to S3, the report reads them there

        @task(**by_lane)
        def release(acquired: dict[str, str], lane: dict[str, Any]) -> str:
            """Drop this run's lease; stop the instance unless another vod-sr run's lease or command still uses it.
            The outcome goes to XCom "release" for the report, which says when and why an instance was left up."""
            _name_lane(lane)
            from airflow.sdk.exceptions import AirflowFailException

            from include.vod_sr.aws import aws_client
            from include.vod_sr.instance import (
                RELEASE_XCOM_KEY,
                InstanceUnusable,
                release_record,
                unusable_when_unfixable,
            )
            from include.vod_sr.instance import release as release_instance

            instance_id, ti = acquired["instance_id"], get_current_context()["ti"]
            try:
                ec2 = aws_client("ec2", settings.aws_conn_id)
                with unusable_when_unfixable(instance_id):
                    outcome = release_instance(
                        ec2,
                        aws_client("ssm", settings.aws_conn_id),
                        instance_id,
                        acquired["lease_id"],
                        stop=lane["stop_when_done"],
                        # Launched for this run (its fleet): terminated, not stopped. Otherwise the instance's own tags
                        # decide (instance.release).
                        terminate=lane.get("terminate_when_done") or None,
                        timeout=settings.instance_state_timeout,
                        poll_interval=settings.poll_interval,
                    )
            except Exception as error:
                outcome = f"not released, it may still be running: {type(error).__name__}: {error}"
                ti.xcom_push(key=RELEASE_XCOM_KEY, value={"instance_id": instance_id, "outcome": outcome})
                if isinstance(error, InstanceUnusable):
                    raise AirflowFailException(str(error)) from None
                raise
            record = release_record(ec2, instance_id, outcome)  # adds the instance's running time, for the report
            print(f"Instance {instance_id}: {outcome}; up {record['instance_seconds']} s since its start")
            ti.xcom_push(key=RELEASE_XCOM_KEY, value=record)
            return outcome

        acquired = acquire(lane)
        ready = wait_for_agent(acquired)
        # run_chunks first installs the AWS CLI (a no-op when the AMI has it) and counts the GPUs in one command, then
        # keeps every slot (GPU x streams) busy: in one task, so the instance does not idle across a task boundary.
        run_chunks = RunChunksOperator(
            task_id="run_chunks",
            lane=lane,
            install_cli=CliInstall(skip_install=settings.skip_cli_install, timeout=settings.install_cli_timeout),
            rates=settings.rates,  # the run's `budget` param is in their currency
            streams_per_gpu=settings.streams_per_gpu,
            agent_command_workers=settings.agent_command_workers,
            poll_interval=settings.poll_interval,
            defer_settle=settings.defer_settle,
            delivery_timeout=settings.command_delivery_timeout,
            release_timeout=settings.instance_state_timeout,
            aws_conn_id=settings.aws_conn_id,
            # A worker lost mid-task is retried: the retry re-attaches to the chunks SSM already has for this run
            # and sends only the others (RunChunksOperator._reattach). Failed chunks fail it for good.
            retries=2,
            map_index_template="{{ task.lane.label | default('') }}",
        )
        # The instance is released as soon as its commands end; verify needs only S3 and runs beside the stop.
        # Verify stays outside the setup's scope so it still reports a lane whose instance never started. The
        # teardown is never downstream of the report: with on_failure_fail_dagrun it would then be the only task
        # deciding the run's state, and a failed report would end in a successful run. The report follows it.
        released = release(acquired, lane).as_teardown(setups=acquired, on_failure_fail_dagrun=True)
        ready >> run_chunks >> released
        verified = verify(lane)
        run_chunks >> verified
        return {"verified": verified, "released": released}

    @task(trigger_rule="all_done", retries=0, outlets=[OUTPUTS_ALIAS])
    def report(
        summary: dict[str, Any],
        lanes: list[dict[str, Any]],
        verified: list[dict[str, Any]] | dict[str, Any] | None,
    ) -> dict[str, Any]:
        """Log a row per file, store the JSON report in S3, fail the run if any file failed."""
        from airflow.configuration import conf
        from airflow.sdk.exceptions import AirflowFailException

        from include.vod_sr.aws import aws_client
        from include.vod_sr.instance import RELEASE_XCOM_KEY
        from include.vod_sr.operators import TRANSIENT_ERRORS_XCOM_KEY
        from include.vod_sr.plan import Chunk
        from include.vod_sr.report import (
            BatchFailed,
            build_report,
            format_table,
            per_lane,
            raise_if_failed,
            write_report,
        )
        from include.vod_sr.stored_plan import Lane, load_chunks, load_skipped, load_verified

        context = get_current_context()
        s3 = aws_client("s3", settings.aws_conn_id)
        bucket, token = summary["output_bucket"], summary["run_token"]
        result = build_report(
            run_id=context["run_id"],
            run_token=token,
            params=context["params"],
            planned=[
                job for lane in lanes for c in load_chunks(s3, Lane.from_xcom(lane)) for job in Chunk.from_xcom(c).files
            ],
            verified=load_verified(s3, bucket, per_lane(verified)),
            skipped=load_skipped(s3, bucket, token),
            transient_aws_errors=per_lane(
                context["ti"].xcom_pull(task_ids="lane.run_chunks", key=TRANSIENT_ERRORS_XCOM_KEY)
            ),
            released=per_lane(context["ti"].xcom_pull(task_ids="lane.release", key=RELEASE_XCOM_KEY)),
            dag_id=context["dag"].dag_id,
            ui_base_url=conf.get("api", "base_url", fallback="") or "",
            rates=settings.rates,
        )
        print(format_table(result))
        report_uri = write_report(s3, context["params"]["output_bucket"], result)
        print("Report: " + report_uri)
        try:
            raise_if_failed(result)
        except BatchFailed as error:
            raise AirflowFailException(str(error)) from None
        extra = outputs_event_extra(result, report_uri, context["dag"].dag_id)
        if extra is not None:  # downstream DAGs scheduled on the outputs asset start with this run's outputs
            context["outlet_events"][OUTPUTS_ALIAS].add(outputs_asset(settings), extra=extra)
        return result["counts"]

    planned = plan()
    lanes = lane.expand(lane=planned)
    # The report says which instances were left running and why, so it waits for each lane's release (a teardown
    # upstream of the report, never downstream: the report alone decides the run's state).
    lanes["released"] >> report(planned["summary"], planned, lanes["verified"])
