"""`veil dashboard`: a read-only local web page of the runs in one or more run stores, live.

A standard-library HTTP server (bound to 127.0.0.1 by default) answers three GET requests:

- ``/``: one HTML page with a few lines of JavaScript that polls the two endpoints below;
- ``/api/runs``: the runs, newest first (id, name, mode, status, rounds, final metrics and
  the one that sums the run up, e.g. accuracy or R²);
- ``/api/runs/RUN_ID``: one run's progress: each round's participants, dropouts, metrics, ε
  and traffic, a short, fixed set of configuration facts (the privacy budget, the number of
  organisations and rounds, the aggregation), and the report's charts of quality, error, loss
  and ε per round as SVG text (drawn by `veil.report.curves`, the report's own code).

The run store (`veil.db`) is committed after every round, so a running federation shows up
round by round, and the stores are looked for again on every request: the dashboard starts on
an empty or not yet existing folder and shows runs as they appear in it. Nothing here writes,
and nothing here shows raw data, file paths, keys or failure messages: only what `result.json`
would publish anyway. Every other method is 405.
"""

from __future__ import annotations

import json
import math
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from veil.errors import StoreError
from veil.report.curves import epsilon_chart, headline, metric_charts, metric_label
from veil.report.svg import CHART_STYLE
from veil.store import RunStore, find_stores

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765

_RUN_PATH = re.compile(r"^/api/runs/([A-Za-z0-9_.\-]{1,128})$")


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


_SQLITE_HEADER = b"SQLite format 3\x00"


def _headline(metrics: Any) -> dict[str, Any] | None:
    found = headline(metrics) if isinstance(metrics, dict) else None
    if found is None:
        return None
    return {"key": found[0], "label": metric_label(found[0]), "value": found[1]}


class RunSource:
    """Reads runs from the stores found at `where`, looked for again on every request: `where`
    may be empty or not exist yet, and run folders created after the dashboard started appear.

    Raises `StoreError` at once only when `where` is a file that is not a SQLite database."""

    def __init__(self, where: str | Path) -> None:
        self.where = Path(where)
        if self.where.is_file():
            with self.where.open("rb") as f:
                if f.read(len(_SQLITE_HEADER)) != _SQLITE_HEADER:
                    raise StoreError(
                        f"'{self.where}' is not a Veil run store: pass a run folder, a folder "
                        "of run folders, or a veil.db file"
                    )

    def stores(self) -> list[Path]:
        """The run stores at `where` now (none yet is not an error)."""
        try:
            return find_stores(self.where)
        except StoreError:
            return []

    def runs(self) -> list[dict[str, Any]]:
        """Every run, newest first (an empty list while `where` holds none)."""
        found: list[dict[str, Any]] = []
        for db in self.stores():
            with RunStore.locate(db) as store:
                for s in store.list_runs():
                    found.append(
                        {
                            "run_id": s.run_id,
                            "name": s.name,
                            "mode": s.mode,
                            "status": s.status,
                            "started_at": s.started_at,
                            "finished_at": s.finished_at,
                            "rounds": s.rounds,
                            "final": s.final,
                            "headline": _headline(s.final),
                        }
                    )
        found.sort(key=lambda r: (r["started_at"], r["run_id"]), reverse=True)
        return _clean(found)  # type: ignore[no-any-return]

    def run(self, run_id: str) -> dict[str, Any] | None:
        """One run's progress with its charts, or ``None`` if no store holds it."""
        for db in self.stores():
            with RunStore.locate(db) as store:
                try:
                    summary, config, rounds = store.get_run(run_id)
                except StoreError:
                    continue
            return _clean(  # type: ignore[no-any-return]
                {
                    "run_id": summary.run_id,
                    "name": summary.name,
                    "mode": summary.mode,
                    "status": summary.status,
                    "started_at": summary.started_at,
                    "finished_at": summary.finished_at,
                    "final": summary.final,
                    "facts": _facts(config),
                    "rounds": [_round(r) for r in rounds],
                    "headline": _headline(rounds[-1]["metrics"] if rounds else summary.final),
                    "charts": _charts(rounds, config),
                }
            )
        return None


def _facts(config: dict[str, Any]) -> dict[str, Any]:
    """The few configuration facts the page shows; nothing else of the config leaves."""
    federation = config.get("federation") or {}
    privacy = config.get("privacy") or {}
    data = config.get("data") or {}
    return {
        "organisations": federation.get("clients"),
        "rounds": federation.get("rounds"),
        "aggregation": config.get("secure_aggregation", "plain"),
        "dataset": data.get("dataset"),
        "unit": privacy.get("unit"),
        "epsilon_budget": privacy.get("epsilon"),
        "delta": privacy.get("delta"),
    }


def _charts(rounds: list[dict[str, Any]], config: dict[str, Any]) -> list[str]:
    """The report's per-round charts (quality, error, loss, and ε where the run has DP)."""
    charts = metric_charts(rounds)
    budget = (config.get("privacy") or {}).get("epsilon")
    eps = epsilon_chart(rounds, budget)
    return charts if eps is None else [*charts, eps]


def _round(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "round": r["round"],
        "clients": r["clients"],
        "dropped": r["dropped"],
        "selected": r["selected"],
        "applied": r["applied"],
        "metrics": r["metrics"],
        "epsilon": r["epsilon"],
        "bytes_up": r["bytes_up"],
        "bytes_down": r["bytes_down"],
        "duration_s": r["duration_s"],
        # Counts only: failure messages may name hosts or paths.
        "failures": len(r.get("failures") or []),
    }


class _Handler(BaseHTTPRequestHandler):
    source: RunSource
    server_version = "veil-dashboard"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: one line per poll would drown the terminal

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header(
            "Content-Security-Policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            "connect-src 'self'",
        )
        self.end_headers()
        self.wfile.write(body)

    def _json(self, value: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
        body = json.dumps(value, allow_nan=False).encode()
        self._send(status, body, "application/json")

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/":
                self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
            elif path == "/api/runs":
                self._json({"runs": self.source.runs()})
            elif match := _RUN_PATH.match(path):
                run = self.source.run(match.group(1))
                if run is None:
                    self._json({"error": "no such run"}, HTTPStatus.NOT_FOUND)
                else:
                    self._json(run)
            else:
                self._json({"error": "not found"}, HTTPStatus.NOT_FOUND)
        except StoreError as exc:
            self._json({"error": str(exc)}, HTTPStatus.SERVICE_UNAVAILABLE)

    def _read_only(self) -> None:
        self._json({"error": "the dashboard is read-only"}, HTTPStatus.METHOD_NOT_ALLOWED)

    do_POST = do_PUT = do_DELETE = do_PATCH = _read_only


def make_server(
    where: str | Path, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> ThreadingHTTPServer:
    """A dashboard server for the stores at `where` (not yet serving; port 0 picks a free one).

    `where` may be empty or not exist yet: the page lists runs as they appear. Raises
    `StoreError` when `where` is a file that is not a run store.
    """
    source = RunSource(where)
    handler = type("DashboardHandler", (_Handler,), {"source": source})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    """Serve `server` from a daemon thread (stop it with ``server.shutdown()``)."""
    thread = threading.Thread(target=server.serve_forever, name="veil-dashboard", daemon=True)
    thread.start()
    return thread


def url_of(server: ThreadingHTTPServer) -> str:
    """The page's address, e.g. ``http://127.0.0.1:8765/``."""
    host, port = server.server_address[:2]
    return f"http://{host!s}:{port}/"


_PAGE_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1180px;padding:16px 24px;
color:#1b1f24}h1{font-size:20px}h2{font-size:16px;margin-top:24px}
table{border-collapse:collapse}td,th{border:1px solid #d0d7de;padding:3px 8px;text-align:left}
th{background:#f6f8fa}tr.sel{background:#ddf4ff}tr.run{cursor:pointer}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{border:1px solid #d0d7de;border-radius:6px;
padding:8px 14px;min-width:130px}.card b{display:block;font-size:22px}
.muted{color:#57606a}
"""

#: The page: inline style and script, nothing loaded from elsewhere. The charts arrive as SVG
#: text in `/api/runs/RUN_ID` (every label in them is escaped where they are drawn).
PAGE = (
    """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Veil dashboard</title>
<style>"""
    + _PAGE_STYLE
    + CHART_STYLE
    + """</style></head><body>
<h1>Veil dashboard <span class="muted" id="updated"></span></h1>
<h2>Runs</h2>
<p id="empty" class="muted">No runs yet. This page checks every second and lists each run as
it starts.</p>
<table id="runs"><thead><tr><th>run id</th><th>name</th><th>mode</th><th>status</th>
<th>rounds</th><th>final</th><th>started</th></tr></thead><tbody></tbody></table>
<h2 id="title">No run selected</h2>
<div class="cards">
<div class="card">status<b id="status">-</b></div>
<div class="card">round<b id="round">-</b></div>
<div class="card">organisations in the last round<b id="clients">-</b></div>
<div class="card"><span id="metric-label">accuracy</span><b id="metric">-</b></div>
<div class="card">loss<b id="loss">-</b></div>
<div class="card">&epsilon; spent<b id="epsilon">-</b></div>
</div>
<h2>Curves</h2>
<div class="charts" id="charts"></div>
<h2>Rounds</h2>
<table id="rounds"><thead></thead><tbody></tbody></table>
<script>
"use strict";
let selected = null, drawn = null;
function text(v, d) {
  if (v === null || v === undefined) return "-";
  return typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(d || 4)) : String(v);
}
function headline(h) { return h ? h.label + " " + text(h.value) : "-"; }
function cell(row, value) { const td = document.createElement("td"); td.textContent = value;
  row.appendChild(td); }
async function get(path) { const r = await fetch(path, {cache: "no-store"});
  if (!r.ok) throw new Error(path + ": " + r.status); return r.json(); }
async function refresh() {
  try {
    const runs = (await get("/api/runs")).runs;
    document.getElementById("empty").hidden = runs.length > 0;
    if (!selected && runs.length) {
      const running = runs.find(r => r.status === "running");
      selected = (running || runs[0]).run_id;
    }
    const body = document.querySelector("#runs tbody");
    body.replaceChildren();
    for (const r of runs) {
      const row = document.createElement("tr");
      row.className = "run" + (r.run_id === selected ? " sel" : "");
      row.dataset.run = r.run_id;
      row.onclick = () => { selected = r.run_id; refresh(); };
      for (const v of [r.run_id, r.name, r.mode, r.status, r.rounds,
                       headline(r.headline), r.started_at]) cell(row, text(v));
      body.appendChild(row);
    }
    if (selected) show(await get("/api/runs/" + encodeURIComponent(selected)));
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    document.getElementById("updated").textContent = "(" + e.message + ")";
  }
}
function charts(run) {
  // SVG text drawn and escaped by the server (veil.report.curves); redrawn only on change.
  const svg = run.charts.join("");
  if (svg !== drawn) { document.getElementById("charts").innerHTML = svg; drawn = svg; }
}
function show(run) {
  const f = run.facts, rounds = run.rounds, last = rounds[rounds.length - 1];
  document.getElementById("title").textContent = run.name + " (" + run.run_id + ")";
  document.getElementById("status").textContent = run.status;
  document.getElementById("round").textContent =
    (last ? last.round : 0) + (f.rounds ? " / " + f.rounds : "");
  document.getElementById("clients").textContent =
    last ? last.clients + " of " + (f.organisations || last.selected) : "-";
  const m = last ? last.metrics : {};
  const h = run.headline;
  document.getElementById("metric-label").textContent = h ? h.label : "metric";
  document.getElementById("metric").textContent = text(h ? h.value : null);
  document.getElementById("loss").textContent = text(m.loss);
  const eps = last ? last.epsilon : null;
  document.getElementById("epsilon").textContent = eps === null || eps === undefined
    ? (f.epsilon_budget ? "0 of " + f.epsilon_budget : "no DP")
    : text(eps, 3) + (f.epsilon_budget ? " of " + f.epsilon_budget : "");
  charts(run);
  const keys = [];
  for (const r of rounds) {
    for (const k of Object.keys(r.metrics)) if (!keys.includes(k)) keys.push(k);
  }
  const head = document.querySelector("#rounds thead");
  head.replaceChildren();
  const hr = document.createElement("tr");
  for (const h of ["round", "aggregated", "dropped", ...keys, "\\u03b5", "kB up", "kB down"]) {
    const th = document.createElement("th"); th.textContent = h; hr.appendChild(th); }
  head.appendChild(hr);
  const body = document.querySelector("#rounds tbody");
  body.replaceChildren();
  for (const r of rounds.slice().reverse()) {
    const row = document.createElement("tr");
    for (const v of [r.round, r.clients, r.dropped, ...keys.map(k => text(r.metrics[k])),
                     text(r.epsilon, 3), text(r.bytes_up / 1e3, 1), text(r.bytes_down / 1e3, 1)])
      cell(row, text(v));
    body.appendChild(row);
  }
}
refresh();
setInterval(refresh, 1000);
</script></body></html>
"""
)
