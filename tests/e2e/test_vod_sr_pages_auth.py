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
