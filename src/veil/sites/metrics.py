"""Operations plumbing for long-lived processes: Prometheus metrics and JSON-line logs.

Standard library only. `Metrics` is a thread-safe registry of counters and gauges rendered in
the Prometheus text exposition format 0.0.4; `serve_metrics` serves it at ``GET /metrics``;
`log_event` writes one JSON object per log line, and `configure_json_logging` sends those lines
to stderr (and a file)::

    metrics = Metrics()
    jobs = metrics.counter("jobs", "Jobs accepted.", labels=("submitter",))
    jobs.inc(submitter="alice")          # veil_jobs_total{submitter="alice"} 1
    with serve_metrics(metrics, "127.0.0.1:9464") as server:
        ...
    log_event(log, "job accepted", job="j-1", submitter="alice")
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import logging
import math
import re
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal

from veil.errors import UserError

__all__ = [
    "Counter",
    "Gauge",
    "Metrics",
    "MetricsServer",
    "configure_json_logging",
    "log_event",
    "serve_metrics",
]

#: The Content-Type of the text exposition format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
}


class _Metric:
    """One named metric and its samples, one per set of label values; guarded by the
    registry's lock."""

    kind: Literal["counter", "gauge"]

    def __init__(self, name: str, help: str, labels: tuple[str, ...], lock: threading.Lock) -> None:
        self.name = name
        self.help = help
        self.labels = labels
        self._lock = lock
        self._values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.labels) or len(labels) != len(self.labels):
            expected = ", ".join(self.labels) or "no labels"
            given = ", ".join(sorted(labels)) or "none"
            raise UserError(
                f"metric '{self.name}' takes labels ({expected}), got ({given}); pass exactly "
                "the labels it was registered with"
            )
        return tuple(str(labels[n]) for n in self.labels)

    def _add(self, amount: float, labels: dict[str, str]) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def samples(self) -> list[tuple[tuple[str, ...], float]]:
        """(label values, value) pairs sorted by label values; call with the lock held."""
        return sorted(self._values.items())


class Counter(_Metric):
    """A value that only goes up (exposed with the ``_total`` suffix)."""

    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        """Add `amount` (finite, >= 0) to the sample with these labels; UserError otherwise."""
        if not math.isfinite(amount) or amount < 0:
            raise UserError(
                f"counter '{self.name}' can only go up by a finite amount >= 0, got {amount}; "
                "use a gauge for a value that goes down"
            )
        self._add(float(amount), labels)


class Gauge(_Metric):
    """A value that goes up and down."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        """Set the sample with these labels to `value`."""
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        """Add `amount` (negative to decrease) to the sample with these labels."""
        self._add(float(amount), labels)


class Metrics:
    """Thread-safe registry of counters and gauges, rendered in the Prometheus text exposition
    format 0.0.4.

    Every metric's name is ``NAMESPACE_NAME`` (counters add ``_total``). Registering a name again
    returns the same metric if the kind and labels agree, else UserError.
    """

    def __init__(self, namespace: str = "veil") -> None:
        if namespace and not _METRIC_NAME.fullmatch(namespace):
            raise UserError(
                f"invalid metrics namespace '{namespace}': use letters, digits, '_' and ':', "
                "not starting with a digit"
            )
        self.namespace = namespace
        self._lock = threading.Lock()
        self._metrics: dict[str, _Metric] = {}

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        """The counter `name` (exposed as ``NAMESPACE_NAME_total``), registered if new."""
        if name.endswith("_total"):
            raise UserError(
                f"counter name '{name}' ends in '_total'; give it without, the suffix is added"
            )
        metric = self._register(Counter, name, help, labels)
        assert isinstance(metric, Counter)
        return metric

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Gauge:
        """The gauge `name` (exposed as ``NAMESPACE_NAME``), registered if new."""
        metric = self._register(Gauge, name, help, labels)
        assert isinstance(metric, Gauge)
        return metric

    def _register(
        self, kind: type[_Metric], name: str, help: str, labels: Sequence[str]
    ) -> _Metric:
        full = f"{self.namespace}_{name}" if self.namespace else name
        if not _METRIC_NAME.fullmatch(full):
            raise UserError(
                f"invalid metric name '{name}': use letters, digits, '_' and ':', "
                "not starting with a digit"
            )
        label_names = tuple(labels)
        for label in label_names:
            if not _LABEL_NAME.fullmatch(label) or label.startswith("__"):
                raise UserError(
                    f"invalid label name '{label}' of metric '{name}': use letters, digits "
                    "and '_', not starting with a digit or '__'"
                )
        if len(set(label_names)) != len(label_names):
            raise UserError(f"metric '{name}' lists a label twice: {', '.join(label_names)}")
        exposed = _exposed_name(full, kind.kind)
        with self._lock:
            existing = self._metrics.get(full)
            if existing is not None:
                if type(existing) is kind and existing.labels == label_names:
                    return existing
                raise UserError(
                    f"metric '{name}' is already registered as a {existing.kind} with labels "
                    f"({', '.join(existing.labels)}); register it once, or choose another name"
                )
            for other in self._metrics.values():
                if exposed in (other.name, _exposed_name(other.name, other.kind)):
                    raise UserError(
                        f"metric '{name}' would be exposed as '{exposed}', which {other.kind} "
                        f"'{other.name}' already uses; choose another name"
                    )
            metric = kind(full, help, label_names, self._lock)
            self._metrics[full] = metric
            return metric

    def exposition(self) -> str:
        """Every metric, in registration order: ``# HELP``, ``# TYPE``, then one line per
        sample (sorted by label values, labels in the order registered)."""
        lines: list[str] = []
        with self._lock:
            for metric in self._metrics.values():
                exposed = _exposed_name(metric.name, metric.kind)
                lines.append(f"# HELP {exposed} {_escape_help(metric.help)}")
                lines.append(f"# TYPE {exposed} {metric.kind}")
                for values, value in metric.samples():
                    lines.append(f"{exposed}{_label_text(metric.labels, values)} {_number(value)}")
        return "".join(line + "\n" for line in lines)


def _exposed_name(name: str, kind: str) -> str:
    return f"{name}_total" if kind == "counter" else name


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _label_text(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, escaped, strict=True)) + "}"


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


class _Handler(http.server.BaseHTTPRequestHandler):
    """``GET /metrics`` -> the exposition; anything else 404 (501 for other methods)."""

    server: _Server
    server_version = "veil"
    sys_version = ""
    timeout = 10  # an idle connection does not hold a thread for ever

    def do_GET(self) -> None:  # the name http.server calls
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404, "not found: metrics are at /metrics")
            return
        body = self.server.metrics.exposition().encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Scrapes come every few seconds: never one stderr line each."""


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], metrics: Metrics, family: socket.AddressFamily
    ) -> None:
        self.address_family = family
        self.metrics = metrics
        super().__init__(address, _Handler)


class MetricsServer:
    """A running metrics endpoint (`serve_metrics`); `port` is the one bound. Close it with
    `close` or by leaving its ``with`` block."""

    def __init__(self, server: _Server) -> None:
        self._server = server
        self.port: int = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, name="veil-metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving and release the port; closing twice is harmless."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def serve_metrics(metrics: Metrics, address: str = "127.0.0.1:0") -> MetricsServer:
    """Serve `metrics` at ``http://ADDRESS/metrics`` from a daemon thread; port 0 picks a free
    port (`MetricsServer.port`). ``HOST:PORT``, ``[IPv6]:PORT`` accepted. The default listens on
    loopback only; a wider address is the caller's decision (the metrics are not secret, but
    nothing authenticates the scraper). UserError for a malformed address or one that cannot
    be bound."""
    host, port = _host_port(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        server = _Server((host, port), metrics, family)
    except OSError as exc:
        raise UserError(
            f"cannot serve metrics at '{address}': {exc.strerror or exc}; choose another "
            "address or port"
        ) from None
    return MetricsServer(server)


def _host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdecimal() or int(port) > 65535:
        raise UserError(
            f"invalid metrics address '{address}': give HOST:PORT, e.g. 127.0.0.1:9464 "
            "(port 0 picks a free one)"
        )
    return host, int(port)


def log_event(logger: logging.Logger, event: str, /, **fields: object) -> None:
    """Log one JSON object on one line: ``{"ts": ISO-8601 UTC with milliseconds, "event":
    event, **fields}``, at INFO, or at ``level`` ("WARNING", "ERROR", ... or a `logging` level
    number) when given. Values JSON cannot hold (paths, exceptions, non-finite floats) are
    written as ``str(value)``. UserError for a field named ``ts`` or ``event``, or an unknown
    level."""
    level = _level(fields.pop("level", logging.INFO))
    clash = {"ts", "event"} & set(fields)
    if clash:
        raise UserError(
            f"log field(s) {', '.join(sorted(clash))} would overwrite the record's own; "
            "rename the field"
        )
    if not logger.isEnabledFor(level):
        return
    ts = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    record = {"ts": ts, "event": event, **{k: _jsonable(v) for k, v in fields.items()}}
    logger.log(level, json.dumps(record, ensure_ascii=False, allow_nan=False))


def _level(value: object) -> int:
    if isinstance(value, str) and value.upper() in _LEVELS:
        return _LEVELS[value.upper()]
    if isinstance(value, int) and not isinstance(value, bool) and value in _LEVELS.values():
        return value
    raise UserError(f"unknown log level {value!r}; use one of {', '.join(_LEVELS)}")


def _jsonable(value: object) -> object:
    """`value` with everything JSON cannot hold replaced by its ``str``."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


class _StderrLines(logging.Handler):
    """Writes to whatever `sys.stderr` is at the time (a test's capture, a redirected stream)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def configure_json_logging(path: Path | None = None) -> None:
    """Send the root logger's records, at INFO and above, as bare messages (format
    ``%(message)s``, which `log_event` makes JSON lines) to stderr, and appended to `path` if
    given. Idempotent: a second call adds no second stderr handler (nor one left by
    `veil.deployment.configure_logging`) and no second handler for the same file."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    formatter = logging.Formatter("%(message)s")
    if not any(_writes_stderr(h) for h in root.handlers):
        handler = _StderrLines()
        handler.setFormatter(formatter)
        root.addHandler(handler)
    if path is not None:
        target = Path(path).resolve()
        if not any(
            isinstance(h, logging.FileHandler) and Path(h.baseFilename).resolve() == target
            for h in root.handlers
        ):
            target.parent.mkdir(parents=True, exist_ok=True)
            to_file = logging.FileHandler(target, mode="a", encoding="utf-8")
            to_file.setFormatter(formatter)
            root.addHandler(to_file)


def _writes_stderr(handler: logging.Handler) -> bool:
    if isinstance(handler, _StderrLines):
        return True
    return (
        isinstance(handler, logging.StreamHandler)
        and not isinstance(handler, logging.FileHandler)
        and handler.stream in (sys.stderr, sys.__stderr__)
    )
