"""Operators for vod-sr.

Imported by the DAG file, so botocore and the provider are imported only where they are used.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from include.vod_sr.cost import Rates

TRANSIENT_ERRORS_XCOM_KEY = "transient_aws_errors"
# Commands out per GPU slot: see RunChunksOperator.
IN_FLIGHT_PER_SLOT = 3
# Commands the SSM agent executes at once (aws/amazon-ssm-agent, agent/appconfig/constants.go,
# DefaultCommandWorkersLimit = 5; `Mds.CommandWorkersLimit` in the AMI's amazon-ssm-agent.json raises it). More go
# to the agent's queue, then stay Pending in SSM, and a cancel waits behind them.
AGENT_COMMAND_WORKERS = 5
# Seconds of 1-second polls of the CLI install before the poll interval: the usual no-op ends within one or two.
QUICK_POLLS = 10
# Seconds after a deferral before its trigger first polls (the default of `defer_settle`): a resume within a second or
# two of the deferral can meet the scheduler still handling the deferral's exit and lose the try (apache/airflow#72716).
# The chunks waiting for a slot are already on the instance, so the GPUs do not feel it.
DEFER_SETTLE_SECONDS = 5
# A chunk sent again after its instance went down under it runs as chunk RESEND_INDEX_BASE + its index: its own file
# list and results objects, its own script header. Plans have at most limits.MAX_CHUNKS (99,999) chunks.
RESEND_INDEX_BASE = 100_000


@dataclass(frozen=True)
class CliInstall:
    """The command run_chunks sends before its first chunk: it installs the AWS CLI unless `aws --version` already
    works (`skip_install`: only checks that it does, VOD_SR_SKIP_CLI_INSTALL) and counts the instance's GPUs, within
    `timeout` seconds. In the same task as the first send, so the instance does not idle across a task boundary."""

    skip_install: bool = False
    timeout: int = 900


class RunChunksOperator(BaseOperator):
    """Run one instance's chunks, one SSM command per chunk, waiting deferred (no worker slot held).

    At most `in_flight` commands are out at a time, by default three per slot of the instance (a slot is one GPU x
    one stream): a chunk holds its slot only while its model runs (see `script.render_sr_script`), so while one
    chunk's model runs in a slot, others fetch their input and wait to take it, or measure and upload what they made.
    Each GPU goes straight from one model run to the next while Airflow resumes this task to send the chunk after.
    (Two per slot left GPUs waiting in the bench: a chunk spends a fetch before its model run and its checks and
    uploads after, and the next send waits for the poll, the resume and the agent.) A failed
    chunk does not stop the others; the task fails at the end, with each failed command's Status, StatusDetails, exit
    code and output tails in its log. When the last command ends it releases the
    instance at once (see `_release_early`).

    While chunks run, the deferred wait logs their progress (`chunk 3/20 on i-0abc: 7/10 files done (1 failed)`),
    read from each live chunk's results object (see `SsmCommandsTrigger`). The task's context gets `lane_label`
    (see `lane_label`) for its map index template.

    Transient AWS errors (throttling, 5xx, dropped connections) never fail the task: the trigger keeps polling until
    each command's deadline, and the reads after a command ended log them and go on. Each chunk's entry in the
    returned list counts them (`transient_errors`); the task logs the lane's total and pushes it to XCom under
    `TRANSIENT_ERRORS_XCOM_KEY` for the report.

    A retry (the worker died) re-attaches to what earlier tries sent (`_reattach`). A chunk whose command died
    because its instance went down under it is sent again once, for the files it had not finished, after starting
    the instance again (`_resend_unfinished`).

    :param lane: the plan's work for one instance: `instance_id`, `run_token`, `model`, `output_bucket`,
        `execution_timeout` (each chunk's budget from taking the instance's lock), `file_timeout` and `chunks`.
    :param gpus: the instance's GPU count, when known beforehand; with `install_cli`, the count it reports.
    :param install_cli: send this first and wait for it (polling each second at first: a CLI already installed
        answers within a second or two), then the chunks; None: the instance is ready (tests, a custom DAG).
    :param streams_per_gpu: chunks run at once on each GPU (VOD_SR_STREAMS_PER_GPU).
    :param rates: hourly rates for the run's budget (the `budget` param, in `rates.currency`): before sending more
        chunks it prices the run's instance time so far (`cost.spend_so_far`); once that reaches the budget it sends
        no more, lets the running chunks finish and stores the chunks it did not send (`stored_plan.store_left`), whose
        files the report lists as left for the next run. None, or no budget in the params: no check.
    :param in_flight: commands out at once on the instance; None: three per slot (`gpus * streams_per_gpu`), so no
        slot idles between two chunks, but never more than `agent_command_workers`.
    :param agent_command_workers: commands the instance's SSM agent executes at once (`AGENT_COMMAND_WORKERS`,
        VOD_SR_AGENT_COMMAND_WORKERS): an instance with more slots than this leaves the rest idle (logged).
    :param poll_interval: seconds between status polls in the triggerer.
    :param defer_settle: seconds after each deferral before the trigger's first poll (`DEFER_SETTLE_SECONDS`).
    :param delivery_timeout: seconds SSM may take to list an invocation after SendCommand.
    :param release_timeout: bound of the wait for `running` should the instance still be pending when released.
    :param aws_conn_id: Airflow connection for AWS.
    :param region_name: AWS region; the connection's when None.
    """

    template_fields: Sequence[str] = ("lane", "gpus")

    def __init__(
        self,
        *,
        lane: Mapping[str, Any],
        gpus: int = 1,
        streams_per_gpu: int = 1,
        install_cli: CliInstall | None = None,
        rates: Rates | None = None,
        in_flight: int | None = None,
        agent_command_workers: int = AGENT_COMMAND_WORKERS,
        poll_interval: float = 15,
        defer_settle: float = DEFER_SETTLE_SECONDS,
        delivery_timeout: int = 300,
        release_timeout: int = 600,
        aws_conn_id: str | None = "aws_default",
        region_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.lane = lane
        self.gpus = gpus
        self.streams_per_gpu = streams_per_gpu
        self.install_cli = install_cli
        self.rates = rates
        self._budget_stop: dict[str, Any] | None = None  # set when the budget stopped the sends (see `_check_budget`)
        self._in_flight = in_flight
        self.agent_command_workers = agent_command_workers
        self.release_timeout = release_timeout
        self.poll_interval = poll_interval
        self.defer_settle = defer_settle
        self.delivery_timeout = delivery_timeout
        self.aws_conn_id = aws_conn_id
        self.region_name = region_name
        self._sent: list[dict[str, Any]] = []
        # Chunks that succeeded and were reported: counted, not carried (see `_advance`).
        self._succeeded = 0
        self._succeeded_transient_errors = 0
        # Set when the lane's instance went down under its chunks and cannot be started again (terminated, a Spot
        # interruption): nothing more is sent to it (see `_advance`).
        self._instance_gone: str | None = None

    @property
    def slots(self) -> int:
        """Chunks the instance runs at once: one per GPU per stream (`gpus` is install_cli's count, known only at
        run time)."""
        return max(1, int(self.gpus)) * max(1, int(self.streams_per_gpu))

    @property
    def in_flight(self) -> int:
        """Commands out at once: three per slot (one whose model runs there, two fetching, waiting or uploading), as
        many as the instance's agent executes at most: a command past that waits in the agent, unseen, with its
        execution timeout not yet ticking but its place in the lane taken, and cancels queue behind it."""
        if self._in_flight is not None:
            return self._in_flight
        return max(1, min(IN_FLIGHT_PER_SLOT * self.slots, int(self.agent_command_workers)))

    @cached_property
    def ssm(self) -> Any:
        from include.vod_sr.aws import aws_client

        return aws_client("ssm", self.aws_conn_id)

    @cached_property
    def send_ssm(self) -> Any:
        """SSM for the chunks' SendCommand: botocore never resends it (commands.send_chunk_once)."""
        from include.vod_sr.aws import aws_client
        from include.vod_sr.commands import SEND_CONFIG

        return aws_client("ssm", self.aws_conn_id, SEND_CONFIG)

    @cached_property
    def s3(self) -> Any:
        from include.vod_sr.aws import aws_client

        return aws_client("s3", self.aws_conn_id)

    @cached_property
    def ec2(self) -> Any:
        from include.vod_sr.aws import aws_client

        return aws_client("ec2", self.aws_conn_id)

    def _load_chunks(self) -> None:
        """The lane arrives as a reference (stored_plan.Lane); its chunks are read from S3 at each start and resume
        (a lane given with its `chunks` is used as it is)."""
        if "chunks" not in self.lane:
            from include.vod_sr.stored_plan import Lane, load_chunks

            self.lane = {**self.lane, "chunks": load_chunks(self.s3, Lane.from_xcom(self.lane))}

    def execute(self, context: Any) -> dict[str, Any]:
        from include.vod_sr.plan import lane_label

        context["lane_label"] = lane_label(self.lane)
        self._load_chunks()
        reattached = self._reattach()
        self._budget_stop = self._stored_budget_stop()
        if self.install_cli is not None and self._budget_stop is None and len(reattached) < len(self.lane["chunks"]):
            # Chunks are left to send: install the CLI and count the GPUs first. A retry that finds every chunk sent
            # only re-attaches (its instance may even be released already).
            self.gpus = self._install_cli(context, self.install_cli)
        if self.slots > self.in_flight:
            self.log.warning(
                "%s has %s GPU slots but its SSM agent runs %s commands at once: %s slot(s) stay idle. Raise "
                "Mds.CommandWorkersLimit in the AMI's amazon-ssm-agent.json and VOD_SR_AGENT_COMMAND_WORKERS with it.",
                self.lane["instance_id"],
                self.slots,
                self.in_flight,
                self.slots - self.in_flight,
            )
        return self._advance(context, reattached)

    def _stored_budget_stop(self) -> dict[str, Any] | None:
        """The budget stop an earlier try of this task recorded (`stored_plan.store_left`), so that a retry sends
        none of the chunks it kept back: verify reports those as left, not verified."""
        from include.vod_sr.stored_plan import load_left_of

        lane = self.lane
        left = load_left_of(self.s3, lane["output_bucket"], lane["run_token"], lane["instance_id"])
        if left is None:
            return None
        self.log.info("An earlier try stopped the sends for the run's budget: sending nothing more")
        return {name: left[name] for name in ("budget", "spent", "currency", "chunks") if name in left}

    def _install_cli(self, context: Any, install: CliInstall) -> int:
        """Install the AWS CLI (or check it, `install.skip_install`) and count the GPUs in one command; the count.

        A retry runs it again (cancelling the earlier try's command if still live): a no-op when the CLI is there."""
        from include.vod_sr.commands import run_and_wait
        from include.vod_sr.instance import command_comment, refresh_lane_lease
        from include.vod_sr.script import check_cli_script, install_cli_script, parse_gpu_count

        refresh_lane_lease(self.lane, context["run_id"], self.aws_conn_id)
        invocation = run_and_wait(
            self.ssm,
            self.lane["instance_id"],
            # apt may wait two thirds of the timeout for its locks; the rest is for the download and the install.
            check_cli_script(count_gpus=True)
            if install.skip_install
            else install_cli_script(lock_wait=install.timeout * 2 // 3, count_gpus=True),
            comment=command_comment(self.lane["run_token"], "install AWS CLI"),
            timeout=install.timeout,
            poll_interval=max(1, round(self.poll_interval)),  # whole seconds for botocore's waiter
            delivery_timeout=self.delivery_timeout,
            # SSM stores the whole output there; a failure shows its true end and the link (commands.py)
            output_bucket=self.lane["output_bucket"],
            s3=self.s3,
            quick_polls=QUICK_POLLS,
        )
        self.log.info("AWS CLI on %s:\n%s", self.lane["instance_id"], invocation["StandardOutputContent"])
        try:
            return parse_gpu_count(invocation["StandardOutputContent"])
        except ValueError:  # the count comes first, so only output cut short loses it: run one slot
            self.log.warning("No GPU count in the output; running one chunk at a time on this instance")
            return 1

    def _reattach(self) -> list[dict[str, Any]]:
        """What earlier tries of this task sent, read from SSM's own record, so that a retry re-attaches instead of
        sending again (a worker can die between two sends, or after a SendCommand whose answer it never read).

        A chunk whose command still runs is waited on again, with the bounds of its send; a chunk whose command ended
        is not sent again (its outcome stands, its per-file results are in S3); only chunks never sent are sent. A
        chunk that SSM holds twice (a SendCommand resent after its answer was lost) keeps its first command and the
        other live ones are cancelled.

        A chunk's file list is written to S3 just before its SendCommand, so a lane with none has sent nothing and
        SSM is not asked (a first try costs one S3 listing); otherwise one ListCommands, bounded by the oldest list.
        Chunks are sent in the lane's order, so what was sent is the first part of the lane's chunks.
        """
        from include.vod_sr.commands import sent_chunk_commands
        from include.vod_sr.plan import existing_objects
        from include.vod_sr.script import chunk_keys
        from include.vod_sr.sources import S3Object

        lane, chunks = self.lane, self.lane["chunks"]
        bucket, token = lane["output_bucket"], lane["run_token"]
        lists = existing_objects(self.s3, [S3Object(bucket, chunk_keys(token, chunk["index"])[0]) for chunk in chunks])
        if not lists:
            return []
        found = sent_chunk_commands(
            self.ssm, lane["instance_id"], token, min(item["LastModified"] for item in lists.values())
        )
        sent_count = next((n for n, chunk in enumerate(chunks) if chunk["index"] not in found), len(chunks))
        out_of_order = [chunk["index"] for chunk in chunks[sent_count:] if chunk["index"] in found]
        if out_of_order:
            raise AirflowFailException(
                f"SSM has commands of chunks {out_of_order} on {lane['instance_id']} but none of chunk "
                f"{chunks[sent_count]['index']}, which is sent before them: not sending anything rather than guessing. "
                "The run's teardown cancels this run's commands still running."
            )
        if found:
            self.log.info(
                "An earlier try sent chunks %s to %s: re-attaching to them instead of sending them again",
                [chunk["index"] for chunk in chunks[:sent_count]],
                lane["instance_id"],
            )
        sent = []
        for chunk in chunks[:sent_count]:
            entry, status = self._reattached(chunk, found[chunk["index"]])
            resent = found.get(RESEND_INDEX_BASE + chunk["index"])
            if resent:
                first_command_id = entry["command_id"]
                entry, status = self._reattached({**chunk, "index": RESEND_INDEX_BASE + chunk["index"]}, resent)
                entry.update(chunk=chunk["index"], resent=True, first_command_id=first_command_id)
            if entry["outcome"] is not None:
                self._after_end(entry, status)
            sent.append(entry)
        return sent

    def _reattached(self, chunk: Mapping[str, Any], commands: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
        """The entry `_send` made for `chunk`, rebuilt from its commands in SSM's record (oldest first), and the
        Status of the command kept."""
        from include.vod_sr.commands import Outcome, cancel_commands, invocation_outcome

        def live(command: Mapping[str, Any]) -> bool:
            return invocation_outcome(command["Status"]) is Outcome.PENDING

        kept = (
            next((command for command in commands if command["Status"] == "Success"), None)
            or next((command for command in commands if live(command)), None)
            or commands[-1]
        )
        duplicates = [command for command in commands if command is not kept and live(command)]
        if duplicates:
            self.log.warning(
                "Chunk %s is in SSM %s times (a SendCommand resent after its answer was lost): keeping command %s, "
                "cancelling %s",
                chunk["index"],
                len(commands),
                kept["CommandId"],
                ", ".join(command["CommandId"] for command in duplicates),
            )
            cancel_commands(
                self.ssm, [{"command_id": c["CommandId"], "instance_id": chunk["instance_id"]} for c in duplicates]
            )
        requested = kept["RequestedDateTime"].timestamp()
        execution_timeout = int(kept["Parameters"].get("executionTimeout", [self.lane["execution_timeout"]])[0])
        delivery_timeout = int(kept.get("TimeoutSeconds") or self.delivery_timeout)
        entry = {
            "chunk": chunk["index"],
            "command_id": kept["CommandId"],
            "instance_id": chunk["instance_id"],
            "deadline": requested + execution_timeout + delivery_timeout,
            "delivery_deadline": requested + delivery_timeout,
            "sent_at": requested,
            "outcome": None if live(kept) else invocation_outcome(kept["Status"]).value,
            "transient_errors": 0,
        }
        files = _commented_file_count(kept.get("Comment", ""))
        if files is None and chunk["index"] < RESEND_INDEX_BASE:  # a resend's own files are fewer than its chunk's
            files = len(chunk["files"])
        if files is not None:
            entry["files"] = files
        if entry["outcome"] is None:
            self.log.info(
                "Chunk %s: waiting again for command %s (%s)", chunk["index"], kept["CommandId"], kept["Status"]
            )
        else:
            self.log.info("Chunk %s ended in an earlier try (%s): not sending it again", chunk["index"], kept["Status"])
            self._report_end(entry)
        return entry, kept["Status"]

    def _after_end(self, entry: dict[str, Any], status: str | None) -> None:
        """A chunk's command has ended with `status` (its SSM Status). A chunk that died because its instance went
        down under it is sent again, once, for the files it had not finished; a resent chunk's results are merged
        into its chunk's results, where verify reads them."""
        from include.vod_sr.commands import INSTANCE_LOST, cancel_commands

        if entry.get("resent"):
            self._merge_resent_results(entry)
        elif entry["outcome"] == "failed" and status == INSTANCE_LOST:
            # A new boot's agent would run the lost command again from its start: cancel it, then resend what is left.
            cancel_commands(self.ssm, [entry])
            self._resend_unfinished(entry)
        elif entry["outcome"] == "failed" and status == "Failed" and self._instance_went_down(entry):
            self._resend_unfinished(entry)

    def _instance_went_down(self, entry: Mapping[str, Any]) -> bool:
        """Whether the instance stopped (or is stopping, or was started again) since the chunk's command was sent.

        SSM's status for a command whose instance went down is not specific (the emulator says Failed/Terminated;
        a real agent reports the interrupted command as Failed when it starts again), so EC2 is asked."""
        from include.vod_sr.commands import is_transient_error

        try:
            reservations = self.ec2.describe_instances(InstanceIds=[entry["instance_id"]])["Reservations"]
        except Exception as error:
            if not is_transient_error(error):
                raise
            self.log.warning("Chunk %s failed; cannot tell whether its instance went down: %s", entry["chunk"], error)
            return False
        instance = reservations[0]["Instances"][0]
        sent_at = entry["delivery_deadline"] - self.delivery_timeout
        went_down = instance["State"]["Name"] != "running" or instance["LaunchTime"].timestamp() > sent_at
        if went_down:
            self.log.warning(
                "Chunk %s's command %s died with its instance %s (now %s, launched %s)",
                entry["chunk"],
                entry["command_id"],
                entry["instance_id"],
                instance["State"]["Name"],
                instance["LaunchTime"],
            )
        return went_down

    def _resend_unfinished(self, entry: dict[str, Any]) -> None:
        """Send `entry`'s chunk again for the files without a result (stored in S3 or printed by its command), as
        chunk RESEND_INDEX_BASE + its index, after making sure the instance is starting again; `entry` becomes the
        resend's, so the task waits for it in the chunk's place.

        The instance is started (after it has stopped, if it is stopping) but not waited for: SSM accepts a command
        for a stopped or pending instance and holds it Pending until the agent is Online again, within the delivery
        timeout, and the deferred wait treats Pending as pending. No stale Online status can deliver it early."""
        from include.vod_sr.instance import InstanceUnusable, ensure_started

        chunk = next(c for c in self.lane["chunks"] if c["index"] == entry["chunk"])
        finished = self._result_lines(chunk["index"], entry["command_id"], entry["instance_id"])
        unfinished = [job for job in chunk["files"] if job["index"] not in finished]
        if not unfinished:
            self.log.info(
                "Chunk %s: every file had ended before the instance went down; nothing to send again", chunk["index"]
            )
            return
        try:
            found = ensure_started(
                self.ec2,
                entry["instance_id"],
                timeout=self.release_timeout,
                poll_interval=max(1, int(self.poll_interval)),
            )
        except InstanceUnusable as error:
            self.log.error("Chunk %s is not sent again: %s", chunk["index"], error)
            self._instance_gone = str(error)
            return
        self.log.warning(
            "Sending chunk %s again, once, for its %s unfinished file(s) of %s (instance %s was %s; %s were finished)",
            chunk["index"],
            len(unfinished),
            len(chunk["files"]),
            entry["instance_id"],
            found,
            sorted(finished),
        )
        resend = self._send({**chunk, "index": RESEND_INDEX_BASE + chunk["index"], "files": unfinished})
        entry.update(
            {**resend, "chunk": chunk["index"], "transient_errors": entry.get("transient_errors", 0)},
            resent=True,
            first_command_id=entry["command_id"],
        )

    def _merge_resent_results(self, entry: Mapping[str, Any]) -> None:
        """Write the chunk's results as the first command's (stored or printed) plus its resend's, so verify, which
        reads the chunk's results, credits every file whichever command did it. Idempotent."""
        from include.vod_sr.script import chunk_keys

        index = entry["chunk"]
        lines = self._result_lines(index, entry["first_command_id"], entry["instance_id"])
        lines.update(self._result_lines(RESEND_INDEX_BASE + index, entry["command_id"], entry["instance_id"]))
        _, results_key = chunk_keys(self.lane["run_token"], index)
        body = "".join(line + "\n" for _, line in sorted(lines.items()))
        self.s3.put_object(Bucket=self.lane["output_bucket"], Key=results_key, Body=body.encode())
        self.log.info("Chunk %s: results of both its commands stored (%s file(s))", index, len(lines))

    def _result_lines(self, chunk_index: int, command_id: str, instance_id: str) -> dict[int, str]:
        """File index -> `VODSR-RESULT` line, from the chunk's results object and its command's output (a kill can
        fall between a file's result line and its store)."""
        from include.vod_sr.commands import get_invocation
        from include.vod_sr.script import chunk_keys, parse_result_lines

        _, results_key = chunk_keys(self.lane["run_token"], chunk_index)
        try:
            stored = self.s3.get_object(Bucket=self.lane["output_bucket"], Key=results_key)["Body"].read().decode()
        except self.s3.exceptions.NoSuchKey:
            stored = ""
        printed = (get_invocation(self.ssm, command_id, instance_id) or {}).get("StandardOutputContent") or ""
        lines: dict[int, str] = {}
        for line in (printed + "\n" + stored).splitlines():
            for file_index in parse_result_lines(line):
                lines[file_index] = line
        return lines

    def resume(self, context: Any, event: dict[str, Any] | None = None) -> dict[str, Any]:
        state = (event or {}).get("resume_state")
        if isinstance(state, list):  # a trigger deferred before the state was compact: every entry, none counted
            state = {"entries": state}
        if not event or event.get("status") not in ("ended", "error") or not isinstance(state, dict):
            raise AirflowException(f"unexpected trigger event: {event!r}")
        from include.vod_sr.plan import lane_label

        context["lane_label"] = lane_label(self.lane)
        self._load_chunks()
        self.gpus = state.get("gpus", self.gpus)  # counted by the install before the first deferral
        sent: list[dict[str, Any]] = state["entries"]
        self._sent = sent
        self._succeeded = state.get("succeeded", 0)
        self._succeeded_transient_errors = state.get("succeeded_transient_errors", 0)
        self._budget_stop = state.get("budget_stop")
        polled = event.get("transient_errors") or {}
        for entry in sent:
            entry["transient_errors"] = entry.get("transient_errors", 0) + polled.get(entry["command_id"], 0)
        if event["status"] == "error":
            self._push_transient_errors(context, sent)
            raise AirflowFailException(
                f"{event.get('message')}. The run's teardown cancels this run's commands still running."
            )
        ended = {command["command_id"]: command for command in event["commands"]}
        for entry in sent:
            if entry["command_id"] in ended and entry["outcome"] is None:
                entry["outcome"] = ended[entry["command_id"]]["outcome"]
                self._report_end(entry)
                self._after_end(entry, ended[entry["command_id"]].get("invocation_status"))
        return self._advance(context, sent)

    def on_kill(self) -> None:
        """Killed between two deferrals (sending the next chunk): cancel every command of this task still live,
        going on past a cancel that fails (the run's teardown cancels what is left)."""
        from include.vod_sr.commands import cancel_commands

        cancel_commands(self.ssm, [entry for entry in self._sent if entry["outcome"] is None])

    def _send(self, chunk_data: Mapping[str, Any]) -> dict[str, Any]:
        from include.vod_sr.budget import chunk_limits
        from include.vod_sr.catalog import SrModel
        from include.vod_sr.commands import send_chunk_once
        from include.vod_sr.instance import command_comment
        from include.vod_sr.plan import Chunk
        from include.vod_sr.script import chunk_keys, chunk_list, render_sr_script

        lane = self.lane
        chunk = Chunk.from_xcom(chunk_data)
        bucket, token = lane["output_bucket"], lane["run_token"]
        files_key, results_key = chunk_keys(token, chunk.index)
        self.s3.put_object(Bucket=bucket, Key=files_key, Body=chunk_list(chunk))
        # The script enforces the budget from taking the lock; SSM's timeout, which runs from delivery, is a backstop.
        # A chunk waits for a slot behind at most one round of the chunks ahead (each slot frees within a budget).
        waiting = self.in_flight - self.slots
        limits = chunk_limits(
            lane["execution_timeout"],
            queued_ahead=max(0, -(-waiting // self.slots)),
            file_limit=lane.get("file_timeout"),
        )
        script = render_sr_script(
            SrModel.from_xcom(lane["model"]),
            token,
            chunk.index,
            f"s3://{bucket}/{files_key}",
            f"s3://{bucket}/{results_key}",
            limits,
            gpus=max(1, int(self.gpus)),
            streams_per_gpu=max(1, int(self.streams_per_gpu)),
        )
        now = time.time()
        command_id = send_chunk_once(
            self.send_ssm,
            self.ssm,
            chunk.instance_id,
            script,
            run_token=token,
            chunk=chunk.index,
            comment=command_comment(token, f"chunk {chunk.index} ({len(chunk.files)} files)"),
            execution_timeout=limits.backstop,
            delivery_timeout=self.delivery_timeout,
            output_bucket=bucket,  # the run's output bucket, which the form may override
        )
        self.log.info(
            "Sent chunk %s (%s files) to %s: command %s", chunk.index, len(chunk.files), chunk.instance_id, command_id
        )
        return {
            "chunk": chunk.index,
            "command_id": command_id,
            "instance_id": chunk.instance_id,
            "deadline": now + limits.backstop + self.delivery_timeout,
            "delivery_deadline": now + self.delivery_timeout,
            "sent_at": now,
            "outcome": None,
            "transient_errors": 0,
            "files": len(chunk.files),  # the files this command processes (a resend: its chunk's unfinished ones)
        }

    def _progress_fields(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """What the trigger needs to log `entry`'s progress (see `SsmCommandsTrigger`); empty when unknown (an
        entry made before vod-sr logged progress, for a resend)."""
        from include.vod_sr.script import chunk_keys

        chunks = self.lane["chunks"]
        position = next((n for n, chunk in enumerate(chunks, 1) if chunk.get("index") == entry["chunk"]), None)
        resent = bool(entry.get("resent"))
        files = entry.get("files")
        if files is None and position is not None and not resent:
            files = len(chunks[position - 1].get("files") or ())
        if position is None or not files:
            return {}
        _, results_key = chunk_keys(self.lane["run_token"], entry["chunk"] + (RESEND_INDEX_BASE if resent else 0))
        fields = {
            "position": position,
            "lane_chunks": len(chunks),
            "files": files,
            "results_bucket": self.lane["output_bucket"],
            "results_key": results_key,
        }
        return {**fields, "resent": True} if resent else fields

    def _report_end(self, entry: dict[str, Any]) -> None:
        """Log how a chunk's command ended. The outcome is already known: a read that fails with a transient error
        (after the client's retries with backoff) is logged and counted, and the task goes on."""
        from include.vod_sr.commands import describe_error, describe_invocation, get_invocation, is_transient_error

        try:
            if entry["outcome"] == "timeout":
                self.log.error("Cancelling command %s: it outlived its execution timeout", entry["command_id"])
                self.ssm.cancel_command(CommandId=entry["command_id"], InstanceIds=[entry["instance_id"]])
            invocation = get_invocation(self.ssm, entry["command_id"], entry["instance_id"])
        except Exception as error:
            if not is_transient_error(error):
                raise
            entry["transient_errors"] = entry.get("transient_errors", 0) + 1
            self.log.warning(
                "Chunk %s ended %s; reading its command %s failed (%s), so its output is not shown here "
                "(verify reads its per-file results from S3)",
                entry["chunk"],
                entry["outcome"],
                entry["command_id"],
                describe_error(error),
            )
            return
        if invocation is None:
            self.log.error("Chunk %s: SSM never listed command %s", entry["chunk"], entry["command_id"])
        elif entry["outcome"] == "success":
            self.log.info("Chunk %s: %s", entry["chunk"], describe_invocation(invocation))
        else:  # the true end of its output and where all of it is (GetCommandInvocation keeps only its start)
            self.log.error("Chunk %s: %s", entry["chunk"], describe_invocation(invocation, self.s3))

    def _release_early(self) -> int:
        """Every command has ended: stop paying for the GPU now rather than after the next scheduling round.
        The lane's teardown still runs (and is what stops the instance when this task dies or is killed), so a
        transient error here is logged and counted (the return value), not fatal."""
        from include.vod_sr.aws import aws_client
        from include.vod_sr.commands import describe_error, is_transient_error
        from include.vod_sr.instance import release

        lane = self.lane
        try:
            outcome = release(
                aws_client("ec2", self.aws_conn_id),
                self.ssm,
                lane["instance_id"],
                lane["run_token"],
                stop=lane["stop_when_done"],
                timeout=self.release_timeout,
                poll_interval=max(1, round(self.poll_interval)),  # whole seconds for botocore's waiter
                wait=False,
            )
        except Exception as error:
            if not is_transient_error(error):
                raise
            self.log.warning(
                "All chunks ended; releasing instance %s failed (%s): the lane's teardown releases it",
                lane["instance_id"],
                describe_error(error),
            )
            return 1
        self.log.info("All chunks ended; instance %s: %s", lane["instance_id"], outcome)
        return 0

    def _push_transient_errors(self, context: Any, sent: list[dict[str, Any]], extra: int = 0) -> int:
        total = extra + self._succeeded_transient_errors + sum(entry.get("transient_errors", 0) for entry in sent)
        if total:
            self.log.warning(
                "Transient AWS errors on %s's chunks: %s (throttling, 5xx or dropped connections that outlasted the "
                "client's retries; the wait went on each time)",
                self.lane["instance_id"],
                total,
            )
        context["ti"].xcom_push(key=TRANSIENT_ERRORS_XCOM_KEY, value=total)
        return total

    def _advance(self, context: Any, sent: list[dict[str, Any]]) -> dict[str, Any]:
        """Send chunks until `in_flight` are out, defer while any is live, then release and report.

        The trigger carries the task's state between deferrals, re-serialized each time: chunks that succeeded (and
        were reported) are only counted there, so the state is the live commands, the failed ones and two numbers,
        not an entry per chunk ever sent."""
        from include.vod_sr.instance import refresh_lane_lease
        from include.vod_sr.triggers import SsmCommandsTrigger

        succeeded = [entry for entry in sent if entry["outcome"] == "success"]
        self._succeeded += len(succeeded)
        self._succeeded_transient_errors += sum(entry.get("transient_errors", 0) for entry in succeeded)
        sent = [entry for entry in sent if entry["outcome"] != "success"]
        self._sent = sent
        chunks = self.lane["chunks"]

        def sent_count() -> int:  # chunks go out in the lane's order: the next one is chunks[sent_count()]
            return self._succeeded + len(sent)

        if self._instance_gone is not None:
            self._push_transient_errors(context, sent)
            raise AirflowFailException(
                f"The lane's instance {self.lane['instance_id']} is gone ({self._instance_gone}): "
                f"{len(chunks) - sent_count()} chunk(s) not sent. verify reports every file that was not done; the "
                "report's re-run link takes them."
            )
        if sent_count() < len(chunks):  # still working on the instance: keep this run's lease fresh (never raises)
            refresh_lane_lease(self.lane, context["run_id"], self.aws_conn_id)
        if self._budget_stop is None and sent_count() < len(chunks) and self._over_budget(context):
            self._stop_for_budget(chunks[sent_count() :])
        while (
            self._budget_stop is None
            and sum(entry["outcome"] is None for entry in sent) < self.in_flight
            and sent_count() < len(chunks)
        ):
            sent.append(self._send(chunks[sent_count()]))
        live = [entry for entry in sent if entry["outcome"] is None]
        if live:
            self.defer(
                trigger=SsmCommandsTrigger(
                    commands=[
                        {
                            **{k: e[k] for k in ("command_id", "instance_id", "deadline", "delivery_deadline")},
                            **({"sent_at": e["sent_at"]} if e.get("sent_at") else {}),
                            **self._progress_fields(e),
                        }
                        for e in live
                    ],
                    poll_interval=self.poll_interval,
                    resume_state={
                        "gpus": max(1, int(self.gpus)),
                        "entries": sent,
                        "succeeded": self._succeeded,
                        "succeeded_transient_errors": self._succeeded_transient_errors,
                        "budget_stop": self._budget_stop,
                    },
                    aws_conn_id=self.aws_conn_id,
                    region_name=self.region_name,
                    # Nothing left to send: resume once, when the last command ends, not at each end.
                    wait_for_all=self._budget_stop is not None or sent_count() >= len(chunks),
                    not_before=time.time() + self.defer_settle,
                ),
                method_name="resume",
            )
        self._push_transient_errors(context, sent, extra=self._release_early())
        if sent:  # every entry left is a chunk that did not succeed
            raise AirflowFailException(
                f"{len(sent)} of {sent_count()} chunk command(s) on {self.lane['instance_id']} did not succeed: "
                + ", ".join(f"chunk {e['chunk']} {e['outcome']}" for e in sent)
                + "; their detail is in the log above, and the per-file results in the report"
            )
        # XCom gets counts, not an entry per chunk: O(1) per lane whatever the number of files.
        done = {"chunks": sent_count(), "outcomes": {"success": self._succeeded}}
        if self._budget_stop is not None:
            done["left_for_budget"] = self._budget_stop["chunks"]
        return done

    def _over_budget(self, context: Any) -> bool:
        """Whether the run's instances have cost its `budget` param (in the rates' currency) or more by now.

        Prices every instance of the run (the plan's summary lists them), not only this lane's: the budget is the
        run's. A failed check (EC2 unreachable) is logged and sends on: the budget bounds spending, it is not worth
        failing a run over; the next check decides."""
        budget = (context.get("params") or {}).get("budget")
        if budget is None or self.rates is None:
            return False
        from datetime import UTC, datetime

        from include.vod_sr.cost import format_money, spend_so_far

        summary = context["ti"].xcom_pull(task_ids="plan", key="summary") or {}
        instance_ids = [lane["instance_id"] for lane in summary.get("lanes") or []] or [self.lane["instance_id"]]
        started = getattr(context.get("dag_run"), "start_date", None) or datetime.min.replace(tzinfo=UTC)
        try:
            spend = spend_so_far(self.ec2, instance_ids, self.rates, since=started, now=datetime.now(UTC))
        except Exception as error:
            self.log.warning("Could not price the run's instance time for its budget (sending on): %s", error)
            return False
        over = spend.total >= float(budget)
        self.log.info(
            "Budget %s: %s%s",
            format_money(float(budget), self.rates.currency),
            spend.line(),
            "; reached: no more chunks are sent" if over else "",
        )
        if over:
            self._budget_stop = {
                "budget": float(budget),
                "spent": spend.total,
                "currency": self.rates.currency,
                "chunks": 0,
            }
        return over

    def _stop_for_budget(self, unsent: list[dict[str, Any]]) -> None:
        """Keep the chunks the budget stopped (their indices, in S3 next to the plan) for verify and the report."""
        from include.vod_sr.stored_plan import store_left

        assert self._budget_stop is not None
        self._budget_stop["chunks"] = len(unsent)
        lane = self.lane
        store_left(
            self.s3,
            lane["output_bucket"],
            lane["run_token"],
            lane["instance_id"],
            [chunk["index"] for chunk in unsent],
            self._budget_stop,
        )
        self.log.warning(
            "Budget reached on %s: %s chunk(s) of %s file(s) not sent; the running chunks finish, and the report lists "
            "the files left for the next run with the conf to run them",
            self.lane["instance_id"],
            len(unsent),
            sum(len(chunk["files"]) for chunk in unsent),
        )


def _commented_file_count(comment: str) -> int | None:
    """The file count `_send` wrote in a chunk command's comment (`... chunk 7 (10 files)`), None if absent."""
    import re

    found = re.search(r"\((\d+) files\)$", comment)
    return int(found.group(1)) if found else None
