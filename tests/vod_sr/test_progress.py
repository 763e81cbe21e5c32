"""Progress while a chunk runs: the deferred wait logs `chunk 3/20 on i-...: 7/10 files done (1 failed)` whenever the
count in the chunk's results object moves, and the final count when the command ends; reading progress never fails or
ends the wait. Also the lane label run_chunks puts in its context for the map index template.

The emulator tests are real HTTP (aiobotocore through the provider's hooks), with commands that really run on the
emulated instance and rewrite their results object with the AWS CLI, as the chunk script does.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any

import pytest
from botocore.exceptions import ClientError

from include.local_aws.world import boto_client
from include.vod_sr.commands import send_command
from include.vod_sr.operators import RESEND_INDEX_BASE, RunChunksOperator
from include.vod_sr.plan import lane_label
from include.vod_sr.script import chunk_keys
from include.vod_sr.triggers import ChunkProgress, SsmCommandsTrigger
from tests.vod_sr.test_commands import StubAsyncSsm, aws_error

PROGRESS_LINE = re.compile(r"chunk (\d+)/(\d+)(?: \(sent again\))? on (\S+): (\d+)/(\d+) files done")


def collect_events(trigger) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        return [event.payload async for event in trigger.run()]

    return asyncio.run(run())


def result_line(index: int, status: str = "ok") -> str:
    return f"VODSR-RESULT\t{index}\t{status}\t1000\t2\t\t640x360 2 1\t1280x720 2 1"


def writes_results(bucket: str, key: str, statuses: list[str], pause: float) -> str:
    """A script that stores its results object with the AWS CLI after each 'file', as the chunk script does."""
    lines = ["set -e", "results=$(mktemp)"]
    for index, status in enumerate(statuses):
        lines += [
            f"sleep {pause}",
            f"printf '%s\\n' '{result_line(index, status)}' >> \"$results\"",
            f'aws s3api put-object --bucket={bucket} --key={key} --body "$results" >/dev/null',
        ]
    return "\n".join([*lines, "echo done"])


def progress_command(command_id: str, instance_id: str, bucket: str, key: str, **fields: Any) -> dict[str, Any]:
    return {
        "command_id": command_id,
        "instance_id": instance_id,
        "deadline": time.time() + 120,
        "delivery_deadline": time.time() + 30,
        "position": 2,
        "lane_chunks": 5,
        "files": 3,
        "results_bucket": bucket,
        "results_key": key,
        **fields,
    }


class RecordingLog:
    """Stands in for a trigger's logger: records (level, message) and passes each record on to the real one."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.records: list[tuple[int, str]] = []

    def log(self, level: int, message: str, *args: Any) -> None:
        self.records.append((level, message % args if args else message))
        self.real.log(level, message, *args)

    def debug(self, message: str, *args: Any) -> None:
        self.log(logging.DEBUG, message, *args)

    def info(self, message: str, *args: Any) -> None:
        self.log(logging.INFO, message, *args)

    def warning(self, message: str, *args: Any) -> None:
        self.log(logging.WARNING, message, *args)

    def error(self, message: str, *args: Any) -> None:
        self.log(logging.ERROR, message, *args)


def recorded(trigger: SsmCommandsTrigger) -> SsmCommandsTrigger:
    trigger._log = RecordingLog(trigger.log)
    return trigger


def messages(trigger: SsmCommandsTrigger, level: int | None = None) -> list[str]:
    return [message for lvl, message in trigger.log.records if level is None or lvl == level]


@pytest.fixture
def bucket(emulator_env) -> str:
    name = f"progress-{uuid.uuid4().hex[:12]}"
    boto_client("s3", emulator_env.endpoint_url).create_bucket(Bucket=name)
    return name


class TestProgressAgainstTheEmulator:
    def test_the_log_follows_the_results_object_as_it_grows(self, running_instance, emulator_env, bucket, capfd):
        ssm = boto_client("ssm", emulator_env.endpoint_url)
        _, key = chunk_keys(uuid.uuid4().hex[:16], 7)
        script = writes_results(bucket, key, ["ok", "failed", "ok"], pause=1.5)
        command_id = send_command(ssm, running_instance, script, comment="t", execution_timeout=60, delivery_timeout=30)
        emulator_env.reset_calls()

        trigger = recorded(
            SsmCommandsTrigger(
                commands=[progress_command(command_id, running_instance, bucket, key)], poll_interval=0.3
            )
        )

        (event,) = collect_events(trigger)

        assert [c["outcome"] for c in event["commands"]] == ["success"]
        lines = [m for m in messages(trigger, logging.INFO) if PROGRESS_LINE.match(m)]
        assert lines, messages(trigger)
        counts = [PROGRESS_LINE.match(line).group(4) for line in lines[:-1]]  # before the final line
        assert counts == sorted(counts) and len(set(counts)) == len(counts)  # logged only when the count moved
        assert f"chunk 2/5 on {running_instance}: 2/3 files done (1 failed)" in lines
        assert lines[-1] == f"chunk 2/5 on {running_instance}: 3/3 files done (1 failed); its command ended (success)"
        assert lines.index(f"chunk 2/5 on {running_instance}: 2/3 files done (1 failed)") < len(lines) - 1
        printed = capfd.readouterr()
        assert f"chunk 2/5 on {running_instance}: 2/3 files done (1 failed)" in printed.out + printed.err  # the log
        # At most one S3 request per live command per poll, each conditional once an ETag is known.
        calls = [c for c in emulator_env.calls() if c["caller"] == "orchestrator"]
        polls = [c for c in calls if c["action"] == "GetCommandInvocation"]
        reads = [c for c in calls if c["service"] == "s3"]
        assert {(c["action"], c["key"]) for c in reads} == {("GET object", key)}
        assert 0 < len(reads) <= len(polls)

    def test_a_missing_results_object_or_an_s3_error_does_not_end_the_wait(
        self, running_instance, emulator_env, bucket
    ):
        ssm = boto_client("ssm", emulator_env.endpoint_url)
        commands = []
        for results_bucket in (bucket, f"no-such-bucket-{uuid.uuid4().hex[:8]}"):
            command_id = send_command(
                ssm, running_instance, "sleep 3; echo done", comment="t", execution_timeout=60, delivery_timeout=30
            )
            commands.append(progress_command(command_id, running_instance, results_bucket, "vod-sr-runs/x.results"))
        started = time.monotonic()

        trigger = recorded(SsmCommandsTrigger(commands=commands, poll_interval=0.3))

        (event,) = collect_events(trigger)

        assert event["status"] == "ended" and time.monotonic() - started > 2  # many polls, each reading S3
        assert {c["outcome"] for c in event["commands"]} == {"success"}
        warnings = [m for m in messages(trigger, logging.WARNING) if "Cannot read the progress" in m]
        assert len(warnings) == 1 and "NoSuchBucket" in warnings[0]  # once, though every poll failed
        debug = [m for m in messages(trigger, logging.DEBUG) if "Cannot read the progress" in m]
        assert len(debug) == 1 and "NoSuchKey" in debug[0]  # before the first file ends: expected, quiet
        assert not [m for m in messages(trigger, logging.INFO) if PROGRESS_LINE.match(m) and "ended" not in m]

    def test_a_trigger_serialized_without_progress_fields_waits_as_before(self, running_instance, emulator_env):
        ssm = boto_client("ssm", emulator_env.endpoint_url)
        command_id = send_command(
            ssm, running_instance, "sleep 1; echo done", comment="t", execution_timeout=60, delivery_timeout=30
        )
        old_kwargs = {  # what an older vod-sr serialized
            "commands": [
                {
                    "command_id": command_id,
                    "instance_id": running_instance,
                    "deadline": time.time() + 60,
                    "delivery_deadline": time.time() + 30,
                }
            ],
            "poll_interval": 0.3,
            "resume_state": [{"chunk": 0}],
            "aws_conn_id": "aws_default",
            "region_name": None,
        }
        emulator_env.reset_calls()

        trigger = recorded(SsmCommandsTrigger(**old_kwargs))

        (event,) = collect_events(trigger)

        assert [c["outcome"] for c in event["commands"]] == ["success"]
        assert not [m for m in messages(trigger) if PROGRESS_LINE.search(m) or "progress" in m]
        assert not [c for c in emulator_env.calls() if c["service"] == "s3" and c["caller"] == "orchestrator"]


class StubAsyncS3:
    """Stub aiobotocore S3 client: GetObject raises each of `errors` in turn, then the last one again (an
    exception), or sleeps forever ("hang")."""

    def __init__(self, errors: list[Any]) -> None:
        self.errors = list(errors)
        self.reads = 0

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False

    async def get_object(self, **request):
        self.reads += 1
        error = self.errors.pop(0) if len(self.errors) > 1 else self.errors[0]
        if error == "hang":
            await asyncio.sleep(3600)
        raise error


def stub_trigger(monkeypatch, ssm: StubAsyncSsm, s3_hook: Any) -> SsmCommandsTrigger:
    class StubHook:
        def __init__(self, client):
            self.client = client

        async def get_async_conn(self):
            return self.client

    monkeypatch.setattr(SsmCommandsTrigger, "hook", lambda self: StubHook(ssm))
    monkeypatch.setattr(SsmCommandsTrigger, "s3_hook", lambda self: s3_hook)
    commands = [progress_command(command_id, "i-1", "b", "k") for command_id in ssm.statuses]
    return recorded(SsmCommandsTrigger(commands=commands, poll_interval=0.01))


class TestProgressErrorsNeverEndTheWait:
    @pytest.mark.parametrize(
        "error",
        [
            pytest.param(aws_error("SlowDown", 503), id="SlowDown"),
            pytest.param(aws_error("AccessDenied", 403), id="AccessDenied"),
            pytest.param(RuntimeError("anything at all"), id="any-exception"),
        ],
    )
    def test_a_failing_read_is_logged_once_and_the_wait_goes_on(self, monkeypatch, error):
        s3 = StubAsyncS3([error])

        class S3Hook:
            async def get_async_conn(self):
                return s3

        trigger = stub_trigger(monkeypatch, StubAsyncSsm({"c": ["InProgress"] * 5 + ["Success"]}), S3Hook())

        (event,) = collect_events(trigger)

        assert [c["outcome"] for c in event["commands"]] == ["success"]
        assert s3.reads == 6  # one read per poll, every poll
        warnings = [m for m in messages(trigger, logging.WARNING) if "Cannot read the progress" in m]
        assert len(warnings) == 1 and "chunk 2/5 on i-1" in warnings[0]

    def test_a_read_that_hangs_is_cut_short(self, monkeypatch):
        monkeypatch.setattr("include.vod_sr.triggers.PROGRESS_READ_TIMEOUT", 0.05)
        s3 = StubAsyncS3(["hang"])

        class S3Hook:
            async def get_async_conn(self):
                return s3

        trigger = stub_trigger(monkeypatch, StubAsyncSsm({"c": ["InProgress", "InProgress", "Success"]}), S3Hook())

        (event,) = collect_events(trigger)

        assert [c["outcome"] for c in event["commands"]] == ["success"]
        assert [m for m in messages(trigger, logging.WARNING) if "no answer in time" in m]

    def test_an_s3_client_that_cannot_be_made_leaves_the_wait_without_progress(self, monkeypatch):
        class BrokenHook:
            async def get_async_conn(self):
                raise ValueError("no such connection")

        trigger = stub_trigger(monkeypatch, StubAsyncSsm({"c": ["InProgress", "Success"]}), BrokenHook())

        (event,) = collect_events(trigger)

        assert [c["outcome"] for c in event["commands"]] == ["success"]
        assert [m for m in messages(trigger, logging.WARNING) if "waiting without progress lines" in m]

    def test_not_modified_is_no_change(self, monkeypatch):
        class Body:
            def __init__(self, data: bytes) -> None:
                self.data = data

            async def __aenter__(self):
                return self

            async def __aexit__(self, *exc):
                return False

            async def read(self):
                return self.data

        not_modified = ClientError(
            {"Error": {"Code": "304", "Message": "Not Modified"}, "ResponseMetadata": {"HTTPStatusCode": 304}},
            "GetObject",
        )

        class S3:
            def __init__(self) -> None:
                self.requests: list[dict[str, Any]] = []

            async def __aenter__(self):
                return self

            async def __aexit__(self, *exc):
                return False

            async def get_object(self, **request):
                self.requests.append(request)
                if "IfNoneMatch" in request:
                    raise not_modified
                return {"ETag": '"e1"', "Body": Body(f"{result_line(0)}\n".encode())}

        s3 = S3()

        class S3Hook:
            async def get_async_conn(self):
                return s3

        trigger = stub_trigger(monkeypatch, StubAsyncSsm({"c": ["InProgress"] * 3 + ["Failed"]}), S3Hook())

        collect_events(trigger)

        assert [r.get("IfNoneMatch") for r in s3.requests] == [None, '"e1"', '"e1"', '"e1"']
        assert [m for m in messages(trigger) if PROGRESS_LINE.match(m)] == [
            "chunk 2/5 on i-1: 1/3 files done",
            "chunk 2/5 on i-1: 1/3 files done; its command ended (failed)",
        ]
        assert not [m for m in messages(trigger, logging.WARNING) if "progress" in m]


class TestSerialization:
    OLD = {"command_id": "c", "instance_id": "i", "deadline": 2.0, "delivery_deadline": 1.0}
    NEW = {
        **OLD,
        "position": 3,
        "lane_chunks": 20,
        "files": 10,
        "results_bucket": "out",
        "results_key": "vod-sr-runs/t/chunk-00002.results",
        "resent": True,
    }

    @pytest.mark.parametrize("command", [OLD, NEW], ids=["without-progress-fields", "with-progress-fields"])
    def test_round_trip_through_airflows_trigger_kwargs(self, command):
        from airflow.models.trigger import Trigger

        trigger = SsmCommandsTrigger(commands=[command], poll_interval=5, resume_state=[{"chunk": 2}])
        path, kwargs = trigger.serialize()

        stored = Trigger._decrypt_kwargs(Trigger.encrypt_kwargs(kwargs))
        again = SsmCommandsTrigger(**stored)

        assert again.serialize() == (path, kwargs)
        assert again.commands == [command]

    def test_progress_is_only_for_commands_that_carry_its_fields(self):
        assert ChunkProgress.of(self.OLD) is None
        assert ChunkProgress.of({**self.NEW, "files": None}) is None
        progress = ChunkProgress.of(self.NEW)
        progress.counts = (7, 1)
        assert progress.line("i-0abc") == "chunk 3/20 (sent again) on i-0abc: 7/10 files done (1 failed)"


def lane(chunks: list[int]) -> dict[str, Any]:
    """A lane of chunks with `chunks[n]` files each, indexes 10, 11, ... (plan numbers chunks across lanes)."""
    return {
        "instance_id": "i-0abc",
        "run_token": "0123456789abcdef",
        "output_bucket": "out",
        "execution_timeout": 60,
        "chunks": [
            {"index": 10 + n, "instance_id": "i-0abc", "files": [{"index": f} for f in range(count)]}
            for n, count in enumerate(chunks)
        ],
    }


class TestRunChunksProgressFields:
    def test_lane_label(self):
        assert lane_label(lane([10, 10, 3])) == "i-0abc (23 files)"

    def test_resume_puts_the_lane_label_in_the_context(self, monkeypatch):
        from tests.vod_sr.test_commands import RecordingTi, StubSsm, chunks_operator, sent_entry

        operator = chunks_operator(StubSsm(), 1, monkeypatch)
        sent = [sent_entry("c0")]
        event = {
            "status": "ended",
            "commands": [{**sent[0], "outcome": "success", "invocation_status": "Success"}],
            "transient_errors": {},
            "resume_state": sent,
        }
        context: dict[str, Any] = {"ti": RecordingTi()}

        operator.resume(context, event)

        assert context["lane_label"] == "i-0123456789abcdef0 (0 files)"

    def test_the_gpu_count_the_install_found_survives_the_deferrals(self, monkeypatch):
        from tests.vod_sr.test_commands import RecordingTi, StubSsm, chunks_operator, sent_entry

        operator = chunks_operator(StubSsm(), 1, monkeypatch)
        assert operator.gpus == 1 and operator.in_flight == 3
        sent = [sent_entry("c0")]
        event = {
            "status": "ended",
            "commands": [{**sent[0], "outcome": "success", "invocation_status": "Success"}],
            "transient_errors": {},
            "resume_state": {"gpus": 4, "entries": sent},
        }

        operator.resume({"ti": RecordingTi()}, event)

        # A new operator object on each resume: the count comes back from the trigger's state; three commands per
        # GPU would be 12, but the instance's SSM agent executes 5 at once, so no more are sent.
        assert (operator.gpus, operator.slots, operator.in_flight) == (4, 4, 5)

    @pytest.mark.parametrize(
        ("gpus", "agent_command_workers", "in_flight"),
        [(1, 5, 3), (4, 5, 5), (4, 12, 12), (8, 5, 5), (8, 30, 24)],
        ids=["1-gpu", "4-gpus", "4-gpus-raised-agent", "8-gpus", "8-gpus-raised-agent"],
    )
    def test_no_more_commands_are_out_than_the_agent_executes_at_once(self, gpus, agent_command_workers, in_flight):
        operator = RunChunksOperator(
            task_id="run_chunks", lane=lane([1]), gpus=gpus, agent_command_workers=agent_command_workers
        )

        assert operator.in_flight == in_flight

    def test_slots_the_agent_leaves_idle_are_named_in_the_log(self, monkeypatch, capsys):
        operator = RunChunksOperator(task_id="run_chunks", lane=lane([1]), gpus=8)
        monkeypatch.setattr(operator, "_reattach", lambda: [])
        monkeypatch.setattr(operator, "_stored_budget_stop", lambda: None)
        monkeypatch.setattr(operator, "_advance", lambda context, sent: {})

        operator.execute({})

        assert (
            "has 8 GPU slots but its SSM agent runs 5 commands at once: 3 slot(s) stay idle" in capsys.readouterr().out
        )

    def test_each_live_command_tells_the_trigger_its_place_files_and_results_object(self):
        operator = RunChunksOperator(task_id="run_chunks", lane=lane([10, 4, 2]))

        fields = operator._progress_fields({"chunk": 11, "files": 4})

        assert fields == {
            "position": 2,
            "lane_chunks": 3,
            "files": 4,
            "results_bucket": "out",
            "results_key": chunk_keys("0123456789abcdef", 11)[1],
        }
        # An entry from before vod-sr logged progress: the count comes from the lane.
        assert operator._progress_fields({"chunk": 12})["files"] == 2

    def test_a_resent_chunk_reports_its_own_files_and_results_object(self):
        operator = RunChunksOperator(task_id="run_chunks", lane=lane([10, 4]))

        fields = operator._progress_fields({"chunk": 10, "files": 3, "resent": True})

        assert (fields["position"], fields["files"], fields["resent"]) == (1, 3, True)
        assert fields["results_key"] == chunk_keys("0123456789abcdef", RESEND_INDEX_BASE + 10)[1]
        assert operator._progress_fields({"chunk": 10, "resent": True}) == {}  # its count unknown: no progress

    def test_a_reattached_command_gets_its_file_count_from_its_comment(self):
        from include.vod_sr.operators import _commented_file_count

        assert _commented_file_count("vod-sr 0123456789abcdef chunk 100010 (3 files)") == 3
        assert _commented_file_count("vod-sr 0123456789abcdef install AWS CLI") is None


class TestRunChunksOnTheEmulator:
    def test_the_deferral_carries_progress_fields_and_the_context_the_lane_label(self, running_instance, emulator_env):
        from airflow.sdk.exceptions import TaskDeferred

        from tests.vod_sr.test_reattach import Lane, RecordingTi

        with pytest.MonkeyPatch.context() as monkeypatch:
            test_lane = Lane(emulator_env.endpoint_url, running_instance, {0: 60, 1: 60, 2: 60}, monkeypatch)
            context: dict[str, Any] = {"ti": RecordingTi(), "run_id": "manual__progress-test"}
            try:
                with pytest.raises(TaskDeferred) as deferred:
                    test_lane.operator().execute(context)
                trigger = deferred.value.trigger
                assert context["lane_label"] == f"{running_instance} (3 files)"
                bucket, token = test_lane.lane["output_bucket"], test_lane.token
                indexes = [chunk["index"] for chunk in test_lane.lane["chunks"]]
                assert [
                    (c["position"], c["lane_chunks"], c["files"], c["results_bucket"], c["results_key"])
                    for c in trigger.commands
                ] == [(n + 1, 3, 1, bucket, chunk_keys(token, indexes[n])[1]) for n in range(2)]
                assert [entry["files"] for entry in trigger.resume_state["entries"]] == [1, 1]

                # A retry re-attaches: the entries it rebuilds from SSM's record carry the count too.
                retry_context: dict[str, Any] = {"ti": RecordingTi(), "run_id": "manual__progress-test"}
                with pytest.raises(TaskDeferred) as retried:
                    test_lane.operator().execute(retry_context)
                assert [c["files"] for c in retried.value.trigger.commands][:2] == [1, 1]
            finally:
                test_lane.cancel_all()


class TestRunChunksBudget:
    """run_chunks checks the run's spend before it sends more chunks (issue 13, point 3). AWS is stubbed here: the
    spend is what `cost.spend_so_far` answers (tested against moto in test_cost.py), and the sends are recorded;
    tests/e2e/test_budget_e2e.py runs it for real on the emulator."""

    def operator(self, monkeypatch, spends: list[float], chunks: int = 5):
        import include.vod_sr.cost as cost
        import include.vod_sr.instance as instance
        import include.vod_sr.stored_plan as stored_plan
        from include.vod_sr.cost import Rates, Spend

        operator = RunChunksOperator(
            task_id="run_chunks",
            lane={
                **lane([1] * chunks),
                "instance_id": "i-0abc",
                "chunks": [{"index": n, "files": [{}]} for n in range(chunks)],
            },
            rates=Rates(),
            in_flight=2,
        )
        from tests.vod_sr.test_commands import StubSsm

        operator.ec2 = object()
        operator.s3 = object()
        operator.ssm = StubSsm()  # each ended command is read once: Success
        sent: list[int] = []
        stored: list[tuple] = []
        priced: list[list[str]] = []

        def fake_send(chunk):
            sent.append(chunk["index"])
            return {
                "chunk": chunk["index"],
                "command_id": f"c{chunk['index']}",
                "instance_id": "i-0abc",
                "deadline": 0,
                "delivery_deadline": 0,
                "outcome": None,
                "transient_errors": 0,
                "files": 1,
            }

        def fake_spend(ec2, instance_ids, rates, *, since, now):
            priced.append(list(instance_ids))
            return Spend("USD", spends.pop(0))

        monkeypatch.setattr(operator, "_send", fake_send)
        monkeypatch.setattr(operator, "_release_early", lambda: 0)
        monkeypatch.setattr(cost, "spend_so_far", fake_spend)
        monkeypatch.setattr(instance, "refresh_lane_lease", lambda *a: True)
        monkeypatch.setattr(stored_plan, "store_left", lambda *args: stored.append(args))
        return operator, sent, stored, priced

    @staticmethod
    def context(budget):
        class Ti(dict):
            def xcom_pull(self, task_ids, key):
                return {"lanes": [{"instance_id": "i-0abc"}, {"instance_id": "i-0def"}]}

            def xcom_push(self, key, value):
                self[key] = value

        return {"ti": Ti(), "params": {"budget": budget}, "run_id": "r", "dag_run": None}

    @staticmethod
    def ended(deferred, command_id: str) -> dict[str, Any]:
        state = deferred.trigger.resume_state
        return {
            "status": "ended",
            "commands": [{"command_id": command_id, "outcome": "success", "invocation_status": "Success"}],
            "transient_errors": {},
            "resume_state": state,
        }

    def test_no_chunk_is_sent_once_the_run_has_spent_its_budget_and_the_running_ones_finish(self, monkeypatch):
        from airflow.sdk.exceptions import TaskDeferred

        operator, sent, stored, priced = self.operator(monkeypatch, spends=[0.5, 1.2])
        context = self.context(budget=1.0)
        with pytest.raises(TaskDeferred) as first:
            operator._advance(context, [])
        assert sent == [0, 1]  # under budget: two out

        with pytest.raises(TaskDeferred) as second:
            operator.resume(context, self.ended(first.value, "c0"))

        assert sent == [0, 1]  # 1.2 of 1.0 spent: chunk 2 is not sent; chunk 1 still runs
        assert priced == [["i-0abc", "i-0def"]] * 2  # the run's instances, not only this lane's
        ((_s3, bucket, token, instance_id, indices, stop),) = stored
        assert (bucket, token, instance_id, indices) == ("out", "0123456789abcdef", "i-0abc", [2, 3, 4])
        assert stop == {"budget": 1.0, "spent": 1.2, "currency": "USD", "chunks": 3}
        assert second.value.trigger.resume_state["budget_stop"] == stop

        done = operator.resume(context, self.ended(second.value, "c1"))

        assert sent == [0, 1] and len(stored) == 1  # never priced or sent again
        assert done == {"chunks": 2, "outcomes": {"success": 2}, "left_for_budget": 3}

    def test_without_a_budget_nothing_is_priced(self, monkeypatch):
        from airflow.sdk.exceptions import TaskDeferred

        operator, sent, stored, priced = self.operator(monkeypatch, spends=[])
        with pytest.raises(TaskDeferred):
            operator._advance(self.context(budget=None), [])

        assert (sent, stored, priced) == ([0, 1], [], [])
