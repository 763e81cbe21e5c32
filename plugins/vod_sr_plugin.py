"""Mounts the vod-sr pages (include/vod_sr/web.py) on the Airflow API server under /vod-sr, and adds them to the UI:
a "Super-resolution" tab on every DAG run and a "Super-resolution runs" tab on every DAG.

The UI substitutes {DAG_ID} and {RUN_ID} in `href` and shows the page in an iframe at
/dags/<dag_id>/runs/<run_id>/plugin/<url_route>. The hrefs are relative (no leading slash), so a `base_url`
prefix is kept. Airflow lists external views for every DAG; the pages say so on a DAG that is not a vod-sr one.
"""

from __future__ import annotations

from typing import Any, ClassVar

from airflow.plugins_manager import AirflowPlugin

from include.vod_sr.links import PLUGIN_PREFIX
from include.vod_sr.web import app

_PAGES = PLUGIN_PREFIX.lstrip("/")


class VodSrPlugin(AirflowPlugin):
    name = "vod_sr"
    fastapi_apps: ClassVar[list[dict[str, Any]]] = [{"app": app, "url_prefix": PLUGIN_PREFIX, "name": "vod-sr pages"}]
    external_views: ClassVar[list[dict[str, Any]]] = [
        {
            "name": "Super-resolution",
            "href": f"{_PAGES}/dags/{{DAG_ID}}/runs/{{RUN_ID}}",
            "destination": "dag_run",
            "url_route": "super-resolution",
        },
        {
            "name": "Super-resolution runs",
            "href": f"{_PAGES}/dags/{{DAG_ID}}/history",
            "destination": "dag",
            "url_route": "super-resolution-runs",
        },
    ]
