"""Inline SVG charts for the run report: small pure functions, data in, an ``<svg>`` string out.

The report must open anywhere (a CI artifact, a laptop offline), so there is no plotting library and
no script: each chart is plain SVG with a ``<title>`` per mark for hover values. Every chart carries
``data-chart`` (its name) and every mark a class (``pt`` points, ``bar`` bars, ``box`` boxes), which
is also what the tests count. All text goes through ``html.escape``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

W, H = 640, 260  # chart size in px
LEFT, RIGHT, TOP, BOTTOM = 56, 150, 28, 36  # plot margins; the legend sits in the right one
CHAR_PX = 6.5  # about the width of one 11px sans-serif character: decides when x labels are slanted
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf")  # matplotlib's tab10, so the report reads like the usual plots
KEPT, REJECTED = "#2ca02c", "#d62728"


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, int) or float(x).is_integer() and abs(x) >= 1:
        return str(int(x))
    return f"{x:.{digits}g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi] (1-2-5 steps)."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


class _Frame:
    """Maps data to pixels and draws the axes, title and legend."""

    def __init__(self, name: str, title: str, x: tuple[float, float], y: tuple[float, float],
                 xlabel: str = "", ylabel: str = "", labels: Sequence[str] = ()):
        self.name, self.title, self.xlabel, self.ylabel = name, title, xlabel, ylabel
        self.x0, self.x1 = x if x[1] > x[0] else (x[0] - 0.5, x[0] + 0.5)
        self.y0, self.y1 = y if y[1] > y[0] else (y[0] - 0.5, y[0] + 0.5)
        # category labels wider than their slot are slanted, and the chart grows to hold them
        longest = max((len(t) for t in labels), default=0) * CHAR_PX
        self.slant = bool(labels) and longest > (W - LEFT - RIGHT) / len(labels) - 4
        self.bottom = BOTTOM + (round(longest * 0.6) if self.slant else 0)
        self.h = H - BOTTOM + self.bottom

    def px(self, x: float) -> float:
        return round(LEFT + (x - self.x0) / (self.x1 - self.x0) * (W - LEFT - RIGHT), 1)

    def py(self, y: float) -> float:
        return round(self.h - self.bottom - (y - self.y0) / (self.y1 - self.y0) * (self.h - TOP - self.bottom), 1)

    def svg(self, body: list[str], legend: Sequence[tuple[str, str]] = (), xticks: bool = True,
            xlabels: Sequence[tuple[float, str]] = ()) -> str:
        out = [f'<svg xmlns="http://www.w3.org/2000/svg" data-chart="{escape(self.name)}" width="{W}" height="{self.h}" '
               f'viewBox="0 0 {W} {self.h}" font-family="sans-serif" font-size="11">',
               f'<text x="{LEFT}" y="16" font-size="13" font-weight="bold">{escape(self.title)}</text>']
        bottom, right = self.h - self.bottom, W - RIGHT
        out.append(f'<line x1="{LEFT}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#333"/>')
        out.append(f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{bottom}" stroke="#333"/>')
        for t in _ticks(self.y0, self.y1):
            y = self.py(t)
            out.append(f'<line x1="{LEFT}" y1="{y}" x2="{right}" y2="{y}" stroke="#eee"/>'
                       f'<text x="{LEFT - 4}" y="{y + 4}" text-anchor="end">{escape(fmt(t))}</text>')
        marks = list(xlabels) or ([(t, fmt(t)) for t in _ticks(self.x0, self.x1)] if xticks else [])
        for t, label in marks:
            x = self.px(t)
            turn = f' text-anchor="end" transform="rotate(-35 {x} {bottom + 12})"' if self.slant else ' text-anchor="middle"'
            out.append(f'<text x="{x}" y="{bottom + 14}"{turn}>{escape(label)}</text>')
        if self.xlabel:
            out.append(f'<text x="{(LEFT + right) / 2}" y="{self.h - 4}" text-anchor="middle">{escape(self.xlabel)}</text>')
        if self.ylabel:
            out.append(f'<text x="12" y="{(TOP + bottom) / 2}" text-anchor="middle" '
                       f'transform="rotate(-90 12 {(TOP + bottom) / 2})">{escape(self.ylabel)}</text>')
        out += body
        for i, (label, color) in enumerate(legend):
            y = TOP + 6 + 16 * i
            out.append(f'<rect x="{right + 12}" y="{y - 8}" width="10" height="10" fill="{color}"/>'
                       f'<text x="{right + 26}" y="{y + 1}">{escape(label)}</text>')
        out.append("</svg>")
        return "\n".join(out)


def empty_chart(name: str, title: str, why: str) -> str:
    """A placeholder with the reason, so a missing part of a run is visible rather than silently absent."""
    return (f'<svg xmlns="http://www.w3.org/2000/svg" data-chart="{escape(name)}" width="{W}" height="60">'
            f'<text x="{LEFT}" y="16" font-size="13" font-weight="bold" font-family="sans-serif">{escape(title)}</text>'
            f'<text x="{LEFT}" y="40" font-family="sans-serif" fill="#777">{escape(why)}</text></svg>')


def line_chart(name: str, title: str, series: dict[str, list[tuple[float, float]]], xlabel: str = "",
               ylabel: str = "", y_range: tuple[float, float] | None = None, dots: bool = True) -> str:
    """One polyline per series (``data-n`` = its point count); a ``pt`` circle per point when ``dots``."""
    series = {k: v for k, v in series.items() if v}
    if not series:
        return empty_chart(name, title, "no data")
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    f = _Frame(name, title, (min(xs), max(xs)), y_range or (min(0.0, min(ys)), max(ys)), xlabel, ylabel)
    body, legend = [], []
    for i, (label, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        legend.append((label, color))
        coords = " ".join(f"{f.px(x)},{f.py(y)}" for x, y in pts)
        body.append(f'<polyline class="series" data-n="{len(pts)}" fill="none" stroke="{color}" stroke-width="1.5" '
                    f'points="{coords}"><title>{escape(label)}</title></polyline>')
        if dots:
            body += [f'<circle class="pt" cx="{f.px(x)}" cy="{f.py(y)}" r="3" fill="{color}">'
                     f'<title>{escape(label)}: {escape(fmt(x))}, {escape(fmt(y))}</title></circle>' for x, y in pts]
    rounds = sorted(set(xs))
    xlabels = [(x, fmt(x)) for x in rounds] if dots and len(rounds) <= 20 else ()
    return f.svg(body, legend, xlabels=xlabels)


def histogram(name: str, title: str, groups: dict[str, list[float]], bins: int = 10, xlabel: str = "") -> str:
    """Share of each group's values per bin, the groups' bars side by side in each bin (one ``bar``
    per group per bin). Few distinct values (a 0/1 verifier) get one bin each instead of a range."""
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        return empty_chart(name, title, "no data")
    values = sorted({float(v) for vs in groups.values() for v in vs})
    if len(values) <= bins:
        edges = None
        labels = [fmt(v) for v in values]
    else:
        lo, hi = values[0], values[-1]
        edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
        labels = [fmt((edges[i] + edges[i + 1]) / 2) for i in range(bins)]
    nbins = len(labels)
    shares: dict[str, list[float]] = {}
    for label, vs in groups.items():
        counts = [0] * nbins
        for v in vs:
            if edges is None:
                j = values.index(float(v))
            else:
                j = min(nbins - 1, int((float(v) - edges[0]) / (edges[-1] - edges[0]) * nbins))
            counts[j] += 1
        shares[label] = [c / len(vs) for c in counts]
    step = max(1, nbins // 10)
    shown = [(j, labels[j]) for j in range(0, nbins, step)]
    f = _Frame(name, title, (-0.5, nbins - 0.5), (0.0, max(max(s) for s in shares.values())), xlabel, "share",
               labels=[t for _, t in shown])
    width = 0.8 / len(shares)
    body, legend = [], []
    for g, (label, share) in enumerate(shares.items()):
        color = COLORS[g % len(COLORS)]
        legend.append((f"{label} (n={len(groups[label])})", color))
        for j, s in enumerate(share):
            x = j - 0.4 + g * width
            body.append(f'<rect class="bar" x="{f.px(x)}" y="{f.py(s)}" width="{round(f.px(x + width) - f.px(x), 1)}" '
                        f'height="{round(f.py(0) - f.py(s), 1)}" fill="{color}"><title>{escape(label)} '
                        f'{escape(labels[j])}: {s:.1%}</title></rect>')
    return f.svg(body, legend, xlabels=shown)


def five_numbers(values: Sequence[float]) -> tuple[float, float, float, float, float]:
    """min, lower quartile, median, upper quartile, max (linear interpolation, numpy's default)."""
    v = sorted(float(x) for x in values)

    def q(p: float) -> float:
        at = p * (len(v) - 1)
        lo = math.floor(at)
        return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (at - lo)

    return v[0], q(0.25), q(0.5), q(0.75), v[-1]


def box_chart(name: str, title: str, boxes: list[tuple[str, str, list[float]]], ylabel: str = "") -> str:
    """Box summaries (min, quartiles, median, max): ``boxes`` = (group, series, values), e.g.
    ("r1", "chosen", lengths); the series of a group stand side by side over its label. One
    ``box`` element per entry with values, coloured by series."""
    boxes = [b for b in boxes if b[2]]
    if not boxes:
        return empty_chart(name, title, "no data")
    groups = list(dict.fromkeys(g for g, _, _ in boxes))
    series = list(dict.fromkeys(s for _, s, _ in boxes))
    stats = [five_numbers(v) for _, _, v in boxes]
    lo_all, hi_all = min(0.0, min(s[0] for s in stats)), max(s[4] for s in stats)
    f = _Frame(name, title, (-0.5, len(groups) - 0.5), (lo_all, hi_all + 0.05 * (hi_all - lo_all or 1)), "", ylabel,
               labels=groups)
    step = 0.8 / len(series)
    body = []
    for (group, s, vals), (lo, q1, med, q3, hi) in zip(boxes, stats):
        color = COLORS[series.index(s) % len(COLORS)]
        centre = groups.index(group) - 0.4 + step * (series.index(s) + 0.5)
        x0, x1, xm = f.px(centre - 0.4 * step), f.px(centre + 0.4 * step), f.px(centre)
        tip = f"{group} {s}: n={len(vals)} min {fmt(lo)} q1 {fmt(q1)} median {fmt(med)} q3 {fmt(q3)} max {fmt(hi)}"
        body.append(f'<g class="box"><title>{escape(tip)}</title>'
                    f'<line x1="{xm}" y1="{f.py(lo)}" x2="{xm}" y2="{f.py(hi)}" stroke="{color}"/>'
                    f'<rect x="{x0}" y="{f.py(q3)}" width="{round(x1 - x0, 1)}" height="{round(f.py(q1) - f.py(q3), 1)}" '
                    f'fill="{color}" fill-opacity="0.35" stroke="{color}"/>'
                    f'<line x1="{x0}" y1="{f.py(med)}" x2="{x1}" y2="{f.py(med)}" stroke="{color}" stroke-width="2"/></g>')
    legend = [(s, COLORS[i % len(COLORS)]) for i, s in enumerate(series)]
    return f.svg(body, legend, xlabels=list(enumerate(groups)))


def kept_bars(name: str, title: str, bars: list[tuple[str, int, int, str]]) -> str:
    """Stacked bars, one ``bar`` group per (label, rows in, rows kept, tooltip detail): kept below,
    the rest (rejected) above, so the bar's height is the rows that came in."""
    if not bars:
        return empty_chart(name, title, "no stage counts")
    top = max(max(i, k) for _, i, k, _ in bars) or 1
    f = _Frame(name, title, (-0.5, len(bars) - 0.5), (0.0, float(top)), "", "rows", labels=[b[0] for b in bars])
    body = []
    for j, (label, n_in, kept, detail) in enumerate(bars):
        x, w = f.px(j - 0.35), round(f.px(j + 0.35) - f.px(j - 0.35), 1)
        tip = f"{label}: in {n_in}, kept {kept}, rejected {max(0, n_in - kept)}" + (f" ({detail})" if detail else "")
        body.append(f'<g class="bar"><title>{escape(tip)}</title>'
                    f'<rect x="{x}" y="{f.py(kept)}" width="{w}" height="{round(f.py(0) - f.py(kept), 1)}" fill="{KEPT}"/>'
                    f'<rect x="{x}" y="{f.py(max(n_in, kept))}" width="{w}" '
                    f'height="{round(f.py(kept) - f.py(max(n_in, kept)), 1)}" fill="{REJECTED}"/></g>')
    return f.svg(body, [("kept", KEPT), ("rejected", REJECTED)], xlabels=[(j, b[0]) for j, b in enumerate(bars)])
