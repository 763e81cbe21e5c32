"""Mounts the vod-sr pages (include/vod_sr/web.py) on the Airflow API server under /vod-sr."""

from __future__ import annotations

from typing import Any, ClassVar

from airflow.plugins_manager import AirflowPlugin

from include.vod_sr.links import PLUGIN_PREFIX
from include.vod_sr.web import app


class VodSrPlugin(AirflowPlugin):
    name = "vod_sr"
    fastapi_apps: ClassVar[list[dict[str, Any]]] = [{"app": app, "url_prefix": PLUGIN_PREFIX, "name": "vod-sr pages"}]
