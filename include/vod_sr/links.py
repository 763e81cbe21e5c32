"""Links an operator clicks: a trigger page pre-filled with a conf (for "re-run the failures")."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping
from typing import Any

# Served by the vod-sr plugin (plugins/vod_sr_plugin.py) on the API server, under its base URL.
PLUGIN_PREFIX = "/vod-sr"
# Browsers, proxies and the API server's HTTP parser all cap a request line; past this, give the conf instead.
MAX_LINK_LENGTH = 8_000


def trigger_path(dag_id: str) -> str:
    return f"{PLUGIN_PREFIX}/dags/{urllib.parse.quote(dag_id, safe='')}/trigger"


def prefilled_trigger_link(base_url: str, dag_id: str, conf: Mapping[str, Any]) -> str | None:
    """URL of a page that shows `conf` ready to trigger `dag_id` with one click; None when the conf is too long to
    travel in a URL (thousands of failed keys), in which case the conf itself is the way to re-run."""
    query = urllib.parse.urlencode({"conf": json.dumps(conf, ensure_ascii=False, separators=(",", ":"))})
    link = f"{base_url.rstrip('/')}{trigger_path(dag_id)}?{query}"
    return link if len(link) <= MAX_LINK_LENGTH else None
