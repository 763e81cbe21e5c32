"""An SSM Run Command service whose agent really runs the commands.

moto marks every command "Success" at once without running it. Here `AWS-RunShellScript` commands run with
`/bin/sh` (as the real agent does) in a per-instance sandbox directory, in the background, with the real exit
code, stdout and stderr, `executionTimeout` enforced, cancellation, and delivery only while the instance's agent
is Online. The agent's limits are the real agent's: 5 commands execute at once, 5 more wait in its job queue, the
rest stay Pending in SSM and cancels wait behind them (`_handle_messages`; per-instance faults can raise them). An
instance that goes down takes its commands with it without a word: they stay InProgress (`instance_stopping`).

The `aws` CLI inside the scripts reaches the emulator through the environment the agent sets, the way an instance
profile gives the real CLI its credentials: nothing is put into the script. First in each command's PATH
come the instance's stand-in `nvidia-smi` (listing the GPUs of its instance type) and `ffmpeg` (the real one, timed
per GPU for the timeline): see gpus.py.

When SendCommand names `OutputS3BucketName`, the agent copies each invocation's whole stdout and stderr there when it
ends, at the real agent's key layout (`ssm_output_key`), and GetCommandInvocation gives their addresses in
`StandardOutputUrl` / `StandardErrorUrl`; its `StandardOutputContent` / `StandardErrorContent` stay truncated.

With a synthetic SR stand-in (`use_synthetic_sr`, the emulator's `--synthetic-sr-seconds`), chunk commands are played
in process instead of run with bash (see synthetic_sr.py); every other command still runs for real.
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from include.local_aws.ec2_lifecycle import Ec2Lifecycle, find_instance
from include.local_aws.faults import FaultPlan
from include.local_aws.gpus import gpu_count, install_stand_ins, read_gpu_busy
from include.local_aws.synthetic_sr import SyntheticSr, SyntheticSrRunner, chunk_script

STDOUT_LIMIT = 24_000  # GetCommandInvocation's limits
STDERR_LIMIT = 8_000
DEFAULT_EXECUTION_TIMEOUT = 3600
LIVE = ("Pending", "InProgress", "Delayed", "Cancelling")
STREAMS = ("stdout", "stderr")

log = logging.getLogger(__name__)


def ssm_output_key(prefix: str, command_id: str, instance_id: str, stream: str) -> str:
    """Where the SSM agent writes a stream of an `AWS-RunShellScript` invocation under `OutputS3KeyPrefix`: the
    agent joins the parts as Go's path.Join does (so a trailing `/` on the prefix makes no double slash), and the
    plugin `aws:runShellScript` loses its colon."""
    return posixpath.normpath(
        posixpath.join(prefix, command_id, instance_id, "awsrunShellScript", "0.awsrunShellScript", stream)
    ).lstrip("/")


class SsmError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Invocation:
    command_id: str
    instance_id: str
    commands: str
    execution_timeout: int
    delivery_deadline: float
    visible_after: float
    requested: datetime
    status: str = "Pending"
    status_details: str = "Pending"
    response_code: int = -1
    started: datetime | None = None
    ended: datetime | None = None
    process: subprocess.Popen[bytes] | None = None
    workdir: Path | None = None
    outcome_override: tuple[str, str] | None = None
    executing: bool = False  # delivered and run by one of the agent's workers (not waiting in its job queue)
    interrupted: bool = False  # its instance went down while the agent had it (see `SsmAgent.instance_stopping`)
    runs: int = 0  # times an agent started it: a new boot's agent runs an interrupted command again
    output_bucket: str = ""  # SendCommand's OutputS3BucketName / OutputS3KeyPrefix
    output_prefix: str = ""
    output_urls: dict[str, str] = field(default_factory=dict)  # stream -> URL of its copy in S3, once stored

    def output(self, name: str, limit: int) -> str:
        if self.workdir is None or not (self.workdir / name).exists():
            return ""
        return (self.workdir / name).read_bytes()[:limit].decode("utf-8", errors="replace")

    def as_invocation(self, comment: str) -> dict[str, Any]:
        return {
            "CommandId": self.command_id,
            "InstanceId": self.instance_id,
            "Comment": comment,
            "DocumentName": "AWS-RunShellScript",
            "PluginName": "aws:runShellScript",
            "ResponseCode": self.response_code,
            "ExecutionStartDateTime": self.started.isoformat() if self.started else "",
            "ExecutionEndDateTime": self.ended.isoformat() if self.ended else "",
            "Status": self.status,
            "StatusDetails": self.status_details,
            "StandardOutputContent": self.output("stdout", STDOUT_LIMIT),
            "StandardErrorContent": self.output("stderr", STDERR_LIMIT),
            "StandardOutputUrl": self.output_urls.get("stdout", ""),
            "StandardErrorUrl": self.output_urls.get("stderr", ""),
            "CloudWatchOutputConfig": {"CloudWatchLogGroupName": "", "CloudWatchOutputEnabled": False},
        }


@dataclass
class Command:
    command_id: str
    comment: str
    parameters: dict[str, list[str]]
    requested: datetime
    timeout_seconds: int
    invocations: dict[str, Invocation] = field(default_factory=dict)
    output_bucket: str = ""
    output_prefix: str = ""

    @property
    def status(self) -> str:
        states = [i.status for i in self.invocations.values()]
        for live in ("InProgress", "Pending", "Delayed", "Cancelling"):
            if live in states:
                return live
        for final in ("Failed", "TimedOut", "Cancelled"):
            if final in states:
                return final
        return "Success"

    def as_command(self) -> dict[str, Any]:
        counts = {s: sum(1 for i in self.invocations.values() if i.status == s) for s in ("Success", "Failed")}
        return {
            "CommandId": self.command_id,
            "DocumentName": "AWS-RunShellScript",
            "Comment": self.comment,
            "Parameters": self.parameters,
            "InstanceIds": list(self.invocations),
            "RequestedDateTime": self.requested.timestamp(),
            "Status": self.status,
            "StatusDetails": self.status,
            "TimeoutSeconds": self.timeout_seconds,
            "OutputS3BucketName": self.output_bucket,
            "OutputS3KeyPrefix": self.output_prefix,
            "TargetCount": len(self.invocations),
            "CompletedCount": sum(1 for i in self.invocations.values() if i.status not in LIVE),
            "ErrorCount": counts["Failed"],
            "DeliveryTimedOutCount": 0,
        }


class SsmAgent:
    def __init__(self, root: Path, faults: FaultPlan, lifecycle: Ec2Lifecycle, agent_env: dict[str, str]) -> None:
        self._root = root
        self._faults = faults
        self._lifecycle = lifecycle
        self._agent_env = agent_env
        self._real_ffmpeg = shutil.which("ffmpeg", path=agent_env.get("PATH")) or "ffmpeg"
        self._lock = threading.RLock()
        self._commands: dict[str, Command] = {}
        self._stop = threading.Event()
        self._synthetic: SyntheticSrRunner | None = None
        # Per instance, the messages SSM has for its agent, in order: ("send", invocation) until the agent takes it,
        # ("cancel", invocation) for a command already delivered. The agent handles them one at a time (see
        # `_handle_messages`); an instance's entry in `_agent_retry_at` says its agent holds a send it had no room
        # for and tries it again then.
        self._agent_messages: dict[str, list[tuple[str, Invocation]]] = {}
        self._agent_retry_at: dict[str, float] = {}
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="ssm-agent", daemon=True)
        self._dispatcher.start()

    def use_synthetic_sr(
        self, config: SyntheticSr | None, record_call: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        """Play chunk commands delivered from now on with the synthetic SR stand-in (`config`; None: run them for
        real again). `record_call` adds the S3 calls the real script would make to the emulator's call log."""
        if self._synthetic is not None:
            self._synthetic.stop()
        self._synthetic = None
        if config is not None:
            self._synthetic = SyntheticSrRunner(
                config, finish=self._finish_in_process, timed_out=self._timed_out, record_call=record_call
            )

    # --- API ---------------------------------------------------------------------------------------------

    def send_command(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("DocumentName") != "AWS-RunShellScript":
            raise SsmError("InvalidDocument", f"document {body.get('DocumentName')!r} is not emulated")
        instance_ids = body.get("InstanceIds") or []
        if not instance_ids or len(instance_ids) > 50:
            raise SsmError("ValidationException", "InstanceIds must list 1 to 50 instances")
        if len(body.get("Comment", "")) > 100:
            raise SsmError("ValidationException", "Comment must be at most 100 characters")
        unknown = [i for i in instance_ids if find_instance(i) is None or not self._lifecycle.registered(i)]
        if unknown:
            raise SsmError("InvalidInstanceId", f"Instances {unknown} not in a valid state for account")
        parameters = body.get("Parameters", {})
        script = "\n".join(parameters.get("commands", []))
        execution_timeout = int((parameters.get("executionTimeout") or [DEFAULT_EXECUTION_TIMEOUT])[0])
        delivery_timeout = int(body.get("TimeoutSeconds", 3600))
        now, requested = time.monotonic(), datetime.now(UTC)
        output_bucket, output_prefix = body.get("OutputS3BucketName", ""), body.get("OutputS3KeyPrefix", "")
        command = Command(
            str(uuid.uuid4()),
            body.get("Comment", ""),
            parameters,
            requested,
            delivery_timeout,
            output_bucket=output_bucket,
            output_prefix=output_prefix,
        )
        for instance_id in instance_ids:
            command.invocations[instance_id] = Invocation(
                command_id=command.command_id,
                instance_id=instance_id,
                commands=script,
                execution_timeout=execution_timeout,
                delivery_deadline=now + delivery_timeout,
                visible_after=now + self._faults.for_instance(instance_id).invocation_visibility_seconds,
                requested=requested,
                output_bucket=output_bucket,
                output_prefix=output_prefix,
            )
        with self._lock:
            self._commands[command.command_id] = command
            for invocation in command.invocations.values():
                self._agent_messages.setdefault(invocation.instance_id, []).append(("send", invocation))
        return {"Command": command.as_command()}

    def _visible(self, command_id: str) -> list[Invocation]:
        with self._lock:
            command = self._commands.get(command_id)
            if command is None:
                return []
            now = time.monotonic()
            return [i for i in command.invocations.values() if now >= i.visible_after]

    def get_command_invocation(self, body: dict[str, Any]) -> dict[str, Any]:
        command_id, instance_id = body.get("CommandId"), body.get("InstanceId")
        for invocation in self._visible(command_id):
            if invocation.instance_id == instance_id:
                return invocation.as_invocation(self._commands[command_id].comment)
        raise SsmError("InvocationDoesNotExist", "An error occurred (InvocationDoesNotExist)")

    def list_command_invocations(self, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            commands = (
                [self._commands[body["CommandId"]]]
                if body.get("CommandId") in self._commands
                else ([] if body.get("CommandId") else list(self._commands.values()))
            )
        items = []
        for command in commands:
            for invocation in self._visible(command.command_id):
                if body.get("InstanceId") in (None, invocation.instance_id):
                    items.append(invocation.as_invocation(command.comment))
        return {"CommandInvocations": items}

    def list_commands(self, body: dict[str, Any]) -> dict[str, Any]:
        invoked_after = None
        statuses = set()
        for item in body.get("Filters", []):
            if item["key"] == "InvokedAfter":
                invoked_after = datetime.fromisoformat(item["value"].replace("Z", "+00:00"))
            elif item["key"] == "Status":
                statuses.add(item["value"])
        with self._lock:
            commands = list(self._commands.values())
        selected = [
            c.as_command()
            for c in commands
            if body.get("CommandId") in (None, c.command_id)
            and body.get("InstanceId") in (None, *c.invocations)
            and (invoked_after is None or c.requested >= invoked_after)
            and (not statuses or c.status in statuses)
        ]
        return {"Commands": selected}

    def cancel_command(self, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            command = self._commands.get(body.get("CommandId"))
            if command is None:
                raise SsmError("InvalidCommandId", f"command {body.get('CommandId')} does not exist")
            targets = body.get("InstanceIds") or list(command.invocations)
            for instance_id in targets:
                invocation = command.invocations.get(instance_id)
                if invocation is None:
                    continue
                if invocation.status == "Pending":  # not delivered yet: SSM itself drops it
                    self._end(invocation, "Cancelled", "Cancelled")
                elif invocation.status in LIVE:  # the agent has it: the cancel is a message to the agent
                    self._agent_messages.setdefault(instance_id, []).append(("cancel", invocation))
        return {}

    def describe_instance_information(self, body: dict[str, Any]) -> dict[str, Any]:
        wanted: set[str] = set()
        for item in body.get("Filters", []) + body.get("InstanceInformationFilterList", []):
            if item.get("Key", item.get("key")) in ("InstanceIds", "InstanceId"):
                wanted.update(item.get("Values", item.get("valueSet", [])))
        from moto.ec2.models import ec2_backends

        items = []
        for account_backends in ec2_backends.values():
            for backend in account_backends.values():
                for instance in backend.all_instances():
                    if (wanted and instance.id not in wanted) or not self._lifecycle.registered(instance.id):
                        continue
                    # Online can be stale: right after a stop AWS still says Online, with the last heartbeat.
                    ping_status, last_ping = self._lifecycle.ping(instance.id)
                    item = {
                        "InstanceId": instance.id,
                        "PingStatus": ping_status,
                        "PlatformType": "Linux",
                        "PlatformName": "Ubuntu",
                        "AgentVersion": "3.3.0.0-local",
                        "ResourceType": "EC2Instance",
                        "IsLatestVersion": True,
                    }
                    if last_ping is not None:
                        item["LastPingDateTime"] = last_ping
                    items.append(item)
        return {"InstanceInformationList": items}

    def timeline(self) -> dict[str, list[dict[str, Any]]]:
        """Per instance, when each command ran (wall-clock seconds), for benchmarks."""
        with self._lock:
            runs: dict[str, list[dict[str, Any]]] = {}
            for command in self._commands.values():
                for invocation in command.invocations.values():
                    if invocation.started is not None:
                        runs.setdefault(invocation.instance_id, []).append(
                            {
                                "comment": command.comment,
                                "status": invocation.status,
                                "start": invocation.started.timestamp(),
                                "end": invocation.ended.timestamp() if invocation.ended else None,
                            }
                        )
            return runs

    def gpu_busy(self) -> dict[str, dict[str, list[list[float]]]]:
        """Per instance, per GPU (the CUDA_VISIBLE_DEVICES of the run), when a model's ffmpeg ran: [[start, end], ...]
        in wall-clock seconds (see gpus.py)."""
        instances = self._root / "instances"
        if not instances.is_dir():
            return {}
        busy = {sandbox.name: read_gpu_busy(sandbox) for sandbox in sorted(instances.iterdir())}
        return {instance_id: gpus for instance_id, gpus in busy.items() if gpus}

    # --- the agent -----------------------------------------------------------------------------------------

    def instance_stopping(self, instance_id: str, agent_was_up: bool = True) -> None:
        """The instance is going down (stopped, terminated, interrupted): what runs there dies with it, and no agent
        reports any more, so SSM keeps the commands the agent had InProgress: "If the agent isn't running or available
        on the node, the command status remains at In Progress until the agent is available again, or until the
        execution timeout limit is reached" (Systems Manager User Guide, "Understanding command statuses"). A new
        boot's agent runs them again from the start (aws/amazon-ssm-agent, processor.go
        `processInProgressDocuments`: documents in progress are submitted again); on an instance that never comes
        back they end when they expire (`_expire_interrupted`). Commands not delivered yet stay Pending."""
        with self._lock:
            # The messages SSM already has for the agent reach it before the machine is down: it gets them within a
            # moment, an OS shutdown takes seconds. So a cancel sent just before a stop still ends its command.
            if agent_was_up:
                self._handle_messages(instance_id, time.monotonic())
            for command in self._commands.values():
                invocation = command.invocations.get(instance_id)
                if invocation is None or invocation.status != "InProgress" or invocation.outcome_override is not None:
                    continue  # (a command being cancelled or timed out ends as such: its runner records it)
                invocation.interrupted, invocation.executing = True, False
                invocation.runs += 1  # what was playing or running of it is over (synthetic_sr.py `live`)
                process, invocation.process = invocation.process, None
                if process is not None and process.poll() is None:
                    try:
                        os.killpg(process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            self._agent_retry_at.pop(instance_id, None)

    def _resume_interrupted(self, instance_id: str) -> None:
        """A new boot's agent is Online: the commands it had when its instance went down run again, before any new
        message (the agent's InitialProcessing comes before its message polling)."""
        with self._lock:
            for command in self._commands.values():
                invocation = command.invocations.get(instance_id)
                if invocation is not None and invocation.interrupted and invocation.status == "InProgress":
                    invocation.interrupted, invocation.executing = False, False

    def _expire_interrupted(self, now: float) -> None:
        """Commands whose instance went down end as SSM ends a command no agent reports on: once delivery timeout and
        execution timeout have both passed, as delivery timed out."""
        with self._lock:
            for command in self._commands.values():
                for invocation in command.invocations.values():
                    expires = invocation.delivery_deadline + invocation.execution_timeout
                    if invocation.interrupted and invocation.status == "InProgress" and now > expires:
                        invocation.interrupted = False
                        invocation.status, invocation.status_details = "TimedOut", "DeliveryTimedOut"
                        invocation.ended = datetime.now(UTC)

    def _end(self, invocation: Invocation, status: str, details: str) -> None:
        if invocation.status not in ("Pending", "InProgress", "Delayed"):
            return
        if invocation.process is not None and invocation.process.poll() is None:
            invocation.outcome_override = (status, details)
            try:
                os.killpg(invocation.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return  # the runner thread records the outcome when the process has gone
        invocation.status, invocation.status_details = status, details
        invocation.ended = datetime.now(UTC)

    def _dispatch_loop(self) -> None:
        while not self._stop.wait(0.2):
            now = time.monotonic()
            with self._lock:
                pending = [i for c in self._commands.values() for i in c.invocations.values() if i.status == "Pending"]
                for invocation in pending:
                    if now > invocation.delivery_deadline:
                        self._end(invocation, "TimedOut", "DeliveryTimedOut")
                interrupted = {
                    i.instance_id for c in self._commands.values() for i in c.invocations.values() if i.interrupted
                }
                instances = [instance_id for instance_id, messages in self._agent_messages.items() if messages]
            self._expire_interrupted(now)
            for instance_id in interrupted:
                if self._lifecycle.agent_online(instance_id):
                    self._resume_interrupted(instance_id)
            for instance_id in instances:
                if self._lifecycle.agent_online(instance_id):
                    self._handle_messages(instance_id, now)
            with self._lock:
                waiting = [
                    i
                    for c in self._commands.values()
                    for i in c.invocations.values()
                    if i.status == "InProgress" and not i.executing and not i.interrupted
                ]
            for instance_id in {i.instance_id for i in waiting}:
                self._execute_queued(instance_id, sorted(waiting, key=lambda i: i.requested))

    def _handle_messages(self, instance_id: str, now: float) -> None:
        """The agent takes its messages in order (aws/amazon-ssm-agent, mdsinteractor.go `processMessage`, one at a
        time): a cancel ends its command; a send goes into the job queue if the agent's workers and buffer have room
        (task/pool.go `AcquireBufferToken`), else the agent keeps it, and every message behind it, and tries again
        every `agent_buffer_full_retry_seconds`. A held send is still Pending in SSM (never acknowledged)."""
        faults = self._faults.for_instance(instance_id)
        room = faults.command_workers_limit + faults.command_worker_buffer_limit
        with self._lock:
            messages = self._agent_messages.get(instance_id, [])
            while messages:
                kind, invocation = messages[0]
                if kind == "cancel":
                    messages.pop(0)
                    self._end(invocation, "Cancelled", "Cancelled")
                    continue
                if invocation.status != "Pending":  # cancelled or timed out before delivery
                    messages.pop(0)
                    continue
                retry_at = self._agent_retry_at.get(instance_id)
                if retry_at is not None and now < retry_at:
                    return  # the agent sleeps between tries
                taken = sum(
                    1
                    for c in self._commands.values()
                    if (i := c.invocations.get(instance_id)) is not None and i.status in LIVE and i.status != "Pending"
                )
                if taken >= room:
                    self._agent_retry_at[instance_id] = now + faults.agent_buffer_full_retry_seconds
                    return
                self._agent_retry_at.pop(instance_id, None)
                messages.pop(0)
                invocation.status = invocation.status_details = "InProgress"  # reported on submission to the pool

    def _execute_queued(self, instance_id: str, waiting: list[Invocation]) -> None:
        """Start the agent's queued commands, oldest first, while fewer than `command_workers_limit` execute."""
        limit = self._faults.for_instance(instance_id).command_workers_limit
        for invocation in waiting:
            if invocation.instance_id != instance_id:
                continue
            with self._lock:
                if not self._lifecycle.agent_online(instance_id):  # went down since the dispatch loop looked
                    return
                executing = sum(
                    1
                    for c in self._commands.values()
                    if (i := c.invocations.get(instance_id)) is not None and i.executing and i.status in LIVE
                )
                if executing >= limit:
                    return
                if invocation.status != "InProgress" or invocation.executing or invocation.interrupted:
                    continue
                invocation.executing = True
            self._start(invocation)

    def _sandbox(self, instance_id: str) -> Path:
        home = self._root / "instances" / instance_id
        for sub in ("home", "tmp"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        return home

    def _start(self, invocation: Invocation) -> None:
        sandbox = self._sandbox(invocation.instance_id)
        workdir = sandbox / "commands" / invocation.command_id
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "_script.sh").write_text(invocation.commands + "\n")
        instance = find_instance(invocation.instance_id)
        stand_ins = install_stand_ins(
            sandbox,
            invocation.instance_id,
            getattr(instance, "instance_type", None),
            self._real_ffmpeg,
            model_run_seconds=self._faults.for_instance(invocation.instance_id).model_run_seconds,
        )
        env = {
            **self._agent_env,
            "PATH": f"{stand_ins}:{self._agent_env.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(sandbox / "home"),
            "TMPDIR": str(sandbox / "tmp"),
            "AWS_DEFAULT_REGION": instance.region_name if instance is not None else "us-east-1",
            # The instance's metadata service (169.254.169.254 on EC2), where the AWS CLI and the scripts find it.
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": (
                f"{self._agent_env.get('AWS_ENDPOINT_URL', '')}/_local_aws/imds/{invocation.instance_id}/"
            ),
        }
        synthetic, script = self._synthetic, None
        if synthetic is not None:
            script = chunk_script(invocation.commands)
        with self._lock:
            if invocation.status != "InProgress" or invocation.interrupted:  # cancelled, or down, meanwhile
                invocation.executing = False
                return
            invocation.workdir = workdir
            invocation.runs += 1
            if invocation.started is None:
                invocation.started = datetime.now(UTC)
            if synthetic is not None and script is not None:  # a chunk, played in process (synthetic_sr.py)
                for stream in STREAMS:
                    (workdir / stream).write_bytes(b"")
                synthetic.start(invocation, script, sandbox, gpu_count(getattr(instance, "instance_type", None)))
                return
            with open(workdir / "stdout", "wb") as out, open(workdir / "stderr", "wb") as err:
                invocation.process = subprocess.Popen(
                    ["/bin/sh", str(workdir / "_script.sh")],
                    cwd=sandbox / "home",
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,  # one process group, killed whole on timeout or cancel
                )
            process = invocation.process
        threading.Thread(target=self._run, args=(invocation, process), daemon=True).start()

    def _run(self, invocation: Invocation, process: subprocess.Popen[bytes]) -> None:
        try:
            code = process.wait(timeout=invocation.execution_timeout)
        except subprocess.TimeoutExpired:
            with self._lock:
                invocation.outcome_override = ("TimedOut", "ExecutionTimedOut")
            os.killpg(process.pid, signal.SIGKILL)
            code = process.wait()
        if invocation.process is not process:
            return  # died with its instance: nothing reports its end (`instance_stopping`)
        self._store_output(invocation)  # before the status changes: whoever sees the end finds the copy
        with self._lock:
            if invocation.process is not process:
                return
            invocation.response_code = code
            if invocation.outcome_override is not None:
                invocation.status, invocation.status_details = invocation.outcome_override
            elif code == 0:
                invocation.status = invocation.status_details = "Success"
            else:
                invocation.status = invocation.status_details = "Failed"
            invocation.ended = datetime.now(UTC)

    def _finish_in_process(self, invocation: Invocation, code: int) -> None:
        """A command played in process has ended with exit `code`, as `_run` ends a process: its output is stored
        first; its status is set unless the command ended already (cancelled, timed out, its instance stopped)."""
        if invocation.interrupted:
            return  # its instance went down under it: nothing reports its end
        self._store_output(invocation)
        with self._lock:
            if invocation.status != "InProgress" or invocation.interrupted:
                return
            invocation.response_code = code
            invocation.status = invocation.status_details = "Success" if code == 0 else "Failed"
            invocation.ended = datetime.now(UTC)

    def _timed_out(self, invocation: Invocation) -> None:
        """SSM's executionTimeout ends a command played in process."""
        with self._lock:
            invocation.response_code = -9
            self._end(invocation, "TimedOut", "ExecutionTimedOut")

    def _store_output(self, invocation: Invocation) -> None:
        """Copy the whole stdout and stderr to SendCommand's `OutputS3BucketName`, as the real agent does with the
        instance's role. Written straight into moto's S3, so the emulator's call log keeps showing only the calls
        made by the instance's own CLI and by the orchestrator. The real agent writes no object for an empty stream;
        a bucket it cannot write to leaves no copy (and, here, no URL)."""
        if not invocation.output_bucket or invocation.workdir is None:
            return
        from moto.s3.models import s3_backends

        backends = [s3_backends[account]["aws"] for account in list(s3_backends.keys())]
        backend = next((b for b in backends if invocation.output_bucket in b.buckets), None)
        if backend is None:
            log.warning("SSM output of %s not stored: no bucket %s", invocation.command_id, invocation.output_bucket)
            return
        instance = find_instance(invocation.instance_id)
        region = instance.region_name if instance is not None else "us-east-1"
        for stream in STREAMS:
            key = ssm_output_key(invocation.output_prefix, invocation.command_id, invocation.instance_id, stream)
            path = invocation.workdir / stream
            data = path.read_bytes() if path.exists() else b""
            if data:
                backend.put_object(invocation.output_bucket, key, data)
            invocation.output_urls[stream] = f"https://s3.{region}.amazonaws.com/{invocation.output_bucket}/{key}"

    def shutdown(self) -> None:
        self._stop.set()
        if self._synthetic is not None:
            self._synthetic.stop()
        with self._lock:
            for command in self._commands.values():
                for invocation in command.invocations.values():
                    self._end(invocation, "Cancelled", "Cancelled")
