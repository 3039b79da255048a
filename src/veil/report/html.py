"""`report.html`: one self-contained page that says what a run trained, by whom, how well, at what
privacy cost and with which protections.

The page holds its charts as inline SVG (`veil.report.svg`) and its style inline: it loads nothing
from anywhere, so it can be mailed to a compliance officer and opened offline. Every value from the
run passes through `html.escape`. The input is `result.json` read as plain JSON (so that a run
whose metrics are NaN or null still gets a report) and, when the run folder holds one, the run
store `veil.db` for the run's configuration.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from veil.atomic import atomic_write_text
from veil.errors import StoreError, UserError
from veil.report.console import BASELINE_NOTE, NEIGHBOURING
from veil.report.curves import (
    epsilon_chart,
    epsilon_series,
    headline,
    metric_charts,
    metric_label,
    round_numbers,
)
from veil.report.svg import CHART_STYLE, bar_chart, finite, unit_curve
from veil.result import RESULT_FILE
from veil.store import DB_NAME, RunStore

REPORT_FILE = "report.html"

_STYLE = (
    """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;
max-width:1180px;padding:16px 24px;color:#1b1f24}
h1{font-size:22px;margin:8px 0}h2{font-size:18px;border-bottom:1px solid #d0d7de;
padding-bottom:4px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #d0d7de;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f6f8fa}td.n{text-align:right;
font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600}
.warn{background:#fff1e5;color:#953800;border:1px solid #ffb77c}
.ok{background:#dafbe1;color:#116329;border:1px solid #4ac26b}
.bad{background:#ffebe9;color:#a40e26;border:1px solid #ff8182}
dl.answers dt{font-weight:600;margin-top:6px}dl.answers dd{margin-left:16px}
pre{background:#f6f8fa;padding:8px;overflow:auto}
section{overflow-x:auto}td{overflow-wrap:break-word}
code.hash{font-size:12px}
"""
    + CHART_STYLE
)


def write_report(run_dir: str | Path) -> Path:
    """Write `RUN_DIR/report.html` from `RUN_DIR/result.json` (and `veil.db` if present).

    Returns the path written. Raises `UserError` when the folder holds no readable result.json.
    """
    run_dir = Path(run_dir)
    result_path = run_dir / RESULT_FILE
    if not result_path.is_file():
        raise UserError(
            f"no {RESULT_FILE} in '{run_dir}': pass the folder of a finished run "
            "(the --out folder of `veil run`)"
        )
    try:
        result = json.loads(result_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read '{result_path}' ({exc}); re-run the federation") from None
    if not isinstance(result, dict):
        raise UserError(f"'{result_path}' is not a Veil result (expected a JSON object)")
    config, status = _stored_config(run_dir, str(result.get("run_id", "")))
    path = run_dir / REPORT_FILE
    atomic_write_text(path, render_report(result, config=config, status=status))
    return path


def _stored_config(run_dir: Path, run_id: str) -> tuple[dict[str, Any] | None, str | None]:
    if not (run_dir / DB_NAME).is_file() or not run_id:
        return None, None
    try:
        with RunStore.locate(run_dir) as store:
            summary, config, _ = store.get_run(run_id)
    except StoreError:
        return None, None
    return config, summary.status


def render_report(
    result: Mapping[str, Any],
    *,
    config: Mapping[str, Any] | None = None,
    status: str | None = None,
) -> str:
    """The HTML text of the report of one run (`result` as read from result.json)."""
    rounds = [r for r in _list(result.get("rounds")) if isinstance(r, dict)]
    privacy = _dict(result.get("privacy"))
    name = str(result.get("name") or "unnamed run")
    sections = [
        _header(result, name, status),
        _answers(result, rounds, privacy, config),
        _data(result),
        _performance(result, rounds),
        _classification(_dict(result.get("classification"))),
        _language_model(_dict(result.get("language_model")), _dict(result.get("final"))),
        _privacy_budget(rounds, privacy),
        _participation(result, rounds, privacy),
        _communication(result, rounds),
        _privacy_record(privacy, rounds),
        _audit(_dict(result.get("audit"))),
        _configuration(config, result),
        _rounds_table(rounds),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Veil report: {escape(name)}</title><style>{_STYLE}</style></head><body>"
        + "".join(sections)
        + "<p><small>Written by Veil from result.json; this page loads nothing from the "
        "network.</small></p></body></html>\n"
    )


# ---------------------------------------------------------------------------------------------
# small helpers


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _num(value: Any, digits: int = 4) -> str:
    v = finite(value)
    if v is None:
        return "n/a" if value is None or isinstance(value, float) else escape(str(value))
    return f"{v:.{digits}g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.{digits}f}"


def _size(n: Any) -> str:
    v = finite(n)
    if v is None:
        return "n/a"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if v >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{int(v)} B"


def _text(value: Any) -> str:
    if isinstance(value, float):
        return _num(value)
    if isinstance(value, dict | list):
        return escape(json.dumps(value, sort_keys=True, default=str))
    return escape(str(value))


def _table(rows: Iterable[tuple[str, str]]) -> str:
    """Two-column table; the values are HTML already (escaped by the caller)."""
    body = "".join(f"<tr><th>{escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _grid(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{c}</td>' if i >= numeric_from else f"<td>{c}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>{body}</section>'


def _aggregation_note(aggregation: str) -> str:
    return {
        "plain": "plain: the server sees every organisation's update",
        "secagg": "secure aggregation (masking): the server sees only the sum of the updates",
        "ckks": "CKKS homomorphic encryption: the server adds encrypted updates it cannot read",
        "tee": "trusted execution environment: updates are opened only inside an attested enclave",
    }.get(aggregation, aggregation)


# ---------------------------------------------------------------------------------------------
# sections


def _header(result: Mapping[str, Any], name: str, status: str | None) -> str:
    dataset = _dict(result.get("dataset"))
    synthetic = bool(dataset.get("synthetic"))
    badge = (
        ' <span class="badge warn">SYNTHETIC DATA</span>'
        if synthetic
        else ' <span class="badge ok">real data</span>'
        if dataset
        else ""
    )
    rows = [
        ("run id", escape(str(result.get("run_id", "")))),
        ("mode", escape(str(result.get("mode", "")))),
        ("data set", escape(str(dataset.get("name", "unknown"))) + badge),
        ("status", escape(status) if status else "finished (result.json written)"),
        ("duration", f"{_num(_dict(result.get('timing')).get('total_s'), 3)} s"),
    ]
    return f"<header><h1>Veil run report: {escape(name)}</h1>{_table(rows)}</header>"


def _answers(
    result: Mapping[str, Any],
    rounds: Sequence[dict[str, Any]],
    privacy: Mapping[str, Any],
    config: Mapping[str, Any] | None,
) -> str:
    dataset = _dict(result.get("dataset"))
    model = _dict(_dict(config).get("model"))
    model_name = f"The {model.get('name')} model" if model.get("name") else "A model"
    strategy = str(result.get("strategy") or "federated averaging")
    what = (
        f"{escape(model_name)} trained with {escape(strategy)}"
        f" on {escape(str(dataset.get('name', 'unknown data')))}"
        f"{' (SYNTHETIC data)' if dataset.get('synthetic') else ''}"
        f" over {len(rounds)} rounds"
    )
    names = _client_names(result, rounds, privacy)
    who = f"{_text(result.get('clients', len(names)))} organisations"
    if names:
        shown = ", ".join(escape(n) for n in names[:12])
        who += f": {shown}{', ...' if len(names) > 12 else ''}"
    final = _dict(result.get("final"))
    how = ", ".join(f"{escape(metric_label(k))} {_num(v)}" for k, v in final.items())
    how = how or "no final metrics"
    baseline = _dict(result.get("centralized_baseline"))
    pooled = headline(baseline)
    if pooled is not None:
        note = f"; {BASELINE_NOTE}" if baseline.get("outside_guarantee") else ""
        how += f" (pooled-data baseline: {escape(metric_label(pooled[0]))} {_num(pooled[1])}{note})"
    eps, delta = privacy.get("epsilon"), privacy.get("delta")
    if finite(eps) is not None:
        unit = "record of an organisation" if privacy.get("unit") == "record" else "organisation"
        cost = f"(ε = {_num(eps, 3)}, δ = {_num(delta, 3)})-differential privacy per {unit}"
        target = _dict(privacy.get("target"))
        if target:
            cost += f", budget ε ≤ {_num(target.get('epsilon'), 3)}"
    else:
        cost = "no differential privacy: the model carries no formal privacy guarantee"
    protections = [_aggregation_note(str(privacy.get("aggregation", "plain")))]
    if result.get("mode") == "deployment":
        protections.append("mutual TLS between separate processes, signed uploads")
    if privacy.get("attestation"):
        protections.append(f"attestation: {_text(privacy.get('attestation'))}")
    answers = [
        ("What was trained?", what),
        ("By whom?", who),
        ("How well?", how),
        ("At what privacy cost?", cost),
        ("With which protections?", "; ".join(escape(p) for p in protections)),
    ]
    body = "".join(f"<dt>{escape(q)}</dt><dd>{a}</dd>" for q, a in answers)
    return _section("summary", "Summary", f'<dl class="answers">{body}</dl>')


def _client_names(
    result: Mapping[str, Any], rounds: Sequence[dict[str, Any]], privacy: Mapping[str, Any]
) -> list[str]:
    organisations = _list(_dict(result.get("data")).get("organisations"))
    organisations = organisations or _list(privacy.get("per_organisation"))
    names = [str(_dict(o).get("name")) for o in organisations]
    for r in rounds:
        for f in _list(r.get("failures")):
            client = str(_dict(f).get("client", ""))
            if client and client not in names:
                names.append(client)
    listed = _list(result.get("client_names"))
    return [str(n) for n in listed] if listed else names


def _short_hash(value: Any) -> str:
    """A hash as ``sha256:0123456789ab…`` with the full value in its tooltip."""
    full = str(value)
    digest = full.split(":", 1)[-1]
    shown = full if len(digest) <= 16 else f"{full[: len(full) - len(digest) + 12]}…"
    return f'<code class="hash" title="{escape(full)}">{escape(shown)}</code>'


def _file(name: Any) -> str:
    return f"<code>{escape(str(name))}</code>" if name else "-"


def _data(result: Mapping[str, Any]) -> str:
    """What the run trained on: the data set, the data contract's hash, each organisation's
    rows and file, and the test set (from result.json's `data`). A result.json written before
    `data` existed gets what its `dataset` and `clients` say; one with neither, nothing."""
    data = _dict(result.get("data"))
    if not data:
        return _data_fallback(result)
    synthetic = ' <span class="badge warn">SYNTHETIC DATA</span>' if data.get("synthetic") else ""
    rows = [
        ("data set", escape(str(data.get("dataset", "unknown"))) + synthetic),
        ("task", _text(data.get("task", "classification"))),
    ]
    if data.get("schema_hash"):
        contract = _short_hash(data["schema_hash"])
        if data.get("schema_file"):
            contract = f"{_file(data['schema_file'])}, {contract}"
        rows.append(("data contract (schema)", contract))
    else:
        rows.append(("data contract (schema)", "none: no schema was declared"))
    test_rows = data.get("test_rows")
    test = f"{_text(test_rows)} rows" if test_rows else "none"
    if data.get("test_file"):
        test += f" from {_file(data['test_file'])}"
    rows.append(("held-out test set", test))
    organisations = [_dict(o) for o in _list(data.get("organisations"))]
    body = _table(rows)
    if organisations:
        totals = [
            sum(int(finite(o.get(k)) or 0) for o in organisations)
            for k in ("rows", "validation_rows")
        ]
        body += "<h3>Organisations</h3>" + _grid(
            ["organisation", "file", "training rows", "validation rows"],
            [
                (
                    escape(str(o.get("name", "?"))),
                    _file(o.get("file")),
                    _text(o.get("rows")),
                    _text(o.get("validation_rows", 0)),
                )
                for o in organisations
            ]
            + [("all organisations", "", str(totals[0]), str(totals[1]))],
            numeric_from=2,
        )
    return _section("data", "Data", body)


def _data_fallback(result: Mapping[str, Any]) -> str:
    dataset = _dict(result.get("dataset"))
    if not dataset and not result.get("clients"):
        return ""
    rows = [
        ("data set", escape(str(dataset.get("name", "unknown")))),
        ("organisations", _text(result.get("clients", "unknown"))),
    ]
    note = (
        "<p>This result.json predates the data record: row counts, files and the data "
        "contract's hash were not recorded.</p>"
    )
    return _section("data", "Data", _table(rows) + note)


def _performance(result: Mapping[str, Any], rounds: Sequence[dict[str, Any]]) -> str:
    charts = metric_charts(rounds)
    final = _dict(result.get("final"))
    rows = [(f"final {metric_label(k)}", _num(v)) for k, v in final.items()]
    baseline = _dict(result.get("centralized_baseline"))
    outside = f" ({BASELINE_NOTE})" if baseline.get("outside_guarantee") else ""
    rows += [
        (
            f"linear probe of the frozen encoder, {k.removeprefix('linear_probe_')}"
            if k.startswith("linear_probe_")
            else f"pooled-data baseline {metric_label(k)}",
            _num(v) + outside,
        )
        for k, v in baseline.items()
        if k != "outside_guarantee"
    ]
    body = f'<div class="charts">{"".join(charts)}</div>{_table(rows)}'
    return _section("performance", "Model quality and loss", body)


def _language_model(section: Mapping[str, Any], final: Mapping[str, Any]) -> str:
    """A causal LM's run: the base model's perplexity and token accuracy beside the final
    model's, and the final model's greedy answers to fixed prompts; nothing for other runs."""
    if not section:
        return ""
    base = _dict(section.get("base"))
    rows = [
        (
            name,
            f"{_num(base.get(key))} (base model) → {_num(final.get(key))} (tuned)",
        )
        for name, key in (("perplexity", "perplexity"), ("token accuracy", "token_accuracy"))
    ]
    rows.append(("model", _text(section.get("model_dir"))))
    generations = [_dict(g) for g in _list(section.get("generations"))]
    grid = _grid(
        ["prompt", "greedy output"],
        [(_text(g.get("prompt")), _text(g.get("output"))) for g in generations],
        numeric_from=2,
    )
    note = "<p>Perplexity and token accuracy count the response tokens of the held-out set.</p>"
    return _section("language-model", "Language model", _table(rows) + note + grid)


def _classification(summary: Mapping[str, Any]) -> str:
    """Per-class results, the confusion matrix and (two classes) the ROC and calibration
    curves; nothing for a result.json without a classification section."""
    classes = [_dict(c) for c in _list(summary.get("classes"))]
    if not classes:
        return ""
    names = [str(c.get("name", i)) for i, c in enumerate(classes)]
    per_class = _grid(
        ["class", "precision", "recall", "F1", "support", "AUC (one vs rest)"],
        (
            [escape(n)]
            + [_num(c.get(k)) for k in ("precision", "recall", "f1")]
            + [_text(c.get("support")), _num(c.get("auc"))]
            for n, c in zip(names, classes, strict=True)
        ),
    )
    totals = _table(
        [
            ("macro F1", _num(summary.get("macro_f1"))),
            ("weighted F1", _num(summary.get("weighted_f1"))),
            ("mean one-vs-rest AUC", _num(summary.get("auc_ovr_macro"))),
        ]
    )
    matrix = _list(summary.get("confusion_matrix"))
    confusion = _grid(
        ["true ↓ / predicted →", *names],
        (
            [escape(n), *(_text(v) for v in _list(row))]
            for n, row in zip(names, matrix, strict=False)
        ),
    )
    body = (
        "<p>The final model on the server's held-out test set.</p>"
        f"{totals}{per_class}<h3>Confusion matrix</h3>"
        "<p>Rows are the true class, columns the predicted class.</p>"
        f'<div class="confusion">{confusion}</div>'
    )
    roc = [_dict(p) for p in _list(summary.get("roc"))]
    calibration = [_dict(b) for b in _list(summary.get("calibration"))]
    charts = []
    if roc:
        charts.append(
            unit_curve(
                {"ROC": [(p.get("fpr"), p.get("tpr")) for p in roc]},
                title="ROC curve (held-out test set)",
                x_label="false positive rate",
                y_label="true positive rate",
                diagonal="chance",
            )
        )
    if calibration:
        charts.append(
            unit_curve(
                {"model": [(b.get("predicted"), b.get("observed")) for b in calibration]},
                title="Calibration (reliability) curve",
                x_label="mean predicted probability",
                y_label="fraction positive",
                diagonal="perfect calibration",
            )
        )
    if charts:
        body += f'<div class="charts">{"".join(charts)}</div>'
    return _section("classification", "Results per class", body)


def _privacy_budget(rounds: Sequence[dict[str, Any]], privacy: Mapping[str, Any]) -> str:
    target = finite(_dict(privacy.get("target")).get("epsilon"))
    chart = epsilon_chart(rounds, target)
    if chart is None:
        return _section(
            "budget",
            "Privacy budget",
            "<p>No differential privacy in this run: no ε is spent and none is promised.</p>",
        )
    spent = epsilon_series(rounds)
    last = next((e for _, e in reversed(spent) if e is not None), None)
    note = ""
    if last is not None and target is not None:
        share = last / target if target > 0 else math.inf
        cls = "bad" if last > target * (1 + 1e-9) else "ok"
        note = (
            f'<p><span class="badge {cls}">ε = {_num(last, 3)} of {_num(target, 3)} '
            f"({share:.0%} of the budget)</span></p>"
        )
    return _section("budget", "Privacy budget", f'<div class="charts">{chart}</div>{note}')


def _participation(
    result: Mapping[str, Any], rounds: Sequence[dict[str, Any]], privacy: Mapping[str, Any]
) -> str:
    xs = round_numbers(rounds)
    chart = bar_chart(
        xs,
        {
            "aggregated": [finite(r.get("clients")) for r in rounds],
            "dropped": [finite(r.get("dropped")) for r in rounds],
        },
        title="Organisations per round",
        y_label="organisations",
    )
    failed: dict[str, list[str]] = {}
    kinds: dict[str, int] = {}
    for r in rounds:
        for f in _list(r.get("failures")):
            f = _dict(f)
            failed.setdefault(str(f.get("client", "?")), []).append(
                f"round {_text(r.get('round'))}: {_text(f.get('reason', ''))}"
            )
        for kind, count in _dict(r.get("failure_counts")).items():
            kinds[str(kind)] = kinds.get(str(kind), 0) + int(finite(count) or 0)
    names = _client_names(result, rounds, privacy)
    per_client = [
        (escape(n), str(len(rounds) - len(failed.get(n, []))), str(len(failed.get(n, []))))
        for n in names
    ]
    body = f'<div class="charts">{chart}</div>'
    total_selected = sum(int(finite(r.get("selected")) or 0) for r in rounds)
    total_dropped = sum(int(finite(r.get("dropped")) or 0) for r in rounds)
    body += _table(
        [
            ("organisations", _text(result.get("clients", len(names)))),
            ("selections over all rounds", str(total_selected)),
            ("dropouts over all rounds", str(total_dropped)),
        ]
    )
    if per_client:
        body += "<h3>Per organisation</h3>" + _grid(
            ["organisation", "rounds without a recorded failure", "recorded failures"],
            per_client,
        )
    if kinds:
        body += "<h3>Dropouts by reason</h3>" + _grid(
            ["reason", "count"], [(escape(k), str(v)) for k, v in sorted(kinds.items())]
        )
    if failed:
        body += (
            "<h3>Recorded failures</h3><ul>"
            + "".join(
                f"<li>{escape(c)}: {'; '.join(msgs)}</li>" for c, msgs in sorted(failed.items())
            )
            + "</ul>"
        )
    reported = [(r.get("round"), _dict(r.get("aggregation"))) for r in rounds]
    reported = [(n, a) for n, a in reported if a]
    if reported:
        keys = sorted({k for _, a in reported for k in a})
        body += "<h3>What the aggregator reported</h3>" + _grid(
            ["round", *keys],
            [(_text(n), *(_text(a.get(k, "")) for k in keys)) for n, a in reported],
        )
    return _section("participation", "Participation and dropouts", body)


def _communication(result: Mapping[str, Any], rounds: Sequence[dict[str, Any]]) -> str:
    chart = bar_chart(
        round_numbers(rounds),
        {
            "upload (kB)": [(finite(r.get("bytes_up")) or 0) / 1e3 for r in rounds],
            "download (kB)": [(finite(r.get("bytes_down")) or 0) / 1e3 for r in rounds],
        },
        title="Communication per round",
        y_label="kB",
    )
    total = _dict(result.get("communication"))
    rows = [
        ("uploaded in total", _size(total.get("bytes_up"))),
        ("downloaded in total", _size(total.get("bytes_down"))),
    ]
    per_client, fraction = (
        total.get("update_bytes_per_client"),
        total.get("update_fraction_of_model"),
    )
    if isinstance(per_client, int) and isinstance(fraction, float):
        rows.append(
            (
                "one client's upload per round",
                f"{_size(per_client)}: {fraction:.3%} of the model in float32 "
                f"({total.get('trainable_parameters')} of {total.get('model_parameters')} "
                f"parameters train; compression {total.get('compression', 'none')})",
            )
        )
    return _section(
        "communication", "Communication", f'<div class="charts">{chart}</div>{_table(rows)}'
    )


def _privacy_record(privacy: Mapping[str, Any], rounds: Sequence[dict[str, Any]]) -> str:
    eps = finite(privacy.get("epsilon"))
    unit = privacy.get("unit")
    rows: list[tuple[str, str]] = [
        (
            "guarantee",
            (
                f"(ε = {_num(eps, 4)}, δ = {_num(privacy.get('delta'), 3)})-DP for "
                + ("one record of one organisation" if unit == "record" else "one organisation")
            )
            if eps is not None
            else "none: no differential privacy",
        ),
        ("unit", _text(unit) if unit else "n/a"),
        ("ε", _num(privacy.get("epsilon"), 4)),
        ("δ", _num(privacy.get("delta"), 3)),
        ("accountant", _text(privacy.get("accountant") or "n/a")),
    ]
    if "neighbouring" in privacy:
        relation = privacy["neighbouring"]
        rows.append(("neighbouring relation", _text(NEIGHBOURING.get(str(relation), relation))))
    if finite(privacy.get("epsilon_rdp")) is not None:
        rows.append(("RDP cross-check ε", _num(privacy["epsilon_rdp"], 4)))
    target = _dict(privacy.get("target"))
    if target:
        budget = f"ε ≤ {_num(target.get('epsilon'), 3)}, δ = {_text(target.get('delta'))}"
        rows.append(("target", budget))
    mechanism = _dict(privacy.get("mechanism"))
    if mechanism:
        rows.append(
            (
                "mechanism",
                f"σ = {_num(mechanism.get('noise_multiplier'), 4)}, "
                f"C = {_num(mechanism.get('clip_norm'), 4)}, "
                f"q = {_num(mechanism.get('sampling_rate'), 4)}, "
                f"steps = {_text(mechanism.get('steps'))}"
                + (f"; noise: {_text(mechanism['noise'])}" if "noise" in mechanism else ""),
            )
        )
    aggregation = str(privacy.get("aggregation", "plain"))
    rows.append(("aggregation", escape(_aggregation_note(aggregation))))
    secure = _dict(privacy.get("secure_aggregation"))
    if secure:
        recovered = sum(
            int(finite(_dict(r.get("aggregation")).get("recovered_dropouts")) or 0) for r in rounds
        )
        clipped = sum(int(finite(_dict(r.get("aggregation")).get("clipped")) or 0) for r in rounds)
        detail = ", ".join(f"{escape(k)}: {_text(v)}" for k, v in secure.items())
        rows.append(
            (
                "secure aggregation",
                f"{detail}; {recovered} dropouts recovered, {clipped} values clipped",
            )
        )
    he = _dict(privacy.get("homomorphic_encryption"))
    if he:
        rows.append(
            ("homomorphic encryption", ", ".join(f"{escape(k)}: {_text(v)}" for k, v in he.items()))
        )
    rows.append(("attestation", _text(privacy.get("attestation") or "none")))
    body = _table(rows)
    organisations = [_dict(o) for o in _list(privacy.get("per_organisation"))]
    if organisations:
        body += "<h3>Per organisation</h3>" + _grid(
            ["organisation", "ε", "σ", "q", "steps", "examples"],
            [
                (
                    _text(o.get("name")),
                    _num(o.get("epsilon"), 4),
                    _num(_dict(o.get("mechanism")).get("noise_multiplier"), 4),
                    _num(_dict(o.get("mechanism")).get("sampling_rate"), 4),
                    _text(_dict(o.get("mechanism")).get("steps")),
                    _text(o.get("examples", "")),
                )
                for o in organisations
            ],
        )
    return _section("privacy", "Privacy record", body)


def _audit(audit: Mapping[str, Any]) -> str:
    if not audit:
        return _section(
            "audit",
            "Privacy audit",
            "<p>Not audited. <code>veil audit RUN_DIR</code> measures an empirical ε lower bound "
            "(canaries), membership inference and gradient inversion against this run.</p>",
        )
    eps, lower = finite(audit.get("epsilon")), finite(audit.get("epsilon_lower"))
    rows = [
        (
            "accountant (upper bound)",
            f"ε = {_num(eps, 3)}, δ = {_num(audit.get('delta'), 3)}" if eps is not None else "none",
        )
    ]
    canaries = _dict(audit.get("canaries"))
    if lower is not None:
        best = _dict(canaries.get("best"))
        confidence = finite(audit.get("confidence")) or 0.0
        rows.append(
            (
                "empirical lower bound (canaries)",
                f"ε ≥ {_num(lower, 3)} at {confidence:.0%} confidence "
                f"({_text(best.get('correct'))} of {_text(best.get('guesses'))} "
                f"{_text(best.get('kind'))}-canary guesses right)",
            )
        )
    elif canaries.get("skipped"):
        rows.append(("canaries", f"skipped: {_text(canaries['skipped'])}"))
    if audit.get("exceeds_epsilon"):
        verdict = (
            '<span class="badge bad">the measured lower bound exceeds the accountant\'s ε: the '
            "run does not deliver its claimed guarantee</span>"
        )
    elif lower is not None and eps is not None:
        verdict = (
            '<span class="badge ok">consistent: the lower bound stays below the accountant\'s '
            "ε</span>"
        )
    elif lower is not None:
        verdict = f"no differential privacy: the run leaks at least ε = {_num(lower, 3)}"
    else:
        verdict = "no lower bound measured"
    rows.append(("verdict", verdict))
    for name, m in _dict(audit.get("membership")).items():
        m = _dict(m)
        rows.append(
            (
                f"membership inference: {name}",
                f"AUC {_num(m.get('auc'), 3)}, TPR {_num(m.get('tpr_at_1_percent_fpr'), 3)} "
                "at 1% FPR",
            )
        )
    inversion = _dict(audit.get("inversion"))
    if inversion:
        rows.append(
            (
                f"gradient inversion: {_text(inversion.get('attack', ''))}",
                ", ".join(
                    f"{escape(k)}: {_text(v)}"
                    for k, v in inversion.items()
                    if k in ("server_sees", "ssim", "relative_error", "client", "client_records")
                ),
            )
        )
    return _section("audit", "Privacy audit", _table(rows))


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        out: list[tuple[str, Any]] = []
        for k, v in value.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return [(prefix, value)]


def _configuration(config: Mapping[str, Any] | None, result: Mapping[str, Any]) -> str:
    if config is None:
        rows = [
            (k, _text(result.get(k)))
            for k in ("mode", "strategy", "clients", "pipeline", "dataset")
            if k in result
        ]
        note = "<p>No run store next to result.json; what result.json records:</p>"
        return _section("configuration", "Configuration", note + _table(rows))
    rows = [
        (k, escape(f"{v:g}") if isinstance(v, float) else _text(v))
        for k, v in _flatten(dict(config))
        if v is not None
    ]
    return _section("configuration", "Configuration", _table(rows))


def _rounds_table(rounds: Sequence[dict[str, Any]]) -> str:
    keys = sorted({k for r in rounds for k in _dict(r.get("metrics"))})
    headers = ["round", "aggregated", "dropped", *keys, "ε", "kB up", "kB down", "s"]
    rows = [
        (
            _text(r.get("round")),
            _text(r.get("clients")),
            _text(r.get("dropped")),
            *(_num(_dict(r.get("metrics")).get(k)) for k in keys),
            _num(r.get("epsilon"), 3) if r.get("epsilon") is not None else "-",
            _num((finite(r.get("bytes_up")) or 0) / 1e3, 3),
            _num((finite(r.get("bytes_down")) or 0) / 1e3, 3),
            _num(r.get("duration_s"), 3),
        )
        for r in rounds
    ]
    return _section("rounds", "Rounds", _grid(headers, rows))
