"""The hand-off to downstream DAGs: the outputs event's extra and the example publisher's manifest."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from include.vod_sr.assets import MAX_OUTPUTS_IN_EVENT, outputs_asset, outputs_event_extra
from include.vod_sr.publish import manifest_from_events, report_bucket
from include.vod_sr.settings import Settings

REPORT_URI = "s3://out-bucket/vod-sr-reports/feedfacecafebeef.json"


def report(*statuses: str) -> dict:
    return {
        "run_id": "scheduled__2026-11-01T00:00:00+00:00",
        "files": [
            {"index": n, "status": s, "source": f"s3://src/{n}.mp4", "output": f"s3://out/{n}_sr_A.mp4", "bytes": n}
            for n, s in enumerate(statuses)
        ],
    }


class TestOutputsEvent:
    def test_lists_what_the_run_produced_not_what_was_skipped(self):
        extra = outputs_event_extra(report("ok", "skipped", "ok"), REPORT_URI, "vod_sr_nightly")

        assert extra == {
            "dag_id": "vod_sr_nightly",
            "run_id": "scheduled__2026-11-01T00:00:00+00:00",
            "report": REPORT_URI,
            "output_count": 2,
            "outputs": [
                {"output": "s3://out/0_sr_A.mp4", "source": "s3://src/0.mp4", "bytes": 0},
                {"output": "s3://out/2_sr_A.mp4", "source": "s3://src/2.mp4", "bytes": 2},
            ],
            "outputs_truncated": False,
        }

    @pytest.mark.parametrize("statuses", [(), ("skipped", "skipped")], ids=["nothing-planned", "all-skipped"])
    def test_a_run_that_produced_nothing_emits_no_event(self, statuses):
        assert outputs_event_extra(report(*statuses), REPORT_URI, "vod_sr_nightly") is None

    def test_a_big_run_lists_its_first_outputs_and_points_at_the_report(self):
        extra = outputs_event_extra(report(*["ok"] * (MAX_OUTPUTS_IN_EVENT + 5)), REPORT_URI, "vod_sr_batch")

        assert extra["output_count"] == MAX_OUTPUTS_IN_EVENT + 5
        assert len(extra["outputs"]) == MAX_OUTPUTS_IN_EVENT and extra["outputs_truncated"] is True

    def test_the_asset_is_the_deployments_output_bucket_by_name(self):
        asset = outputs_asset(Settings(output_bucket="vod-out"))

        assert (asset.name, asset.uri) == ("vod_sr_outputs", "s3://vod-out/")
        assert outputs_asset(Settings()).name == "vod_sr_outputs"  # same identity downstream, bucket unset or not


class TestPublishedManifest:
    def test_every_output_of_every_triggering_run_once(self):
        first = outputs_event_extra(report("ok", "ok"), REPORT_URI, "vod_sr_batch")
        again = outputs_event_extra(report("ok"), REPORT_URI.replace("feed", "beef"), "vod_sr_nightly")
        events = [SimpleNamespace(extra=first), SimpleNamespace(extra=again), SimpleNamespace(extra=None)]

        manifest = manifest_from_events(events)

        assert [o["output"] for o in manifest["outputs"]] == ["s3://out/0_sr_A.mp4", "s3://out/1_sr_A.mp4"]
        assert [run["dag_id"] for run in manifest["runs"]] == ["vod_sr_batch", "vod_sr_nightly", None]
        assert report_bucket(manifest) == "out-bucket"

    def test_without_a_report_location_there_is_nowhere_to_publish(self):
        with pytest.raises(ValueError, match="nothing to publish next to"):
            report_bucket(manifest_from_events([SimpleNamespace(extra={})]))
