"""The vod-sr pages served by the Airflow API server (mounted by plugins/vod_sr_plugin.py).

Airflow does not authenticate plugin routes: every route here depends on the API server's own auth, so a page is
shown only to a user who may do what the page offers. The page triggers through Airflow's REST API from the
browser, with the user's own session, so Airflow validates the conf and checks permissions exactly as for its own
trigger form.
"""

from __future__ import annotations

import html
import json
from typing import Any

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import requires_access_dag
from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse

app = FastAPI(title="vod-sr", description="Pre-filled trigger pages for the vod-sr DAGs")

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Trigger {dag_id_html}</title>
<style>
 body {{ font-family: system-ui, sans-serif; margin: 2rem; max-width: 60rem; color: #1a202c; }}
 textarea {{ width: 100%; height: 24rem; font-family: monospace; font-size: 0.9rem; }}
 button {{ background: #2b4c7e; color: white; border: 0; padding: 0.6rem 1.4rem; font-size: 1rem; border-radius: 4px; }}
 #error {{ color: #b00020; white-space: pre-wrap; font-family: monospace; }}
</style></head>
<body>
<h1>Trigger {dag_id_html}</h1>
<p>{summary_html} Check the conf, edit it if needed, and press Trigger. Airflow validates it as for its own form.</p>
<textarea id="conf" aria-label="conf" spellcheck="false">{conf_html}</textarea>
<p><button id="trigger" type="button">Trigger</button></p>
<div id="error" role="alert"></div>
<script>
const dagId = {dag_id_js};
// Relative to this page (<base>/vod-sr/dags/<dag_id>/trigger), so a base_url prefix is kept.
const root = new URL("../../../", window.location.href);
document.getElementById("trigger").addEventListener("click", async () => {{
  const error = document.getElementById("error");
  error.textContent = "";
  let conf;
  try {{ conf = JSON.parse(document.getElementById("conf").value); }}
  catch (e) {{ error.textContent = "The conf is not valid JSON: " + e.message; return; }}
  const response = await fetch(new URL("api/v2/dags/" + encodeURIComponent(dagId) + "/dagRuns", root), {{
    method: "POST", credentials: "same-origin", headers: {{"Content-Type": "application/json"}},
    body: JSON.stringify({{logical_date: null, conf: conf}}),
  }});
  const body = await response.json().catch(() => ({{}}));
  if (!response.ok) {{
    error.textContent = response.status + " " + (typeof body.detail === "string" ? body.detail : JSON.stringify(body));
    return;
  }}
  window.location.href = new URL(
    "dags/" + encodeURIComponent(dagId) + "/runs/" + encodeURIComponent(body.dag_run_id), root);
}});
</script>
</body></html>
"""


def _summary(conf: dict[str, Any]) -> str:
    sources = conf.get("sources") or []
    return f"{len(sources)} source(s) listed." if isinstance(sources, list) else ""


@app.get(
    "/dags/{dag_id}/trigger",
    response_class=HTMLResponse,
    dependencies=[Depends(requires_access_dag(method="POST", access_entity=DagAccessEntity.RUN))],
)
def prefilled_trigger_page(dag_id: str, conf: str = Query("{}", description="JSON object: the run's conf")) -> str:
    """A page showing `conf` ready to trigger `dag_id` (see include/vod_sr/links.py)."""
    try:
        parsed = json.loads(conf)
    except json.JSONDecodeError as error:
        raise HTTPException(status_code=400, detail=f"conf is not valid JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise HTTPException(status_code=400, detail="conf must be a JSON object")
    return PAGE.format(
        dag_id_html=html.escape(dag_id),
        summary_html=html.escape(_summary(parsed)),
        conf_html=html.escape(json.dumps(parsed, indent=2, ensure_ascii=False)),
        # Inside <script>: JSON is a JS literal; escaping "<" keeps "</script>" in a DAG id from ending the block.
        dag_id_js=json.dumps(dag_id).replace("<", "\\u003c"),
    )
