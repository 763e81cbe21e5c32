"""A run's budget (issue 13, point 3) on the emulated instance: vod_sr_batch with dag.test(), the real AWS CLI and
ffmpeg on the instance. The instance's model runs are paced by the emulator (20 s each, InstanceFaults
model_run_seconds), so its instance time grows at a known pace; the hourly rate is set so that the budget falls
part-way through the run."""

from __future__ import annotations

import json

import pytest

from include.local_aws.world import boto_client
from include.vod_sr.instance import COMMAND_COMMENT_PREFIX
from tests.e2e.test_batch_e2e import stored_report

pytestmark = pytest.mark.e2e

FILES = 8
MODEL_RUN_SECONDS = 20
RATE_PER_HOUR = 36.0  # 0.01 USD a second: the 60 s billed at the first start alone cost 0.60
# Reached at 75 s of instance time. Three chunks go out at once (one GPU slot); each later one when one ends, about
# every 20 s: by 75 s at most six of the eight were sent.
BUDGET = 0.75


def test_a_budget_stops_the_sends_part_way_and_leaves_the_rest_for_the_next_run(world, monkeypatch):
    monkeypatch.setenv("VOD_SR_HOURLY_RATES", json.dumps({"g6e.xlarge": RATE_PER_HOUR}))  # read at DAG parse
    world.emulator.set_faults({"instances": {world.instance_id: {"model_run_seconds": MODEL_RUN_SECONDS}}})
    keys = [f"budget/clip-{n}.mp4" for n in range(FILES)]
    for key in keys:
        world.upload(key)

    run = world.run(sources=keys, chunk_size=1, budget=BUDGET)

    assert run.state == "success", run.task_states  # left files are not failures
    report = stored_report(world, run)
    status = {f["source"].rsplit("/", 1)[-1]: f["status"] for f in report["files"]}
    left = sorted(name for name, s in status.items() if s == "left")
    assert set(status.values()) == {"ok", "left"}, status
    assert 2 <= len(left) <= FILES - 3, status  # part-way: some ran, some were left
    # Exactly the files whose chunks were never sent are left: the running chunks finished.
    sent = {
        int(c["Comment"].split(" chunk ", 1)[1].split()[0])
        for c in boto_client("ssm", world.emulator.endpoint_url).list_commands(InstanceId=world.instance_id)["Commands"]
        if c["Comment"].startswith(COMMAND_COMMENT_PREFIX) and " chunk " in c["Comment"]
    }
    assert sorted(f"clip-{n}.mp4" for n in range(FILES) if n not in sent) == left
    assert all(status[f"clip-{n}.mp4"] == "ok" for n in sent)
    # The report says why and gives the conf (and link) that runs only them, with the same budget.
    reasons = {f["reason"] for f in report["files"] if f["status"] == "left"}
    assert len(reasons) == 1 and "the run's budget of 0.7500 USD was reached" in reasons.pop()
    assert sorted(s.rsplit("/", 1)[-1] for s in report["left_conf"]["sources"]) == left
    assert report["left_conf"]["budget"] == BUDGET and report["left_conf"]["prefixes"] == []
    assert report["budget"] == {"amount": BUDGET, "currency": "USD", "reached": True}
    assert report["retry_conf"] is None
    assert report["cost"]["total"] >= BUDGET  # the running chunks took it past the budget, as documented
    assert world.instance_state() == "stopped"


def test_a_budget_not_reached_changes_nothing(world, monkeypatch):
    world.upload("budget/only.mp4")

    run = world.run(sources=["budget/only.mp4"], budget=1000)

    assert run.state == "success", run.task_states
    report = stored_report(world, run)
    assert [f["status"] for f in report["files"]] == ["ok"]
    assert report["left_conf"] is None
    assert report["budget"] == {"amount": 1000, "currency": "USD", "reached": False}
