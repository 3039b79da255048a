"""Small charts as inline SVG text: no plotting library, no network, nothing to load.

Every label passes through `html.escape`, so a chart is safe to paste into an HTML page whatever
the run called its clients or metrics. Values that are missing, NaN or infinite leave a gap in a
line (and are skipped in the axis range) instead of breaking the chart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape

#: Colours of successive series (colour-blind-safe Okabe–Ito palette).
PALETTE: tuple[str, ...] = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9")

#: The CSS the charts need, for any page that shows them (the report and the dashboard).
CHART_STYLE = """
.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{width:560px;max-width:100%;
border:1px solid #d0d7de;border-radius:6px;background:#fff}
.chart text{font-size:11px;fill:#1b1f24}.chart .t{font-size:13px;font-weight:600}
.chart .ax{stroke:#57606a}.chart .g{stroke:#eaeef2}.chart .ref{stroke:#cf222e;
stroke-dasharray:6 4;stroke-width:1.5}.chart .reft{fill:#cf222e}
.chart .diag{stroke:#8c959f;stroke-dasharray:4 4}.chart .diagt{fill:#57606a}
"""

_W, _H = 560, 260
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 16, 46, 44

Point = tuple[float, float | None]


@dataclass(frozen=True)
class Line:
    """A horizontal reference line, such as the ε budget."""

    value: float
    label: str


def finite(value: object) -> float | None:
    """`value` as a float when it is a finite number, else ``None``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.2g}"
    return f"{v:.4g}"


class _Frame:
    """Maps data coordinates onto the plot area and draws axes with ticks."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float], *, y_zero: bool) -> None:
        self.x0, self.x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
        lo, hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
        if y_zero:
            lo, hi = min(lo, 0.0), max(hi, 0.0)
        if hi == lo:
            lo, hi = lo - 0.5, hi + 0.5
        pad = (hi - lo) * 0.05
        self.y0, self.y1 = (lo if y_zero and lo == 0 else lo - pad), hi + pad
        if self.x1 == self.x0:
            self.x0, self.x1 = self.x0 - 0.5, self.x1 + 0.5

    def x(self, v: float) -> float:
        return _LEFT + (v - self.x0) / (self.x1 - self.x0) * (_W - _LEFT - _RIGHT)

    def y(self, v: float) -> float:
        return _H - _BOTTOM - (v - self.y0) / (self.y1 - self.y0) * (_H - _TOP - _BOTTOM)

    def axes(self, title: str, x_label: str, y_label: str, integer_x: bool) -> list[str]:
        parts = [
            f'<text x="{_W / 2}" y="16" text-anchor="middle" class="t">{escape(title)}</text>',
            f'<line x1="{_LEFT}" y1="{_H - _BOTTOM}" x2="{_W - _RIGHT}" y2="{_H - _BOTTOM}" '
            'class="ax"/>',
            f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{_H - _BOTTOM}" class="ax"/>',
            f'<text x="{_W / 2}" y="{_H - 6}" text-anchor="middle">{escape(x_label)}</text>',
            f'<text transform="translate(14 {_H / 2}) rotate(-90)" text-anchor="middle">'
            f"{escape(y_label)}</text>",
        ]
        for t in _ticks(self.y0, self.y1):
            y = self.y(t)
            parts.append(
                f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_W - _RIGHT}" y2="{y:.1f}" class="g"/>'
                f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>'
            )
        xticks = _ticks(self.x0, self.x1, 8)
        if integer_x:
            xticks = sorted({round(t) for t in xticks if abs(t - round(t)) < 1e-9})
        for t in xticks:
            x = self.x(t)
            parts.append(
                f'<text x="{x:.1f}" y="{_H - _BOTTOM + 16}" text-anchor="middle">{_fmt(t)}</text>'
            )
        return parts


def _svg(parts: list[str], label: str) -> str:
    body = "".join(parts)
    return (
        f'<svg viewBox="0 0 {_W} {_H}" role="img" '
        f'aria-label="{escape(label)}" class="chart">{body}</svg>'
    )


def _legend(names: Sequence[str]) -> list[str]:
    parts, x = [], _LEFT + 8
    for i, name in enumerate(names):
        colour = PALETTE[i % len(PALETTE)]
        parts.append(f'<rect x="{x}" y="24" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{x + 14}" y="33">{escape(name)}</text>')
        x += 24 + 7 * len(name)
    return parts


def line_chart(
    series: Mapping[str, Sequence[Point]],
    *,
    title: str,
    x_label: str = "round",
    y_label: str = "",
    reference: Line | None = None,
    y_zero: bool = False,
) -> str:
    """An SVG line chart of one or more named series of ``(x, y)`` points.

    A point whose ``y`` is ``None``, NaN or infinite breaks the line there. `reference` draws a
    dashed horizontal line with its label (e.g. the ε budget). Returns the ``<svg>`` element.
    """
    clean = {name: [(float(x), finite(y)) for x, y in points] for name, points in series.items()}
    xs = [x for pts in clean.values() for x, _ in pts]
    ys = [y for pts in clean.values() for _, y in pts if y is not None]
    if reference is not None and finite(reference.value) is not None:
        ys.append(reference.value)
    if not ys:
        return _empty(title)
    frame = _Frame(xs, ys, y_zero=y_zero)
    parts = frame.axes(title, x_label, y_label, integer_x=True)
    for i, (name, pts) in enumerate(clean.items()):
        colour = PALETTE[i % len(PALETTE)]
        runs: list[list[tuple[float, float]]] = [[]]
        for x, y in pts:
            if y is None:
                runs.append([])
            else:
                runs[-1].append((frame.x(x), frame.y(y)))
        for run in runs:
            if len(run) > 1:
                path = " ".join(f"{px:.1f},{py:.1f}" for px, py in run)
                parts.append(
                    f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>'
                )
            for px, py in run:
                parts.append(
                    f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2.5" fill="{colour}">'
                    f"<title>{escape(name)}</title></circle>"
                )
    if reference is not None and finite(reference.value) is not None:
        y = frame.y(reference.value)
        parts.append(
            f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_W - _RIGHT}" y2="{y:.1f}" class="ref"/>'
            f'<text x="{_W - _RIGHT - 4}" y="{y - 4:.1f}" text-anchor="end" class="reft">'
            f"{escape(reference.label)}</text>"
        )
    parts += _legend(list(clean))
    return _svg(parts, title)


def bar_chart(
    x: Sequence[float],
    stacks: Mapping[str, Sequence[float | None]],
    *,
    title: str,
    x_label: str = "round",
    y_label: str = "",
) -> str:
    """An SVG stacked bar chart: one bar per ``x``, one coloured segment per named stack.

    Missing or non-finite segment values count as zero. Returns the ``<svg>`` element.
    """
    if not x:
        return _empty(title)
    values = {name: [finite(v) or 0.0 for v in vs] for name, vs in stacks.items()}
    totals = [sum(vs[i] for vs in values.values()) for i in range(len(x))]
    # Half a round of room on either side, so that the outer bars stay inside the axes.
    frame = _Frame([min(x) - 0.5, max(x) + 0.5], [*totals, 0.0], y_zero=True)
    parts = frame.axes(title, x_label, y_label, integer_x=True)
    spacing = (frame.x(frame.x1) - frame.x(frame.x0)) / max(len(x), 1)
    width = max(2.0, min(40.0, spacing * 0.7))
    for i, xv in enumerate(x):
        bottom = 0.0
        for j, (name, vs) in enumerate(values.items()):
            v = vs[i]
            if v <= 0:
                continue
            top_px, bottom_px = frame.y(bottom + v), frame.y(bottom)
            parts.append(
                f'<rect x="{frame.x(xv) - width / 2:.1f}" y="{top_px:.1f}" width="{width:.1f}" '
                f'height="{bottom_px - top_px:.1f}" fill="{PALETTE[j % len(PALETTE)]}">'
                f"<title>{escape(name)}: {_fmt(v)}</title></rect>"
            )
            bottom += v
    parts += _legend(list(values))
    return _svg(parts, title)


def _empty(title: str) -> str:
    return _svg(
        [
            f'<text x="{_W / 2}" y="18" text-anchor="middle" class="t">{escape(title)}</text>',
            f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle">no data</text>',
        ],
        title,
    )


def unit_curve(
    series: Mapping[str, Sequence[tuple[object, object]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    diagonal: str = "",
) -> str:
    """An SVG chart of named curves on the unit square [0, 1] x [0, 1], such as a ROC or a
    calibration curve. A non-empty `diagonal` draws the dashed line y = x with that label (the
    chance line of a ROC curve, perfect calibration). Points with a non-finite coordinate are
    left out. Returns the ``<svg>`` element.
    """
    clean = {
        name: [
            (fx, fy)
            for fx, fy in ((finite(x), finite(y)) for x, y in points)
            if fx is not None and fy is not None
        ]
        for name, points in series.items()
    }
    if not any(clean.values()):
        return _empty(title)
    frame = _Frame([0.0, 1.0], [0.0, 1.0], y_zero=True)
    frame.y0, frame.y1 = 0.0, 1.0
    parts = frame.axes(title, x_label, y_label, integer_x=False)
    if diagonal:
        parts.append(
            f'<line x1="{frame.x(0):.1f}" y1="{frame.y(0):.1f}" x2="{frame.x(1):.1f}" '
            f'y2="{frame.y(1):.1f}" class="diag"/>'
            f'<text x="{frame.x(1) - 4:.1f}" y="{frame.y(1) + 14:.1f}" text-anchor="end" '
            f'class="diagt">{escape(diagonal)}</text>'
        )
    for i, (name, pts) in enumerate(clean.items()):
        colour = PALETTE[i % len(PALETTE)]
        path = " ".join(f"{frame.x(x):.1f},{frame.y(y):.1f}" for x, y in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y in pts:
            parts.append(
                f'<circle cx="{frame.x(x):.1f}" cy="{frame.y(y):.1f}" r="2.5" fill="{colour}">'
                f"<title>{escape(name)}: ({_fmt(x)}, {_fmt(y)})</title></circle>"
            )
    parts += _legend(list(clean))
    return _svg(parts, title)
