"""The vod-sr pages served by the Airflow API server (mounted by plugins/vod_sr_plugin.py): the pre-filled trigger
page, each run's "Super-resolution" tab (report, progress, QC frames, cost) and each DAG's run history.

Airflow does not authenticate plugin routes: every route here depends on the API server's own auth, so a page is
shown only to a user who may do what the page offers. The page triggers through Airflow's REST API from the
browser, with the user's own session, so Airflow validates the conf and checks permissions exactly as for its own
trigger form.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Annotated, Any

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import requires_access_dag
from fastapi import Depends, FastAPI, HTTPException, Query, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse

from include.vod_sr.run_page import (
    FINISHED_STATES,
    LaneProgress,
    RunSummary,
    lane_progress,
    render_history,
    render_run_page,
)
from include.vod_sr.settings import Settings

log = logging.getLogger(__name__)

app = FastAPI(title="vod-sr", description="Run reports and pre-filled trigger pages for the vod-sr DAGs")

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
  // Inside the run's Super-resolution tab (an iframe that may not navigate the UI around it) go on to the new
  // run's tab page; opened on its own, to the run in Airflow's UI.
  window.location.href = window.top !== window
    ? new URL("runs/" + encodeURIComponent(body.dag_run_id), window.location.href)
    : new URL("dags/" + encodeURIComponent(dagId) + "/runs/" + encodeURIComponent(body.dag_run_id), root);
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


# --- Run reports -----------------------------------------------------------------------------------------------

# Runs listed by the history view, and threads reading their reports (and a running run's results) from S3.
HISTORY_RUNS = 25
S3_READERS = 8
# How long a link to an output stays valid (the browser downloads it straight from S3).
OUTPUT_LINK_SECONDS = 3600


@dataclass(frozen=True)
class RunInfo:
    dag_id: str
    run_id: str
    state: str
    conf: Mapping[str, Any]
    start_date: datetime | None


class RunSource:
    """What the run pages read: runs and the plan's summary from Airflow's metadata database, reports, results and
    QC frames from S3 through the deployment's AWS connection (the API server's principal needs
    iam/airflow-principal-policy.ui.json). The tests replace it (`app.dependency_overrides[run_source]`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def s3(self) -> Any:
        from include.vod_sr.aws import aws_client

        return aws_client("s3", self.settings.aws_conn_id)

    def output_bucket(self, run: RunInfo) -> str:
        return str(run.conf.get("output_bucket") or self.settings.output_bucket)

    def run(self, dag_id: str, run_id: str) -> RunInfo | None:
        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            row = session.scalar(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
            return None if row is None else _run_info(row)

    def recent_runs(self, dag_id: str, limit: int) -> list[RunInfo]:
        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            rows = session.scalars(
                select(DagRun).where(DagRun.dag_id == dag_id).order_by(DagRun.run_after.desc()).limit(limit)
            )
            return [_run_info(row) for row in rows]

    def plan_summary(self, dag_id: str, run_id: str) -> Mapping[str, Any] | None:
        """The plan task's XCom "summary" (O(chunks): which chunks and how many files each instance has)."""
        from airflow.models.xcom import XComModel
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            value = session.scalar(
                select(XComModel.value).where(
                    XComModel.dag_id == dag_id,
                    XComModel.run_id == run_id,
                    XComModel.task_id == "plan",
                    XComModel.key == "summary",
                    XComModel.map_index == -1,
                )
            )
        if isinstance(value, str | bytes):
            value = json.loads(value)
        return value if isinstance(value, Mapping) else None


def _run_info(row: Any) -> RunInfo:
    return RunInfo(row.dag_id, row.run_id, str(row.state), dict(row.conf or {}), row.start_date)


_source: RunSource | None = None


def run_source() -> RunSource:
    global _source
    if _source is None:
        _source = RunSource(Settings.from_env())
    return _source


RunSourceDep = Annotated[RunSource, Depends(run_source)]
READ_RUNS = [Depends(requires_access_dag(method="GET", access_entity=DagAccessEntity.RUN))]


def _get_object(s3: Any, bucket: str, key: str) -> bytes | None:
    """The object's bytes; None when it does not exist (yet)."""
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except (s3.exceptions.NoSuchKey, s3.exceptions.NoSuchBucket):
        return None


def _report(source: RunSource, run: RunInfo) -> tuple[dict[str, Any] | None, str]:
    from include.vod_sr.plan import run_token
    from include.vod_sr.report import REPORT_PREFIX

    bucket, key = source.output_bucket(run), f"{REPORT_PREFIX}{run_token(run.dag_id, run.run_id)}.json"
    body = _get_object(source.s3, bucket, key) if bucket else None
    return (None if body is None else json.loads(body)), f"s3://{bucket}/{key}"


def _progress(source: RunSource, run: RunInfo, summary: Mapping[str, Any]) -> list[LaneProgress]:
    """Each instance's files done so far, from the results objects the chunk scripts rewrite as each file ends."""
    from include.vod_sr.script import chunk_keys
    from include.vod_sr.stored_plan import load_lane_index

    bucket, token = source.output_bucket(run), summary["run_token"]
    lanes = summary.get("lanes") or []
    if lanes and not isinstance(lanes[0].get("chunks"), list):  # the summary counts chunks; their indices are in S3
        lanes = load_lane_index(source.s3, bucket, token)

    def results(index: int) -> tuple[int, str | None]:
        body = _get_object(source.s3, bucket, chunk_keys(token, index)[1])
        return index, None if body is None else body.decode(errors="replace")

    with ThreadPoolExecutor(S3_READERS) as pool:
        found = dict(pool.map(results, [index for lane in lanes for index in lane["chunks"]]))
    return lane_progress(lanes, found)


def _known_run(source: RunSource, dag_id: str, run_id: str) -> RunInfo:
    run = source.run(dag_id, run_id)
    if run is None:
        raise HTTPException(status_code=404, detail=f"DAG {dag_id!r} has no run {run_id!r}")
    return run


@app.get("/dags/{dag_id}/runs/{run_id}", response_class=HTMLResponse, dependencies=READ_RUNS)
def run_page(dag_id: str, run_id: str, source: RunSourceDep) -> str:
    """The run's Super-resolution tab (external view `dag_run`): progress while it runs, then its report."""
    run = _known_run(source, dag_id, run_id)
    if not source.output_bucket(run):
        return render_run_page(
            dag_id=dag_id,
            run_id=run_id,
            state=run.state,
            report=None,
            progress=None,
            report_uri=None,
            message="This run names no output bucket, so it has no vod-sr report (is it a vod-sr DAG?).",
        )
    report, report_uri = _report(source, run)
    progress = None
    if report is None or run.state not in FINISHED_STATES:
        summary = source.plan_summary(dag_id, run_id)
        progress = _progress(source, run, summary) if summary else None
    return render_run_page(
        dag_id=dag_id, run_id=run_id, state=run.state, report=report, progress=progress, report_uri=report_uri
    )


@app.get("/dags/{dag_id}/runs/{run_id}/report.json", dependencies=READ_RUNS)
def run_report(dag_id: str, run_id: str, source: RunSourceDep) -> Response:
    """The run's JSON report as stored in S3."""
    run = _known_run(source, dag_id, run_id)
    report, report_uri = _report(source, run)
    if report is None:
        raise HTTPException(status_code=404, detail=f"no report at {report_uri} yet")
    return JSONResponse(report)


def _report_record(source: RunSource, run: RunInfo, index: int) -> Mapping[str, Any]:
    report, report_uri = _report(source, run)
    for record in (report or {}).get("files", []):
        if record["index"] == index:
            return record
    raise HTTPException(status_code=404, detail=f"file {index} is not in the report {report_uri}")


@app.get("/dags/{dag_id}/runs/{run_id}/qc/{index}.jpg", dependencies=READ_RUNS)
def qc_frame(dag_id: str, run_id: str, index: int, source: RunSourceDep) -> Response:
    """The file's QC frame (source upscaled plainly beside the SR output), read from S3 through the API server, so
    the browser needs no S3 access and the page's auth covers it."""
    run = _known_run(source, dag_id, run_id)
    uri = _report_record(source, run, index).get("qc")
    if not uri:
        raise HTTPException(status_code=404, detail=f"file {index} has no QC frame")
    bucket, _, key = str(uri).removeprefix("s3://").partition("/")
    body = _get_object(source.s3, bucket, key)
    if body is None:
        raise HTTPException(status_code=404, detail=f"{uri} does not exist")
    return Response(body, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


@app.get("/dags/{dag_id}/runs/{run_id}/outputs/{index}", dependencies=READ_RUNS)
def output_link(dag_id: str, run_id: str, index: int, source: RunSourceDep) -> RedirectResponse:
    """A short-lived presigned link to the file's output: the browser fetches the video from S3 itself."""
    run = _known_run(source, dag_id, run_id)
    record = _report_record(source, run, index)
    bucket, _, key = str(record["output"]).removeprefix("s3://").partition("/")
    url = source.s3.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=OUTPUT_LINK_SECONDS
    )
    return RedirectResponse(url, status_code=307)


@app.get("/dags/{dag_id}/history", response_class=HTMLResponse, dependencies=READ_RUNS)
def history_page(dag_id: str, source: RunSourceDep) -> str:
    """The DAG's recent runs (external view `dag`) with their counts, failures and estimated cost."""
    runs = source.recent_runs(dag_id, HISTORY_RUNS)

    def summarize(run: RunInfo) -> RunSummary:
        report = None
        if source.output_bucket(run):
            try:
                report, _ = _report(source, run)
            except Exception as error:  # one unreadable report must not hide the others
                log.warning("Could not read the report of %s %s: %s", dag_id, run.run_id, error)
        return RunSummary(
            run_id=run.run_id,
            state=run.state,
            started=run.start_date.strftime("%Y-%m-%d %H:%M:%S UTC") if run.start_date else "not started",
            counts=(report or {}).get("counts") if report else None,
            cost=(report or {}).get("cost") if report else None,
        )

    with ThreadPoolExecutor(S3_READERS) as pool:
        return render_history(dag_id, list(pool.map(summarize, runs)))
