"""The HTML of the run's "Super-resolution" tab and the DAG's run history (served by include/vod_sr/web.py).

Pure functions of the run's state, its JSON report (include/vod_sr/report.py) and its progress: no Airflow, no
AWS, so they are tested on their own. Every value from a user or a file name is escaped. Links are relative to
the page's own URL (`<base>/vod-sr/dags/<dag_id>/runs/<run_id>`, `<base>/vod-sr/dags/<dag_id>/history`), so a
`base_url` prefix in front of the API server is kept.
"""

from __future__ import annotations

import html
import json
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from include.vod_sr.script import parse_result_lines

# Seconds between refreshes of a run's page while the run is going.
REFRESH_SECONDS = 10
FINISHED_STATES = frozenset({"success", "failed"})


@dataclass(frozen=True)
class LaneProgress:
    """One instance's files: planned, with a result from the instance so far, and of those failed."""

    instance_id: str
    planned: int
    done: int
    failed: int


def lane_progress(lanes: Iterable[Mapping[str, Any]], results: Mapping[int, str | None]) -> list[LaneProgress]:
    """Progress per instance from the plan's summary lanes (`{"instance_id", "chunks": [index, ...], "files"}`) and
    each chunk's results object as the instance last stored it (None: none yet), by chunk index. The records are
    the ones the chunk script writes as each file ends and run_chunks' log counts."""
    progress = []
    for lane in lanes:
        records = [
            record for index in lane["chunks"] for record in parse_result_lines(results.get(index) or "").values()
        ]
        progress.append(
            LaneProgress(
                instance_id=lane["instance_id"],
                planned=int(lane["files"]),
                done=len(records),
                failed=sum(1 for record in records if record["status"] == "failed"),
            )
        )
    return progress


@dataclass(frozen=True)
class RunSummary:
    """One row of the history view."""

    run_id: str
    state: str
    started: str
    counts: Mapping[str, int] | None
    cost: Mapping[str, Any] | None


def run_path(run_id: str) -> str:
    """A run's page, relative to a page of the same DAG (`.../dags/<dag_id>/<anything>`)."""
    return "./runs/" + urllib.parse.quote(run_id, safe="")


STYLE = """
 body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.2rem; color: #1a202c; }
 h1 { font-size: 1.3rem; margin: 0 0 .8rem; } h2 { font-size: 1.05rem; margin: 1.4rem 0 .5rem; }
 .state { display: inline-block; padding: .1rem .6rem; border-radius: 1rem; font-size: .85rem; color: white;
          background: #718096; vertical-align: middle; }
 .state.success, .status.ok { background: #2f855a; } .state.failed, .status.failed { background: #c53030; }
 .state.running, .state.queued { background: #2b6cb0; } .status.skipped { background: #718096; }
 .status { color: white; border-radius: .3rem; padding: 0 .4rem; font-size: .8rem; }
 .cards { display: flex; gap: .8rem; flex-wrap: wrap; }
 .card { border: 1px solid #e2e8f0; border-radius: .5rem; padding: .5rem .9rem; min-width: 7rem; }
 .card b { display: block; font-size: 1.4rem; }
 table { border-collapse: collapse; font-size: .85rem; }
 th, td { border-bottom: 1px solid #e2e8f0; padding: .3rem .5rem; text-align: left; vertical-align: top; }
 th { background: #f7fafc; position: sticky; top: 0; }
 td.num { text-align: right; font-variant-numeric: tabular-nums; }
 .bar { background: #e2e8f0; border-radius: .3rem; height: .7rem; width: 14rem; overflow: hidden;
        display: inline-block; }
 .bar span { display: block; height: 100%; background: #2b6cb0; }
 .qc img { width: 18rem; height: auto; display: block; border: 1px solid #e2e8f0; }
 .muted { color: #718096; }
 .key { font-family: ui-monospace, monospace; font-size: .8rem; overflow-wrap: anywhere; min-width: 12rem; }
 .links { display: flex; gap: 1rem; align-items: center; flex-wrap: wrap; margin: 1rem 0; }
 a.button { background: #2b4c7e; color: white; padding: .4rem .9rem; border-radius: .3rem; text-decoration: none;
            white-space: nowrap; }
"""


def _page(title: str, body: str, *, refresh: bool = False) -> str:
    meta = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if refresh else ""
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">{meta}<title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def money(amount: float | None, currency: str) -> str:
    return "unknown" if amount is None else f"{amount:,.2f} {currency}"


def _media(media: Mapping[str, Any] | None) -> str:
    if not media:
        return '<span class="muted">-</span>'
    size = f"{media['width']}x{media['height']}" if media.get("width") is not None else "no video"
    seconds = f"{media['seconds']:.2f} s" if media.get("seconds") is not None else "? s"
    return f"{size}<br><span class='muted'>{seconds}</span>"


def _state(state: str) -> str:
    return f'<span class="state {_e(state)}">{_e(state)}</span>'


def _cards(items: Sequence[tuple[str, Any]]) -> str:
    return (
        '<div class="cards">' + "".join(f'<div class="card"><b>{_e(v)}</b>{_e(k)}</div>' for k, v in items) + "</div>"
    )


def _progress_section(progress: Sequence[LaneProgress]) -> str:
    planned, done = sum(p.planned for p in progress), sum(p.done for p in progress)
    rows = "".join(
        f"<tr><td class='key'>{_e(p.instance_id)}</td>"
        f"<td><span class='bar'><span style='width:{100 * p.done // max(p.planned, 1)}%'></span></span></td>"
        f"<td class='num'>{p.done}/{p.planned} files done</td>"
        f"<td class='num'>{p.failed} failed</td></tr>"
        for p in progress
    )
    return (
        f"<h2>Progress: <span id='progress'>{done}/{planned}</span> files done</h2>"
        f"<table id='lanes'><tr><th>instance</th><th></th><th>done</th><th>failed</th></tr>{rows}</table>"
    )


def _unpriced(entry: Any) -> str:
    return f"{entry.get('instance_id')}: {entry.get('reason')}" if isinstance(entry, Mapping) else str(entry)


def _cost_section(cost: Mapping[str, Any] | None, instance_seconds: Mapping[str, Any] | None) -> str:
    if not cost:
        if not instance_seconds:
            return ""
        rows = "".join(
            f"<tr><td class='key'>{_e(i)}</td><td class='num'>{duration(s)}</td></tr>"
            for i, s in instance_seconds.items()
        )
        return f"<h2>Instance time</h2><table><tr><th>instance</th><th>running</th></tr>{rows}</table>"
    currency = cost.get("currency", "")
    rows = "".join(
        f"<tr><td class='key'>{_e(i)}</td><td>{_e(c.get('instance_type') or 'unknown type')}</td>"
        f"<td class='num'>{duration(c.get('seconds'))}</td>"
        f"<td class='num'>{_e(c.get('hourly_rate') if c.get('hourly_rate') is not None else 'no rate')}</td>"
        f"<td class='num'>{money(c.get('cost'), currency)}</td></tr>"
        for i, c in (cost.get("instances") or {}).items()
    )
    unpriced = cost.get("unpriced") or []
    note = (
        f"<p class='muted'>Partial: {len(unpriced)} instance(s) could not be priced "
        f"({_e('; '.join(_unpriced(u) for u in unpriced))}).</p>"
        if unpriced
        else ""
    )
    return (
        f"<h2>Instance time and estimated cost: <span id='cost-total'>{money(cost.get('total'), currency)}</span></h2>"
        f"<table id='cost'><tr><th>instance</th><th>type</th><th>running</th><th>rate per hour</th>"
        f"<th>estimated cost</th></tr>{rows}</table>{note}"
        "<p class='muted'>Instance time as EC2 reports it (launch to stop, billed per second, at least a minute), "
        "times the configured hourly rate (VOD_SR_HOURLY_RATES).</p>"
    )


def _file_rows(files: Iterable[Mapping[str, Any]], run_link: str) -> str:
    rows = []
    for record in files:
        index = int(record["index"])
        status = str(record["status"])
        output = _e(record.get("output"))
        if status == "ok":
            output = f"<a href='{run_link}/outputs/{index}'>{output}</a>"
        if record.get("qc"):
            qc = (
                f"<a href='{run_link}/qc/{index}.jpg'><img loading='lazy' alt='QC frame of file {index}' "
                f"src='{run_link}/qc/{index}.jpg'></a>"
            )
        elif status == "ok":
            qc = f"<span class='muted'>no frame: {_e(record.get('qc_reason') or 'not made')}</span>"
        else:
            qc = ""
        sr_seconds = record.get("sr_seconds")
        rows.append(
            f"<tr data-index='{index}' data-status='{_e(status)}'><td class='num'>{index}</td>"
            f"<td><span class='status {_e(status)}'>{_e(status)}</span></td>"
            f"<td class='qc'>{qc}</td>"
            f"<td class='key'>{_e(record.get('source'))}<br>&rarr; {output}</td>"
            f"<td>{_e(record.get('reason'))}</td>"
            f"<td>{_media(record.get('source_media'))}</td><td>{_media(record.get('output_media'))}</td>"
            f"<td class='num'>{int(record.get('bytes') or 0):,}</td>"
            f"<td class='num'>{'' if sr_seconds is None else _e(sr_seconds)}</td></tr>"
        )
    return "".join(rows)


def render_run_page(
    *,
    dag_id: str,
    run_id: str,
    state: str,
    report: Mapping[str, Any] | None,
    progress: Sequence[LaneProgress] | None,
    report_uri: str | None,
    message: str = "",
) -> str:
    """The run's tab: progress while it runs, then the report (counts, cost, a row per file with its QC frame)."""
    run_link = "./" + urllib.parse.quote(run_id, safe="")
    going = state not in FINISHED_STATES
    parts = [f"<h1>Super-resolution: {_e(run_id)} {_state(state)}</h1>"]
    if message:
        parts.append(f"<p id='message'>{_e(message)}</p>")
    if progress and (going or report is None):
        parts.append(_progress_section(progress))
    if report is not None:
        counts = report.get("counts") or {}
        planned = len(report.get("files") or [])
        parts.append(
            _cards(
                [
                    ("files", planned),
                    ("ok", counts.get("ok", 0)),
                    ("failed", counts.get("failed", 0)),
                    ("skipped", counts.get("skipped", 0)),
                    *([("left (budget)", counts["left"])] if counts.get("left") else []),
                ]
            )
        )
        links = [f"<a id='json-report' href='{run_link}/report.json'>JSON report</a>"]
        if report_uri:
            links.append(f"<span class='key muted'>{_e(report_uri)}</span>")
        if report.get("retry_conf"):
            conf = json.dumps(report["retry_conf"], ensure_ascii=False, separators=(",", ":"))
            # ../trigger from <base>/vod-sr/dags/<dag_id>/runs/<run_id>: the pre-filled trigger page of this DAG.
            href = "../trigger?" + urllib.parse.urlencode({"conf": conf})
            links.append(
                f"<a id='rerun' class='button' href='{_e(href)}'>"
                f"Re-run the {counts.get('failed', 0)} failed file(s)</a>"
            )
        if report.get("left_conf"):
            conf = json.dumps(report["left_conf"], ensure_ascii=False, separators=(",", ":"))
            href = "../trigger?" + urllib.parse.urlencode({"conf": conf})
            links.append(
                f"<a id='run-left' class='button' href='{_e(href)}'>"
                f"Run the {counts.get('left', 0)} file(s) the budget left</a>"
            )
        parts.append("<div class='links'>" + "".join(links) + "</div>")
        parts.append(_cost_section(report.get("cost"), report.get("instance_seconds")))
        left = report.get("instances_left_running") or {}
        if left:
            parts.append(
                "<h2>Instances left running</h2><ul>"
                + "".join(f"<li><span class='key'>{_e(i)}</span>: {_e(why)}</li>" for i, why in left.items())
                + "</ul>"
            )
        parts.append(
            "<h2>Files</h2><table id='files'><tr><th>#</th><th>status</th>"
            "<th>QC frame: source upscaled plainly | SR output</th><th>source &rarr; output</th>"
            "<th>reason</th><th>source video</th><th>output video</th><th>bytes</th><th>SR seconds</th></tr>"
            + _file_rows(report.get("files") or [], run_link)
            + "</table>"
        )
    elif not progress:
        parts.append("<p class='muted'>No plan yet: the run has not planned its files.</p>")
    if going:
        parts.append(f"<p class='muted'>The run is {_e(state)}; this page refreshes every {REFRESH_SECONDS} s.</p>")
    return _page(f"{dag_id} {run_id}", "\n".join(parts), refresh=going)


def render_history(dag_id: str, runs: Sequence[RunSummary]) -> str:
    """Recent runs of a DAG with their counts, failures and estimated cost."""
    rows = []
    for run in runs:
        counts = run.counts or {}
        cost = money(run.cost.get("total"), run.cost.get("currency", "")) if run.cost else "-"
        rows.append(
            f"<tr><td><a href='{_e(run_path(run.run_id))}'>{_e(run.run_id)}</a></td><td>{_state(run.state)}</td>"
            f"<td>{_e(run.started)}</td>"
            f"<td class='num'>{sum(counts.values()) if run.counts is not None else '-'}</td>"
            f"<td class='num'>{counts.get('ok', '-') if run.counts is not None else '-'}</td>"
            f"<td class='num'>{counts.get('failed', 0) if run.counts is not None else '-'}</td>"
            f"<td class='num'>{counts.get('skipped', 0) if run.counts is not None else '-'}</td>"
            f"<td class='num'>{cost}</td></tr>"
        )
    table = (
        "<table id='runs'><tr><th>run</th><th>state</th><th>started</th><th>files</th><th>ok</th><th>failed</th>"
        "<th>skipped</th><th>estimated cost</th></tr>" + "".join(rows) + "</table>"
        if rows
        else "<p class='muted'>No runs yet.</p>"
    )
    return _page(f"{dag_id}: super-resolution runs", f"<h1>Super-resolution runs of {_e(dag_id)}</h1>{table}")
