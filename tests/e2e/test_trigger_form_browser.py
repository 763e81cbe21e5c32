"""The trigger form as an operator meets it: the real API server's UI in Debian's Chromium (headless, driven by
Playwright), with the scheduler, triggerer and the local AWS emulator behind it, real ffmpeg and AWS CLI.

Each run is started by filling in the form and pressing Trigger, then followed to success through the REST API.
Screenshots of each step land in `test-artifacts/` (`make screenshots` copies the opened form into docs/).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from include.local_aws.airflow_stack import AirflowStack
from include.local_aws.world import OUTPUT_BUCKET, SOURCE_BUCKET, boto_client, create_world
from include.local_aws.world import make_sample_clip as make_clip
from include.vod_sr.links import prefilled_trigger_link
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.fullstack, pytest.mark.browser]
DAG_ID = "vod_sr_batch"
ARTIFACTS = REPO_ROOT / "test-artifacts"
SUBMIT = '[data-testid="trigger-dag-submit"]'
# Flags for a root user on a machine with no network but loopback (background fetches are refused and slow).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Debian's chromium is not installed: `make test` installs it (apt-get install chromium)"
    return path


@pytest.fixture(scope="module")
def sources(emulator, tmp_path_factory) -> dict[str, str]:
    """One short clip under three names, one for each way of naming sources."""
    clip = make_clip(tmp_path_factory.mktemp("browser-media") / "clip.mp4", seconds=2, size="320x240")
    s3 = boto_client("s3", emulator.endpoint_url)
    create_world(emulator.endpoint_url)  # the buckets
    keys = {
        "key": "browser/one key, typed by hand.mp4",
        "folder": "browser/folder/in a folder.mp4",
        "manifest": "browser/from a manifest.mp4",
        "rerun": 'browser/re-run "failed" 한글 & $(id).mp4',
    }
    for key in keys.values():
        s3.upload_file(str(clip), SOURCE_BUCKET, key)
    s3.put_object(Bucket=SOURCE_BUCKET, Key="browser/manifest.txt", Body=(keys["manifest"] + "\n").encode())
    return keys


@pytest.fixture(scope="module")
def airflow(shared_airflow, sources) -> AirflowStack:
    """The session's shared stack (tests/e2e/conftest.py): the form's default instance is the stack's own."""
    return shared_airflow


@pytest.fixture(scope="module")
def browser(airflow) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, airflow) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 1600})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


def open_form(page: Any, airflow: AirflowStack) -> None:
    page.goto(f"http://127.0.0.1:{airflow.port}/dags/{DAG_ID}")
    page.click('[data-testid="trigger-dag-button"]')
    page.wait_for_selector("#element_sources")


def open_section(page: Any, title: str) -> None:
    """Named sections start collapsed; click the section's header to open it."""
    page.get_by_role("button", name=title, exact=True).click()


def run_id_from_url(url: str) -> str:
    """After a successful trigger the UI navigates to /dags/<dag_id>/runs/<run_id>."""
    return urllib.parse.unquote(url.rsplit("/runs/", 1)[1].split("?")[0].split("/")[0])


def submit_and_follow(page: Any, airflow: AirflowStack, name: str) -> str:
    assert page.is_enabled(SUBMIT), "Trigger is disabled"
    page.screenshot(path=str(ARTIFACTS / f"form-{name}-filled.png"), full_page=True)
    page.click(SUBMIT)
    page.wait_for_url("**/runs/**", timeout=120_000)  # the API server may be slow on a loaded 2-core machine
    run_id = run_id_from_url(page.url)
    assert airflow.wait_for_run(run_id, 300) == "success", airflow.task_states(run_id)
    page.reload()
    page.screenshot(path=str(ARTIFACTS / f"run-{name}.png"), full_page=True)
    return run_id


def run_conf(airflow: AirflowStack, run_id: str) -> dict[str, Any]:
    return airflow.run(run_id, DAG_ID)["conf"]


class TestOneWayOfNamingSources:
    def test_form_opens_with_nothing_red_and_trigger_enabled(self, page, airflow):
        open_form(page, airflow)
        time.sleep(1)  # let the form settle: errors appear on the first render when there are any

        page.screenshot(path=str(ARTIFACTS / "trigger-form.png"), full_page=True)
        assert page.is_enabled(SUBMIT)
        assert page.get_by_text("This field is required").count() == 0
        for section in ("Run Parameters", "Source options", "Output", "Instances", "Limits"):
            assert page.get_by_role("button", name=section, exact=True).is_visible(), section
        assert page.locator("#element_model").is_visible()  # the model drop-down is in the open section
        assert page.get_by_text("CPU: lanczos 2x").is_visible()  # shown by its readable name
        assert not page.locator("#element_output_bucket").is_visible()  # rarely changed: collapsed

    def test_only_a_source_key(self, page, airflow, sources, emulator):
        open_form(page, airflow)
        page.fill("#element_sources", sources["key"])

        run_id = submit_and_follow(page, airflow, "key")

        conf = run_conf(airflow, run_id)
        assert conf["sources"] == [sources["key"]] and not conf["prefixes"] and not conf["manifest"]
        assert outputs(emulator) >= {"browser/one key, typed by hand_sr_cpu.mp4"}

    def test_only_a_folder(self, page, airflow, sources, emulator):
        open_form(page, airflow)
        page.fill("#element_prefixes", "browser/folder/")

        run_id = submit_and_follow(page, airflow, "folder")

        conf = run_conf(airflow, run_id)
        assert conf["prefixes"] == ["browser/folder/"] and not conf["sources"] and not conf["manifest"]
        assert "browser/folder/in a folder_sr_cpu.mp4" in outputs(emulator)

    def test_only_a_manifest(self, page, airflow, sources, emulator):
        open_form(page, airflow)
        page.fill("#element_manifest", "browser/manifest.txt")

        run_id = submit_and_follow(page, airflow, "manifest")

        conf = run_conf(airflow, run_id)
        assert conf["manifest"] == "browser/manifest.txt" and not conf["sources"] and not conf["prefixes"]
        assert "browser/from a manifest_sr_cpu.mp4" in outputs(emulator)


class TestBadValues:
    def test_an_emptied_required_field_is_named_and_trigger_stays_disabled(self, page, airflow):
        open_form(page, airflow)
        page.fill("#element_sources", "anything.mp4")
        open_section(page, "Output")
        page.fill("#element_output_bucket", "")

        page.screenshot(path=str(ARTIFACTS / "form-required-field-emptied.png"), full_page=True)
        assert page.get_by_text("This field is required").is_visible()
        assert not page.is_enabled(SUBMIT)

    def test_a_bad_bucket_name_says_what_a_bucket_name_may_contain_and_starts_nothing(self, page, airflow):
        runs_before = airflow.api("GET", f"/dags/{DAG_ID}/dagRuns")["total_entries"]
        open_form(page, airflow)
        page.fill("#element_sources", "anything.mp4")
        open_section(page, "Output")
        page.fill("#element_output_bucket", "Bad_Bucket")
        page.click(SUBMIT)  # the 3.3 UI checks only required fields; the API server checks the rest

        message = page.get_by_text("lowercase letters, digits, dots and hyphens", exact=False).first
        message.wait_for()
        page.screenshot(path=str(ARTIFACTS / "form-bad-bucket.png"), full_page=True)
        assert "Invalid input for param output_bucket" in page.content()
        assert "/runs/" not in page.url  # still on the form, values kept for correction
        assert page.input_value("#element_output_bucket") == "Bad_Bucket"
        assert airflow.api("GET", f"/dags/{DAG_ID}/dagRuns")["total_entries"] == runs_before


def outputs(emulator) -> set[str]:
    s3 = boto_client("s3", emulator.endpoint_url)
    return {o["Key"] for o in s3.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix="browser/").get("Contents", [])}


class TestPrefilledLink:
    def test_the_vod_sr_plugin_is_loaded_by_the_api_server(self, airflow):
        plugins = airflow.api("GET", "/plugins")["plugins"]

        assert "vod_sr" in {plugin["name"] for plugin in plugins}
        assert airflow.api("GET", "/plugins/importErrors")["total_entries"] == 0

    def test_a_link_opens_the_conf_ready_to_trigger_in_one_click(self, page, airflow, sources, emulator):
        conf = {"sources": [sources["rerun"]], "prefixes": [], "manifest": None, "model": "cpu", "overwrite": True}
        link = prefilled_trigger_link(f"http://127.0.0.1:{airflow.port}", DAG_ID, conf)
        assert link is not None

        page.goto(link)
        assert json.loads(page.input_value("#conf")) == conf  # quotes, unicode and $(id) arrive intact
        page.screenshot(path=str(ARTIFACTS / "prefilled-link.png"), full_page=True)
        page.click("#trigger")
        page.wait_for_url("**/runs/**", timeout=120_000)  # the API server may be slow on a loaded 2-core machine
        run_id = run_id_from_url(page.url)

        assert airflow.wait_for_run(run_id, 300) == "success", airflow.task_states(run_id)
        assert run_conf(airflow, run_id) == conf
        assert 'browser/re-run "failed" 한글 & $(id)_sr_cpu.mp4' in outputs(emulator)

    def test_a_bad_conf_is_refused_by_airflow_and_shown(self, page, airflow):
        link = prefilled_trigger_link(f"http://127.0.0.1:{airflow.port}", DAG_ID, {"output_bucket": "Bad_Bucket"})

        page.goto(link)
        page.click("#trigger")

        page.get_by_text("lowercase letters, digits, dots and hyphens", exact=False).first.wait_for()
        assert "/runs/" not in page.url


def tab_frame(page: Any) -> Any:
    """The vod-sr page inside the UI's plugin tab (a sandboxed iframe titled with the view's name)."""
    frame_element = page.wait_for_selector("iframe[title='Super-resolution']")
    frame = frame_element.content_frame()
    assert frame is not None
    return frame


class TestRunTab:
    """The run's Super-resolution tab: a run with one good and one broken file, followed in the tab from the moment
    it is triggered until its report is shown, as an operator sees it in the UI."""

    @pytest.fixture(scope="class")
    def failed_run(self, airflow, sources, emulator) -> dict[str, Any]:
        s3 = boto_client("s3", emulator.endpoint_url)
        broken = "browser/tab/broken, not a video.mp4"
        s3.put_object(Bucket=SOURCE_BUCKET, Key=broken, Body=b"this is not a video")
        good = sources["key"]
        conf = {"sources": [good, broken], "prefixes": [], "manifest": None, "model": "cpu", "overwrite": True}
        return {"run_id": airflow.trigger(conf), "good": good, "broken": broken}

    def test_the_tab_follows_the_run_then_shows_rows_cost_qc_frames_and_a_rerun_link(
        self, page, airflow, failed_run, sources
    ):
        run_id = failed_run["run_id"]
        quoted = urllib.parse.quote(run_id, safe="")
        page.goto(f"http://127.0.0.1:{airflow.port}/dags/{DAG_ID}/runs/{quoted}/plugin/super-resolution")
        frame = tab_frame(page)
        # The page refreshes itself while the run goes: the report's table appears without a reload by the test.
        frame.wait_for_selector("#files", timeout=300_000)
        assert airflow.wait_for_run(run_id, 60) == "failed", airflow.task_states(run_id)
        page.reload()  # the UI's own header polls the run's state on its own schedule: show it ended
        frame = tab_frame(page)
        frame.wait_for_selector("#files")

        rows = frame.eval_on_selector_all("#files tr[data-index]", "rows => rows.map(r => r.dataset.status)")
        assert rows == ["ok", "failed"]
        text = frame.inner_text("body")
        assert sources["key"] in text and failed_run["broken"] in text
        assert "320x240" in text and "640x480" in text  # the source and its 2x output, as measured on the instance
        assert re.search(r"estimated cost: \d+\.\d\d USD", text), text  # g6e.xlarge at the default rate
        assert "g6e.xlarge" in text
        # Loaded from the API server (which reads them from S3): a broken image has naturalWidth 0.
        frame.wait_for_function(
            "() => [...document.querySelectorAll('#files img')].every(i => i.complete && i.naturalWidth > 0)"
        )
        assert frame.locator("#files img").count() == 1  # the good file's QC frame; the broken one has none
        width = frame.eval_on_selector("#files img", "i => i.naturalWidth")
        assert width == 2 * 640  # source upscaled plainly beside the SR output, each 640 px (1:1 crop of 640x480)
        page.screenshot(path=str(ARTIFACTS / "run-tab.png"), full_page=True)

        frame.click("#rerun")  # the pre-filled trigger page opens in the tab, with only the failed file
        frame.wait_for_selector("#conf")
        conf = json.loads(frame.input_value("#conf"))
        assert conf["sources"] == [f"s3://{SOURCE_BUCKET}/{failed_run['broken']}"] and conf["overwrite"] is True
        frame.click("#trigger")  # inside the tab, the new run's tab page follows
        frame.wait_for_url(f"**/vod-sr/dags/{DAG_ID}/runs/**")
        rerun_id = urllib.parse.unquote(frame.url.rsplit("/runs/", 1)[1])
        assert rerun_id != run_id and frame.locator("h1", has_text=f"Super-resolution: {rerun_id}").count() == 1
        assert run_conf(airflow, rerun_id)["sources"] == conf["sources"]
        airflow.api("PATCH", f"/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(rerun_id, safe='')}", {"state": "failed"})

    def test_the_json_report_link_serves_the_report(self, page, airflow, failed_run):
        airflow.wait_for_run(failed_run["run_id"], 300)
        quoted = urllib.parse.quote(failed_run["run_id"], safe="")
        response = page.request.get(f"http://127.0.0.1:{airflow.port}/vod-sr/dags/{DAG_ID}/runs/{quoted}/report.json")

        assert response.status == 200 and response.json()["counts"] == {"ok": 1, "failed": 1}

    def test_the_dag_tab_lists_runs_with_their_counts(self, page, airflow, failed_run):
        airflow.wait_for_run(failed_run["run_id"], 300)
        page.goto(f"http://127.0.0.1:{airflow.port}/dags/{DAG_ID}/plugin/super-resolution-runs")
        frame = page.wait_for_selector("iframe[title='Super-resolution runs']").content_frame()
        frame.wait_for_selector("#runs")

        row = frame.locator("#runs tr", has_text=failed_run["run_id"])
        assert "failed" in row.inner_text() and re.search(r"\d+\.\d\d USD", row.inner_text())
        page.screenshot(path=str(ARTIFACTS / "run-history-tab.png"), full_page=True)

    def test_a_report_of_1000_files_opens_in_the_tab(self, page, airflow, failed_run, emulator, figures):
        """Load time of a big run's tab, measured in the browser (recorded, not asserted: a figure for the notes).
        The run's report is replaced by one of 1,000 files for the test and put back after it."""
        from include.vod_sr.plan import run_token
        from include.vod_sr.report import REPORT_PREFIX

        airflow.wait_for_run(failed_run["run_id"], 300)
        s3 = boto_client("s3", emulator.endpoint_url)
        key = f"{REPORT_PREFIX}{run_token(DAG_ID, failed_run['run_id'])}.json"
        original = s3.get_object(Bucket=OUTPUT_BUCKET, Key=key)["Body"].read()
        report = json.loads(original)
        good = next(r for r in report["files"] if r["status"] == "ok")
        report["files"] = [{**good, "index": n, "source": f"{good['source']}-{n}"} for n in range(1000)]
        report["counts"] = {"ok": 1000}
        s3.put_object(Bucket=OUTPUT_BUCKET, Key=key, Body=json.dumps(report).encode())
        try:
            quoted = urllib.parse.quote(failed_run["run_id"], safe="")
            started = time.perf_counter()
            page.goto(f"http://127.0.0.1:{airflow.port}/vod-sr/dags/{DAG_ID}/runs/{quoted}", wait_until="load")
            loaded = time.perf_counter() - started
            timing = page.evaluate(
                "() => { const n = performance.getEntriesByType('navigation')[0];"
                " return {response: n.responseEnd, load: n.loadEventEnd, bytes: n.transferSize}; }"
            )

            assert page.locator("#files tr[data-index]").count() == 1000
            figures["run_tab_1000_files"] = {
                "load_seconds": round(loaded, 2),
                "server_response_seconds": round(timing["response"] / 1000, 2),
                "load_event_seconds": round(timing["load"] / 1000, 2),
                "page_bytes": timing["bytes"],
            }
        finally:
            s3.put_object(Bucket=OUTPUT_BUCKET, Key=key, Body=original)
