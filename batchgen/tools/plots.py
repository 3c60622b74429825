"""Small inline SVG charts (histogram, bars, points over time) for the HTML report.

Drawn by hand so that the report is one self-contained file with no plotting library and no
script: every chart is an ``<svg>`` element with ``<title>`` tooltips on its marks.
"""

from __future__ import annotations

import math
from html import escape

WIDTH, HEIGHT = 540, 250
LEFT, RIGHT, TOP, BOTTOM = 58, 16, 34, 46
INK, GRID, MUTED = "#1f2933", "#e4e7eb", "#616e7c"
PALETTE = {"stop": "#2f855a", "length": "#dd6b20"}
DEFAULT_FILL = "#3b6ea8"


def nice_step(span: float, target: int) -> float:
    """The 1, 2 or 5 times a power of ten closest above ``span / target`` (at least 1e-9)."""
    raw = max(span / max(target, 1), 1e-9)
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))


def histogram_bins(counts: dict[int, int], max_bins: int = 20) -> tuple[list[int], list[int]]:
    """Bin integer values given as value -> count into at most ``max_bins`` equal integer bins.

    Bin widths are 1, 2 or 5 times a power of ten, and bin edges are multiples of the width,
    so the axis reads in round numbers.

    Args:
        counts: how often each integer value occurs.
        max_bins: the most bins to use.

    Returns:
        ``(edges, counts)``: ``len(edges) == len(counts) + 1``; bin ``i`` holds the values
        ``edges[i] <= v < edges[i + 1]``. Both empty when ``counts`` is.
    """
    if not counts:
        return [], []
    lo, hi = min(counts), max(counts)
    width = max(1, int(nice_step(hi - lo + 1, max_bins)))
    first = lo // width
    binned = [0] * (hi // width - first + 1)
    for value, n in counts.items():
        binned[value // width - first] += n
    return [(first + i) * width for i in range(len(binned) + 1)], binned


def _fmt(v: float) -> str:
    if abs(v) >= 10_000:
        return f"{v / 1000:,.0f}k"
    return f"{v:,.0f}" if float(v).is_integer() or abs(v) >= 100 else f"{v:.3g}"


def _frame(title: str, xlabel: str, ylabel: str, body: list[str]) -> str:
    label = escape(title)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" aria-label="{label}" font-family="system-ui, sans-serif" font-size="11">',
        f'<text x="{LEFT}" y="18" font-size="14" font-weight="600" fill="{INK}">{label}</text>',
        *body,
        f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 8}" text-anchor="middle" '
        f'fill="{MUTED}">{escape(xlabel)}</text>',
        f'<text transform="translate(14 {(TOP + HEIGHT - BOTTOM) / 2}) rotate(-90)" '
        f'text-anchor="middle" fill="{MUTED}">{escape(ylabel)}</text>',
        "</svg>",
    ]
    return "\n".join(parts)


def _empty(title: str, note: str) -> str:
    return _frame(
        title,
        "",
        "",
        [
            f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" '
            f'height="{HEIGHT - TOP - BOTTOM}" fill="#f5f7fa" stroke="{GRID}"/>',
            f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{(TOP + HEIGHT - BOTTOM) / 2}" '
            f'text-anchor="middle" fill="{MUTED}">{escape(note)}</text>',
        ],
    )


def _y_axis(top: float, integer: bool) -> tuple[float, list[str]]:
    """Grid lines and labels from 0 to a round value at or above ``top``; returns that value."""
    # Counts are whole: a tick at 0.5 would be noise.
    step = max(nice_step(top, 4), 1) if integer else nice_step(top, 4)
    y_max = step * math.ceil(top / step) if top > 0 else 1.0
    marks = []
    plot_h = HEIGHT - TOP - BOTTOM
    for i in range(round(y_max / step) + 1):
        v = i * step
        y = TOP + plot_h * (1 - v / y_max)
        marks.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}"/>'
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" '
            f'fill="{MUTED}">{_fmt(v)}</text>'
        )
    return y_max, marks


def histogram_svg(edges: list[int], counts: list[int], title: str, xlabel: str) -> str:
    """A histogram of binned integer values as an ``<svg>`` element.

    Args:
        edges: bin edges from ``histogram_bins``.
        counts: the count in each bin.
        title: chart title.
        xlabel: what the values are.
    """
    if not counts:
        return _empty(title, "no data")
    y_max, body = _y_axis(max(counts), integer=True)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    bar_w = plot_w / len(counts)
    for i, n in enumerate(counts):
        h = plot_h * n / y_max
        x = LEFT + i * bar_w
        span = f"{edges[i]}" if edges[i + 1] - edges[i] == 1 else f"{edges[i]}-{edges[i + 1] - 1}"
        body.append(
            f'<rect x="{x + 0.5:.1f}" y="{TOP + plot_h - h:.1f}" width="{max(bar_w - 1, 1):.1f}" '
            f'height="{h:.1f}" fill="{DEFAULT_FILL}"><title>{span}: {n}</title></rect>'
        )
    # Label about six edges, counting from the left one.
    every = max(1, math.ceil(len(counts) / 6))
    for i in range(0, len(edges), every):
        x = LEFT + i * bar_w
        body.append(
            f'<text x="{x:.1f}" y="{TOP + plot_h + 15}" text-anchor="middle" '
            f'fill="{MUTED}">{edges[i]}</text>'
        )
    return _frame(title, xlabel, "count", body)


def bars_svg(values: dict[str, int], title: str) -> str:
    """Horizontal bars, one per label, each with its count and share written at its end."""
    if not values:
        return _empty(title, "no data")
    # Room on the right for the longest "count (share)" label.
    plot_w = WIDTH - 2 * LEFT - RIGHT - 110
    top = max(values.values()) or 1
    total = sum(values.values()) or 1
    row_h = min(40, (HEIGHT - TOP - BOTTOM) / len(values))
    body = []
    for i, (label, n) in enumerate(values.items()):
        y = TOP + 8 + i * row_h
        w = max(plot_w * n / top, 1)
        text_y = y + row_h * 0.45 + 4
        body.append(
            f'<text x="{2 * LEFT - 8}" y="{text_y:.1f}" text-anchor="end" '
            f'fill="{INK}">{escape(label)}</text>'
            f'<rect x="{2 * LEFT}" y="{y:.1f}" width="{w:.1f}" height="{row_h * 0.9:.1f}" '
            f'fill="{PALETTE.get(label, DEFAULT_FILL)}"><title>{escape(label)}: {n}</title></rect>'
            f'<text x="{2 * LEFT + w + 6:.1f}" y="{text_y:.1f}" '
            f'fill="{INK}">{n:,} ({n / total:.1%})</text>'
        )
    return _frame(title, "", "", body)


def points_svg(xs: list[float], ys: list[float], title: str, xlabel: str, ylabel: str) -> str:
    """Points joined by a line (``xs`` ascending, from 0 up), both axes from 0, as ``<svg>``."""
    if not xs:
        return _empty(title, "no timing recorded in the shards")
    y_max, body = _y_axis(max(ys), integer=False)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = nice_step(xs[-1], 5)
    x_hi = step * max(1, math.ceil(xs[-1] / step))

    def px(x: float) -> float:
        return LEFT + plot_w * x / x_hi

    def py(y: float) -> float:
        return TOP + plot_h * (1 - y / y_max)

    for i in range(round(x_hi / step) + 1):
        x = i * step
        body.append(
            f'<text x="{px(x):.1f}" y="{TOP + plot_h + 15}" text-anchor="middle" '
            f'fill="{MUTED}">{_fmt(x)}</text>'
        )
    line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys, strict=True))
    body.append(
        f'<polyline points="{line}" fill="none" stroke="{DEFAULT_FILL}" stroke-width="1.5"/>'
    )
    for x, y in zip(xs, ys, strict=True):
        body.append(
            f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{DEFAULT_FILL}">'
            f"<title>{_fmt(x)}: {y:,.1f}</title></circle>"
        )
    return _frame(title, xlabel, ylabel, body)
