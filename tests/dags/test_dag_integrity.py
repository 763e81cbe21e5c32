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
    "file_timeout": 900,
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
    # run_chunks installs the CLI itself before its first chunk: no task boundary between them (issue 12).
    assert upstream["lane.run_chunks"] == {"lane.wait_for_agent", "plan"}
    assert "lane.run_chunks" in upstream["lane.verify"]
    assert "lane.verify" in upstream["report"]
    # The GPU is stopped as soon as its commands end; verification needs only S3.
    assert "lane.run_chunks" in upstream["lane.release"] and "lane.verify" not in upstream["lane.release"]


def test_chunks_run_deferred_and_a_retry_reattaches_instead_of_resending(dag):
    from include.vod_sr.operators import RunChunksOperator

    run_chunks = dag.get_task("lane.run_chunks")
    assert isinstance(run_chunks, RunChunksOperator)
    # A worker lost between two sends is retried; the retry finds this run's commands in SSM, waits again for the live
    # ones, does not resend ended ones and sends only the rest (tests/vod_sr/test_reattach.py,
    # tests/e2e/test_worker_loss.py). Chunks that failed end the task without a retry (AirflowFailException).
    assert run_chunks.retries == 2
    assert run_chunks.retry_delay.total_seconds() > 0
    assert dag.get_task("lane.verify").trigger_rule == "all_done"  # verify what got done, also after a failure


class TestWaits:
    """Every fixed wait is a setting whose default is the production value; the e2e fixtures lower them."""

    def test_the_defaults_are_the_production_waits(self, dag):
        from include.vod_sr.operators import DEFER_SETTLE_SECONDS

        assert dag.get_task("lane.run_chunks").defer_settle == DEFER_SETTLE_SECONDS == 5  # apache/airflow#72716
        assert dag.get_task("lane.verify").retry_delay.total_seconds() == 30
        assert dag.get_task("lane.acquire").retry_delay.total_seconds() == 60

    def test_the_settings_reach_the_tasks(self, monkeypatch):
        from include.vod_sr.pipeline import vod_sr_dag
        from include.vod_sr.settings import Settings

        monkeypatch.setenv("VOD_SR_DEFER_SETTLE_SECONDS", "0")
        monkeypatch.setenv("VOD_SR_RETRY_DELAY", "2")
        monkeypatch.setenv("VOD_SR_AGENT_QUICK_WAIT_SECONDS", "3")
        monkeypatch.setenv("VOD_SR_INSTANCE_IDS", "i-0123456789abcdef0")
        settings = Settings.from_env()
        dag = vod_sr_dag("waits_probe", doc_md="", settings=settings)

        assert (settings.defer_settle, settings.retry_delay, settings.agent_quick_wait) == (0, 2, 3)
        assert dag.get_task("lane.run_chunks").defer_settle == 0
        assert dag.get_task("lane.verify").retry_delay.total_seconds() == 2
        assert dag.get_task("report").retry_delay.total_seconds() == 2

    @pytest.mark.parametrize("name", ["VOD_SR_DEFER_SETTLE_SECONDS", "VOD_SR_RETRY_DELAY"])
    def test_a_negative_wait_is_refused_naming_the_setting(self, monkeypatch, name):
        from include.vod_sr.settings import Settings

        monkeypatch.setenv(name, "-1")
        with pytest.raises(ValueError, match=name):
            Settings.from_env()


def test_runs_sharing_the_gpu_instances_queue_one_at_a_time(dag):
    assert dag.max_active_runs == 1  # VOD_SR_MAX_ACTIVE_RUNS raises it where runs use disjoint instances


def test_readiness_sensor_is_bounded_and_frees_its_slot(dag):
    sensor = dag.get_task("lane.wait_for_agent")

    assert sensor.mode == "reschedule"
    assert 0 < sensor.timeout <= 3600


class TestParams:
    def test_every_param_has_title_and_description(self, dag):
        for name, param in dag.params.items():
            assert param.schema.get("title"), name
            # In the schema, so that the API server's validation message carries the rule in words.
            assert param.schema.get("description_md"), name

    def test_models_show_readable_names(self, dag):
        schema = dag.params.get_param("model").schema

        assert schema["enum"] == ["A", "B", "cpu"]  # a drop-down
        assert schema["values_display"]["A"].startswith("Model A") and schema["values_display"]["cpu"].startswith("CPU")

    @pytest.mark.parametrize("name", ["sources", "prefixes", "manifest"])
    def test_alternative_sources_are_optional_in_the_form(self, dag, name):
        # The 3.3 UI marks a field required unless its type allows null; a required empty field blocks Trigger.
        assert "null" in dag.params.get_param(name).schema["type"]

    @pytest.mark.parametrize(
        "conf",
        [
            pytest.param({"sources": ["a.mp4"]}, id="only-sources"),
            pytest.param({"prefixes": ["incoming/"]}, id="only-folders"),
            pytest.param({"manifest": "lists/backfill.csv"}, id="only-manifest"),
            # What the form sends for alternatives left empty or cleared.
            pytest.param({"sources": ["a.mp4"], "prefixes": None, "manifest": None}, id="others-null"),
            pytest.param({"sources": ["a.mp4"], "prefixes": [], "manifest": ""}, id="others-empty"),
            pytest.param({"sources": ["a.mp4"], "custom_model": "C"}, id="custom-model"),
        ],
    )
    def test_any_one_way_of_naming_sources_validates(self, dag, conf):
        base = {"output_bucket": "out-bucket", "instance_ids": ["i-0123456789abcdef0"]}

        self.validated(dag, {**base, **conf})

    def test_defaults_from_the_deployment_are_valid(self):
        from include.vod_sr.params import trigger_form
        from include.vod_sr.settings import Settings

        form = trigger_form(Settings(instance_ids=("i-0123456789abcdef0",), output_bucket="out", source_bucket="src"))

        for param in form.values():
            param.resolve()  # raises on a default the form would show as invalid

    def test_a_custom_default_model_stays_selectable(self):
        from include.vod_sr.params import trigger_form
        from include.vod_sr.settings import Settings

        model = trigger_form(Settings(default_model="C"))["model"]

        assert model.resolve() == "C" and model.schema["values_display"]["C"].startswith("C (custom model")

    def test_time_limits_say_what_they_cover(self, dag):
        budget, file_limit = (dag.params.get_param(name).schema for name in ("execution_timeout", "file_timeout"))

        assert budget["section"] == file_limit["section"] == "Limits"
        assert budget["title"] == "Chunk time budget (seconds)"  # the name stays execution_timeout for old confs
        assert "takes the instance's lock" in budget["description_md"]
        assert "backstop" in budget["description_md"]
        assert file_limit["title"] == "Per-file time limit (seconds)"
        assert "not its download" in file_limit["description_md"]
        assert "null" in file_limit["type"]  # optional: empty means no per-file limit
        assert dag.params["file_timeout"] is None

    def test_bucket_message_says_what_a_bucket_name_may_contain(self, dag):
        from airflow.sdk.exceptions import ParamValidationError

        with pytest.raises(ParamValidationError, match="lowercase letters, digits, dots and hyphens"):
            self.validated(dag, {**GOOD_CONF, "output_bucket": "Bad_Bucket"})

    @staticmethod
    def validated(dag, conf):
        params = copy.deepcopy(dag.params)
        params.update(conf)  # as a trigger's conf is applied: each value is checked against its schema
        return params.validate()

    def test_good_conf_validates(self, dag):
        assert self.validated(dag, GOOD_CONF)["model"] == "B"

    @pytest.mark.parametrize("instance_ids", [[], None], ids=["empty", "null"])
    def test_a_fleet_conf_without_instance_ids_validates(self, dag, instance_ids):
        # Named instances and a fleet are alternatives: the form takes either; plan refuses neither and both.
        fleet = {
            "instance_ids": instance_ids,
            "fleet_size": 3,
            "launch_template": "lt-0123456789abcdef0",
            "launch_template_version": "7",
            "spot": True,
            "fleet_instance_types": ["g6e.xlarge", "g6e.2xlarge"],
        }

        validated = self.validated(dag, {**GOOD_CONF, **fleet})

        assert (validated["fleet_size"], validated["launch_template"]) == (3, "lt-0123456789abcdef0")

    def test_fleet_fields_have_their_own_section_and_default_to_no_fleet(self, dag):
        names = ("fleet_size", "launch_template", "launch_template_version", "spot", "fleet_instance_types")

        assert {dag.params.get_param(n).schema["section"] for n in names} == {"Fleet"}
        assert (dag.params["fleet_size"], dag.params["launch_template_version"], dag.params["spot"]) == (
            0,
            "$Default",
            False,
        )
        assert "null" in dag.params.get_param("instance_ids").schema["type"]  # optional in the form: a fleet instead

    def test_fleet_defaults_from_the_deployment_are_valid(self):
        from include.vod_sr.params import trigger_form
        from include.vod_sr.settings import Settings

        form = trigger_form(
            Settings(
                output_bucket="out",
                launch_template="bluewhale-g6e",
                fleet_size=4,
                spot=True,
                fleet_instance_types=("g6e.xlarge", "g6e.2xlarge"),
            )
        )

        assert {name: form[name].resolve() for name in ("fleet_size", "launch_template", "spot")} == {
            "fleet_size": 4,
            "launch_template": "bluewhale-g6e",
            "spot": True,
        }
        for param in form.values():
            param.resolve()

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
            # The chunk ahead's budget and this one's must both fit in SSM's 48 h.
            pytest.param({"execution_timeout": 172_800}, id="budget-leaves-no-room-for-the-chunk-ahead"),
            pytest.param({"file_timeout": 5}, id="file-limit-too-short"),
            pytest.param({"file_timeout": "600"}, id="file-limit-not-a-number"),
            pytest.param({"chunk_size": 0}, id="chunk-size"),
            pytest.param({"overwrite": "yes"}, id="overwrite-not-bool"),
            pytest.param({"model": "C"}, id="custom-model-in-the-drop-down"),
            pytest.param({"custom_model": "bad name"}, id="custom-model-name"),
            pytest.param({"fleet_size": 51}, id="fleet-over-a-runs-lanes"),
            pytest.param({"fleet_size": -1}, id="fleet-size-negative"),
            pytest.param({"fleet_size": "3"}, id="fleet-size-not-a-number"),
            pytest.param({"launch_template": "lt"}, id="launch-template-too-short"),
            pytest.param({"launch_template": "bluewhale gpu"}, id="launch-template-with-a-space"),
            pytest.param({"launch_template_version": "v2"}, id="launch-template-version"),
            pytest.param({"spot": "yes"}, id="spot-not-bool"),
            pytest.param({"fleet_instance_types": ["G6E.XLARGE"]}, id="instance-type"),
            pytest.param({"fleet_instance_types": [f"g6e.{n}xlarge" for n in range(11)]}, id="too-many-types"),
            pytest.param({"output_bucket": "ab"}, id="bucket-too-short"),
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


def test_every_task_takes_the_configured_pool(dag):
    assert {task.pool for task in dag.tasks} == {"default_pool"}  # nothing configured: Airflow's own pool
    code = (
        "from airflow.dag_processing.dagbag import DagBag;"
        "dag = DagBag(dag_folder='dags').dags['vod_sr_batch'];"
        "print(sorted({t.pool for t in dag.tasks}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "VOD_SR_POOL": "vod-sr-aws"},
        check=True,
    )

    assert result.stdout.strip().splitlines()[-1] == "['vod-sr-aws']"  # caps EC2/SSM callers across runs and DAGs
