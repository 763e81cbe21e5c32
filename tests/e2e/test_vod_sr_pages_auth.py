"""Airflow does not authenticate plugin routes: the vod-sr pages must refuse whoever may not use them.

Runs the real API server (with SimpleAuthManager and real users, not the all-admins mode the other full-stack
tests use) with the vod-sr plugin loaded, and asks for the pre-filled trigger page anonymously, as a viewer and as
an operator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from include.local_aws.services import free_port, stop_process_group
from include.vod_sr.links import prefilled_trigger_link
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.fullstack]
DAG_ID = "vod_sr_batch"


class ApiServer:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "operator:op,watcher:viewer",
            "PYTHONPATH": str(REPO_ROOT),
        }
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ApiServer:
        airflow = str(Path(sys.executable).parent / "airflow")
        subprocess.run([airflow, "db", "migrate"], env=self.env, check=True, capture_output=True)
        self.log = open(self.home / "api-server.log", "wb")
        self.process = subprocess.Popen(
            [airflow, "api-server", "--port", str(self.port)],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while self.get("/api/v2/monitor/health")[0] != 200:
            assert self.process.poll() is None and time.monotonic() < deadline, (
                self.home / "api-server.log"
            ).read_text()
            time.sleep(1)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        stop_process_group(self.process)
        self.log.close()

    def get(self, path: str, token: str | None = None) -> tuple[int, str]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", headers={"Authorization": f"Bearer {token}"} if token else {}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except (urllib.error.URLError, ConnectionError):
            return 0, ""

    def token(self, username: str) -> str:
        passwords = json.loads((self.home / "simple_auth_manager_passwords.json.generated").read_text())
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/auth/token",
            data=json.dumps({"username": username, "password": passwords[username]}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)["access_token"]


@pytest.fixture(scope="module")
def api_server(tmp_path_factory) -> Iterator[ApiServer]:
    with ApiServer(tmp_path_factory.mktemp("api-server-home")) as server:
        yield server


def page_path() -> str:
    link = prefilled_trigger_link("", DAG_ID, {"sources": ["a.mp4"]})
    assert link is not None
    return link


def test_an_anonymous_request_is_refused(api_server):
    status, body = api_server.get(page_path())

    assert status in (401, 403) and "<textarea" not in body


def test_a_user_who_may_not_trigger_the_dag_is_refused(api_server):
    status, body = api_server.get(page_path(), api_server.token("watcher"))

    assert status == 403 and "<textarea" not in body


def test_a_user_who_may_trigger_the_dag_gets_the_page(api_server):
    status, body = api_server.get(page_path(), api_server.token("operator"))

    assert status == 200 and "a.mp4" in body and "<textarea" in body


# --- The run pages, in a browser ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    from tests.e2e.test_trigger_form_browser import CHROMIUM_ARGS, chromium_path

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


RUN_PAGES = (
    f"/vod-sr/dags/{DAG_ID}/runs/manual__2026-11-29T10%3A00%3A00%2B00%3A00",
    f"/vod-sr/dags/{DAG_ID}/runs/manual__2026-11-29T10%3A00%3A00%2B00%3A00/qc/0.jpg",
    f"/vod-sr/dags/{DAG_ID}/runs/manual__2026-11-29T10%3A00%3A00%2B00%3A00/report.json",
    f"/vod-sr/dags/{DAG_ID}/history",
)


@pytest.mark.browser
def test_a_browser_that_has_not_signed_in_is_refused_the_run_pages(api_server, browser):
    context = browser.new_context()
    try:
        page = context.new_page()
        for path in RUN_PAGES:
            response = page.goto(f"http://127.0.0.1:{api_server.port}{path}")

            assert response is not None and response.status == 401, path
            assert "Not authenticated" in page.inner_text("body"), path
    finally:
        context.close()


@pytest.mark.browser
def test_a_viewer_who_signed_in_through_the_ui_reads_the_run_history(api_server, browser):
    passwords = json.loads((api_server.home / "simple_auth_manager_passwords.json.generated").read_text())
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(f"http://127.0.0.1:{api_server.port}/")  # Airflow sends a stranger to its sign-in page
        page.fill("input[name='username']", "watcher")
        page.fill("input[name='password']", passwords["watcher"])
        page.click("button[type='submit']")
        page.wait_for_function("() => document.cookie.includes('_token=')")

        response = page.goto(f"http://127.0.0.1:{api_server.port}/vod-sr/dags/{DAG_ID}/history")

        assert response is not None and response.status == 200
        assert "Super-resolution runs of vod_sr_batch" in page.inner_text("body")
        assert "No runs yet." in page.inner_text("body")  # read from the metadata database: this server ran none
    finally:
        context.close()
