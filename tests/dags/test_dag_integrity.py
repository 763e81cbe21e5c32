"""DAG integrity: the DAG loads, is wired as designed, and its trigger form accepts and rejects what it should."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
from airflow.dag_processing.dagbag import DagBag

from tests.conftest import REPO_ROOT

DAG_ID = "vod_sr_batch"
EXPECTED_TASKS = {
    "plan",
    "lane.acquire",
    "lane.wait_for_agent",
    "lane.install_cli",
    "lane.run_chunks",
    "lane.verify",
    "lane.release",
    "report",
}
GOOD_CONF = {
    "sources": ["videos/a.mp4", "s3://other-bucket/b.mov"],
    "model": "B",
    "source_bucket": "src-bucket",
    "output_bucket": "out-bucket",
    "instance_ids": ["i-0123456789abcdef0", "i-0fedcba9876543210"],
    "prefixes": ["incoming/2026-11-26/"],
    "manifest": "s3://manifests/backfill.csv",
    "execution_timeout": 7200,
}


@pytest.fixture(scope="module")
def dagbag():
    return DagBag(dag_folder=str(REPO_ROOT / "dags"))


@pytest.fixture(scope="module")
def dag(dagbag):
    return dagbag.dags[DAG_ID]


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}


def test_expected_tasks(dag):
    assert {t.task_id for t in dag.tasks} == EXPECTED_TASKS


def test_release_is_the_teardown_of_acquire_in_each_lane(dag):
    acquire, release = dag.get_task("lane.acquire"), dag.get_task("lane.release")

    assert acquire.is_setup and release.is_teardown
    assert "lane.acquire" in release.upstream_task_ids
    assert acquire.task_group.group_id == release.task_group.group_id == "lane"  # one per instance
    # A failed stop must show in the run's state: that is what costs money.
    assert release.on_failure_fail_dagrun


def test_report_is_not_upstream_of_the_teardown(dag):
    # With on_failure_fail_dagrun, a teardown downstream of report would alone decide the run's state and hide a
    # failed report (seen in the e2e failing-file test before this was fixed).
    assert "report" not in dag.get_task("lane.release").upstream_task_ids
    assert dag.get_task("report").downstream_task_ids == set()


def test_chain_order(dag):
    upstream = {t.task_id: t.upstream_task_ids for t in dag.tasks}

    assert upstream["lane.acquire"] == {"plan"}
    assert upstream["lane.wait_for_agent"] == {"lane.acquire"}
    assert upstream["lane.install_cli"] == {"lane.wait_for_agent"}
    assert upstream["lane.run_chunks"] == {"lane.install_cli", "plan"}
    assert "lane.run_chunks" in upstream["lane.verify"]
    assert "lane.verify" in upstream["report"]
    # The GPU is stopped as soon as its commands end; verification needs only S3.
    assert "lane.run_chunks" in upstream["lane.release"] and "lane.verify" not in upstream["lane.release"]


def test_chunks_run_deferred_and_are_never_retried_blindly(dag):
    from include.vod_sr.operators import RunChunksOperator

    run_chunks = dag.get_task("lane.run_chunks")
    assert isinstance(run_chunks, RunChunksOperator)
    assert run_chunks.retries == 0  # a retry would run the same files twice on the GPU
    assert dag.get_task("lane.verify").trigger_rule == "all_done"  # verify what got done, also after a failure


def test_readiness_sensor_is_bounded_and_frees_its_slot(dag):
    sensor = dag.get_task("lane.wait_for_agent")

    assert sensor.mode == "reschedule"
    assert 0 < sensor.timeout <= 3600


class TestParams:
    def test_every_param_has_title_and_description(self, dag):
        for name, param in dag.params.items():
            assert param.schema.get("title"), name
            assert param.description, name

    def test_models_show_readable_names(self, dag):
        display = dag.params.get_param("model").schema["values_display"]

        assert display["A"].startswith("Model A") and display["cpu"].startswith("CPU")

    @staticmethod
    def validated(dag, conf):
        params = copy.deepcopy(dag.params)
        params.update(conf)  # as a trigger's conf is applied: each value is checked against its schema
        return params.validate()

    def test_good_conf_validates(self, dag):
        assert self.validated(dag, GOOD_CONF)["model"] == "B"

    @pytest.mark.parametrize(
        "bad",
        [
            pytest.param({"sources": "a.mp4"}, id="sources-not-a-list"),
            pytest.param({"instance_ids": ["web-01"]}, id="instance-id"),
            pytest.param({"instance_ids": "i-0123456789abcdef0"}, id="instance-ids-not-a-list"),
            pytest.param({"extensions": ["mp4"]}, id="extension-without-dot"),
            pytest.param({"chunk_size": 500}, id="chunk-size-over-result-limit"),
            pytest.param({"output_bucket": "Bad_Bucket"}, id="bucket"),
            pytest.param({"execution_timeout": 10}, id="timeout-too-short"),
            pytest.param({"execution_timeout": 200_000}, id="timeout-over-ssm-max"),
            pytest.param({"chunk_size": 0}, id="chunk-size"),
            pytest.param({"overwrite": "yes"}, id="overwrite-not-bool"),
        ],
    )
    def test_bad_conf_is_rejected(self, dag, bad):
        from airflow.sdk.exceptions import ParamValidationError

        with pytest.raises(ParamValidationError):
            self.validated(dag, {**GOOD_CONF, **bad})


def test_dag_file_imports_no_aws_sdk_at_parse_time():
    code = (
        "import runpy, sys; runpy.run_path('dags/vod_sr_batch.py');"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore', 'aiobotocore', 'moto'));"
        "print('AWS SDK modules:', ','.join(bad))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, env={**os.environ}, check=True
    )

    assert "AWS SDK modules: \n" in result.stdout
