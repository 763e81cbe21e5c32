"""The estimated EC2 cost of a run: the math, the settings that set the rates, and the report's cost section."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest

from include.vod_sr.cost import DEFAULT_HOURLY_RATES, Rates, Spend, instance_cost, run_cost, spend_so_far
from include.vod_sr.report import build_report, format_table
from include.vod_sr.settings import Settings

G6E_SIZES = ("xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge", "24xlarge", "48xlarge")


def released(instance_id: str, seconds: int | None, instance_type: str | None, outcome: str = "stopped") -> dict:
    return {"instance_id": instance_id, "outcome": outcome, "instance_seconds": seconds, "instance_type": instance_type}


class TestInstanceCost:
    def test_is_per_second_at_the_hourly_rate_rounded_to_four_decimals(self):
        assert instance_cost(3600, "g6e.xlarge", Rates()) == {
            "instance_type": "g6e.xlarge",
            "seconds": 3600,
            "billed_seconds": 3600,
            "hourly_rate": 1.861,
            "cost": 1.861,
        }
        # 1000 s at 2.24208/h = 0.622800 (4 decimals); 4321 s at 1.861/h = 2.2337...
        assert instance_cost(1000, "g6e.2xlarge", Rates())["cost"] == 0.6228
        assert instance_cost(4321, "g6e.xlarge", Rates())["cost"] == round(4321 * 1.861 / 3600, 4) == 2.2337

    @pytest.mark.parametrize("seconds", [0, 1, 59, 60])
    def test_a_start_is_billed_at_least_a_minute(self, seconds):
        entry = instance_cost(seconds, "g6e.xlarge", Rates())

        assert (entry["seconds"], entry["billed_seconds"]) == (seconds, 60)
        assert entry["cost"] == round(60 * 1.861 / 3600, 4) == 0.031

    def test_61_seconds_are_billed_as_61(self):
        assert instance_cost(61, "g6e.xlarge", Rates())["billed_seconds"] == 61

    def test_an_unknown_type_has_no_rate_and_no_cost(self):
        entry = instance_cost(600, "g5.xlarge", Rates())

        assert (entry["billed_seconds"], entry["hourly_rate"], entry["cost"]) == (600, None, None)
        assert instance_cost(600, None, Rates())["cost"] is None

    def test_an_unknown_time_has_no_cost(self):
        entry = instance_cost(None, "g6e.xlarge", Rates())

        assert (entry["billed_seconds"], entry["hourly_rate"], entry["cost"]) == (None, 1.861, None)

    def test_every_g6e_size_has_a_default_rate(self):
        assert set(DEFAULT_HOURLY_RATES) == {f"g6e.{size}" for size in G6E_SIZES}
        assert all(rate > 0 for rate in DEFAULT_HOURLY_RATES.values())


class TestRunCost:
    def test_totals_the_instances(self):
        cost = run_cost([released("i-0aaa", 3600, "g6e.xlarge"), released("i-0bbb", 1800, "g6e.48xlarge")], Rates())

        assert cost == {
            "currency": "USD",
            "total": round(1.861 + 30.13118 / 2, 4),
            "partial": False,
            "instances": {
                "i-0aaa": instance_cost(3600, "g6e.xlarge", Rates()),
                "i-0bbb": instance_cost(1800, "g6e.48xlarge", Rates()),
            },
            "unpriced": [],
        }
        assert cost["total"] == 16.9266

    def test_a_total_that_leaves_instances_out_says_so_and_why(self):
        cost = run_cost(
            [
                released("i-0aaa", 3600, "g6e.xlarge"),
                released("i-0bbb", None, "g6e.xlarge"),
                released("i-0ccc", 600, "p5.48xlarge"),
                {"instance_id": "i-0ddd", "outcome": "not released, it may still be running: boom"},
            ],
            Rates(),
        )

        assert cost["total"] == 1.861 and cost["partial"] is True
        assert [u["instance_id"] for u in cost["unpriced"]] == ["i-0bbb", "i-0ccc", "i-0ddd"]
        reasons = {u["instance_id"]: u["reason"] for u in cost["unpriced"]}
        assert "running time is unknown" in reasons["i-0bbb"]
        assert "no USD hourly rate for p5.48xlarge (set VOD_SR_HOURLY_RATES)" in reasons["i-0ccc"]
        assert "running time is unknown" in reasons["i-0ddd"] and "instance type is unknown" in reasons["i-0ddd"]

    def test_no_instances_cost_nothing(self):
        assert run_cost([], Rates()) == {
            "currency": "USD",
            "total": 0,
            "partial": False,
            "instances": {},
            "unpriced": [],
        }

    def test_in_the_rates_currency(self):
        cost = run_cost([released("i-0aaa", 7200, "g6e.xlarge")], Rates("EUR", {"g6e.xlarge": 1.5}))

        assert (cost["currency"], cost["total"]) == ("EUR", 3.0)


class TestSettings:
    @pytest.fixture(autouse=True)
    def clean(self, monkeypatch):
        monkeypatch.delenv("VOD_SR_HOURLY_RATES", raising=False)
        monkeypatch.delenv("VOD_SR_COST_CURRENCY", raising=False)

    def test_the_defaults_are_the_usd_list_prices(self):
        rates = Settings.from_env().rates

        assert rates == Settings().rates == Rates()
        assert (rates.currency, dict(rates.hourly)) == ("USD", DEFAULT_HOURLY_RATES)

    def test_given_rates_are_merged_over_the_defaults(self, monkeypatch):
        monkeypatch.setenv("VOD_SR_HOURLY_RATES", json.dumps({"g6e.xlarge": 0.75, " g5.2xlarge ": 1, "g6e.4xlarge": 0}))

        hourly = Settings.from_env().rates.hourly

        assert hourly == {**DEFAULT_HOURLY_RATES, "g6e.xlarge": 0.75, "g5.2xlarge": 1.0, "g6e.4xlarge": 0.0}
        assert DEFAULT_HOURLY_RATES["g6e.xlarge"] == 1.861  # the defaults themselves are untouched

    def test_another_currency_uses_only_the_rates_given(self, monkeypatch):
        # The built-in rates are USD: they would be mislabelled in another currency.
        monkeypatch.setenv("VOD_SR_COST_CURRENCY", " EUR ")
        monkeypatch.setenv("VOD_SR_HOURLY_RATES", '{"g6e.xlarge": 1.7}')

        rates = Settings.from_env().rates

        assert rates == Rates("EUR", {"g6e.xlarge": 1.7})
        assert run_cost([released("i-0aaa", 60, "g6e.2xlarge")], rates)["unpriced"] == [
            {"instance_id": "i-0aaa", "reason": "no EUR hourly rate for g6e.2xlarge (set VOD_SR_HOURLY_RATES)"}
        ]

    def test_an_empty_setting_is_the_default(self, monkeypatch):
        monkeypatch.setenv("VOD_SR_HOURLY_RATES", "  ")
        monkeypatch.setenv("VOD_SR_COST_CURRENCY", "")

        assert Settings.from_env().rates == Rates()

    @pytest.mark.parametrize(
        ("value", "message"),
        [
            ("g6e.xlarge=1.2", r"VOD_SR_HOURLY_RATES is not JSON \("),
            ('{"g6e.xlarge": 1.2', r"VOD_SR_HOURLY_RATES is not JSON \("),
            ("[1.2]", "VOD_SR_HOURLY_RATES must be a JSON object of instance type -> price per hour"),
            ("1.2", "VOD_SR_HOURLY_RATES must be a JSON object"),
            ('{"g6e.xlarge": "1.2"}', r"VOD_SR_HOURLY_RATES: the rate of 'g6e.xlarge' is '1.2', not a number"),
            ('{"g6e.xlarge": null}', "VOD_SR_HOURLY_RATES: the rate of 'g6e.xlarge' is None, not a number"),
            ('{"g6e.xlarge": true}', "VOD_SR_HOURLY_RATES: the rate of 'g6e.xlarge' is True, not a number"),
            ('{"g6e.xlarge": NaN}', "VOD_SR_HOURLY_RATES: the rate of 'g6e.xlarge' is nan, not a number"),
            ('{"g6e.xlarge": Infinity}', "VOD_SR_HOURLY_RATES: the rate of 'g6e.xlarge' is inf, not a number"),
            ('{"g6e.xlarge": -0.5}', "VOD_SR_HOURLY_RATES: the rate of 'g6e.xlarge' is -0.5, below zero"),
            ('{" ": 1}', "VOD_SR_HOURLY_RATES has an empty instance type"),
        ],
    )
    def test_a_bad_rate_setting_is_named(self, monkeypatch, value, message):
        monkeypatch.setenv("VOD_SR_HOURLY_RATES", value)

        with pytest.raises(ValueError, match=message):
            Settings.from_env()


class TestReport:
    RELEASED = [released("i-0aaa", 1800, "g6e.xlarge"), released("i-0bbb", None, "g6e.2xlarge", "already stopped")]

    def build(self, **kwargs) -> dict:
        return build_report(
            run_id="r1", run_token="0123456789abcdef", params={}, planned=[], verified=[], skipped=[], **kwargs
        )

    def test_the_cost_of_the_released_instances_goes_into_the_report(self):
        report = self.build(released=self.RELEASED, rates=Rates())

        assert report["cost"] == run_cost(self.RELEASED, Rates())
        assert (report["cost"]["total"], report["cost"]["partial"]) == (0.9305, True)
        # the keys that were there before stay as they were
        assert report["instance_seconds"] == {"i-0aaa": 1800, "i-0bbb": None}
        assert report["instances_left_running"] == {}
        json.dumps(report)  # stored as JSON

    def test_no_cost_without_rates_or_without_release_records(self):
        assert "cost" not in self.build(released=self.RELEASED)
        assert "cost" not in self.build(rates=Rates())

    def test_the_table_has_a_cost_line_per_instance_and_the_total(self):
        table = format_table(self.build(released=self.RELEASED, rates=Rates())).splitlines()

        assert "instance i-0aaa (g6e.xlarge) cost about 0.9305 USD: 1800 s billed at 1.861 USD/h" in table
        assert (
            "instance i-0bbb (g6e.2xlarge) cost unknown: its running time is unknown (EC2 gave no launch or stop time)"
            in table
        )
        assert table[-1] == "estimated EC2 cost: 0.9305 USD (partial: 1 instance(s) unpriced)"

    def test_a_complete_total_says_nothing_of_unpriced_instances(self):
        table = format_table(self.build(released=self.RELEASED[:1], rates=Rates()))

        assert table.splitlines()[-1] == "estimated EC2 cost: 0.9305 USD"


class TestSpendSoFar:
    """What the run's budget is checked against: moto's EC2 (its LaunchTime is when the instance was launched)."""

    @pytest.fixture
    def ec2(self):
        import boto3
        from moto import mock_aws

        with mock_aws():
            yield boto3.client("ec2", region_name="us-east-1")

    def launch(self, ec2, instance_type: str = "g6e.xlarge") -> tuple[str, datetime]:
        instance = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1, InstanceType=instance_type)[
            "Instances"
        ][0]
        return instance["InstanceId"], instance["LaunchTime"]

    def test_running_instances_cost_from_their_launch_to_now(self, ec2):
        first, launched = self.launch(ec2)
        second, _ = self.launch(ec2, "g6e.12xlarge")
        now = launched + timedelta(hours=1)

        spend = spend_so_far(ec2, [first, second], Rates(), since=launched - timedelta(days=1), now=now)

        assert spend == Spend("USD", round(1.861 + 10.49264, 4))
        assert spend.line() == "about 12.3536 USD spent so far"

    def test_an_instance_ec2_no_longer_knows_is_left_out_not_fatal(self, ec2):
        # AWS forgets a terminated instance after about an hour: DescribeInstances(InstanceIds=[it]) then fails whole
        # (InvalidInstanceID.NotFound), which would leave the run without a budget. The filter skips it.
        instance, launched = self.launch(ec2)

        spend = spend_so_far(
            ec2, [instance, "i-0123456789abcdef0"], Rates(), since=launched, now=launched + timedelta(hours=1)
        )

        assert spend == Spend("USD", 1.861)

    def test_an_instance_up_before_the_run_counts_from_the_run_start(self, ec2):
        instance, launched = self.launch(ec2)
        started = launched + timedelta(hours=5)  # another run had it up for five hours

        spend = spend_so_far(ec2, [instance], Rates(), since=started, now=started + timedelta(minutes=30))

        assert spend.total == round(1.861 / 2, 4)

    def test_a_stopped_instance_counts_to_its_stop(self, ec2):
        instance, launched = self.launch(ec2)
        ec2.stop_instances(InstanceIds=[instance])  # moto: "User initiated (<now> GMT)"

        spend = spend_so_far(ec2, [instance], Rates(), since=launched, now=launched + timedelta(days=3))

        assert spend.total == round(60 * 1.861 / 3600, 4)  # stopped within the minute: billed the minimum

    def test_an_unpriced_type_is_named_not_guessed(self, ec2):
        instance, launched = self.launch(ec2, "m5.large")

        spend = spend_so_far(ec2, [instance], Rates(), since=launched, now=launched + timedelta(hours=1))

        assert (spend.total, spend.unpriced) == (0.0, (instance,))
        assert f"1 instance(s) not priced: {instance}" in spend.line()


class TestBudgetSettings:
    def test_nightly_runs_take_the_configured_budget_and_manual_runs_none(self, monkeypatch):
        from include.vod_sr.pipeline import vod_sr_dag

        monkeypatch.setenv("VOD_SR_NIGHTLY_BUDGET", "12.5")
        # A scheduled DAG's params must all be valid by default.
        monkeypatch.setenv("VOD_SR_OUTPUT_BUCKET", "out-bucket")
        monkeypatch.setenv("VOD_SR_INSTANCE_IDS", "i-0123456789abcdef0")
        settings = Settings.from_env()

        nightly = vod_sr_dag(
            "nightly_budget_test", doc_md="", schedule="@daily", selection="interval", settings=settings
        )
        manual = vod_sr_dag("manual_budget_test", doc_md="", settings=settings)

        assert settings.nightly_budget == 12.5
        assert nightly.params["budget"] == 12.5
        assert manual.params["budget"] is None

    @pytest.mark.parametrize("value", ["0", "-3", "ten"])
    def test_a_bad_nightly_budget_is_refused_by_name(self, monkeypatch, value):
        monkeypatch.setenv("VOD_SR_NIGHTLY_BUDGET", value)

        with pytest.raises(ValueError, match="VOD_SR_NIGHTLY_BUDGET"):
            Settings.from_env()

    def test_the_form_refuses_a_budget_of_zero(self):
        from airflow.sdk import Param
        from airflow.sdk.exceptions import ParamValidationError

        from include.vod_sr.params import trigger_form

        budget: Param = trigger_form(Settings())["budget"]

        budget.resolve(0.5)
        with pytest.raises(ParamValidationError):
            budget.resolve(0)
