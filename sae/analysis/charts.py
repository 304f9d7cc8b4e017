"""Inline SVG charts for the dashboard (no JavaScript, no CDN): bar histograms and line plots.

Each function returns one `<svg>` element as a string; numbers are formatted compactly and every text is escaped.
"""
from __future__ import annotations

import math
from html import escape
from typing import Sequence

W, H, PAD_L, PAD_B, PAD_T, PAD_R = 360, 150, 44, 22, 8, 8


def fmt(v: float) -> str:
    """Compact number: 3 significant digits, scientific outside [1e-3, 1e5)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, int) or (abs(v) >= 1 and float(v).is_integer() and abs(v) < 1e9):
        return f"{int(v):,}"
    a = abs(v)
    if 100 <= a < 1e6:
        return f"{v:,.0f}"
    return f"{v:.3g}" if a == 0 or 1e-3 <= a < 100 else f"{v:.2e}"


def _frame(inner: str, x_lo: str, x_hi: str, y_lo: str, y_hi: str, title: str, x_label: str = "") -> str:
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    return (f'<svg class="chart" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
            f'aria-label="{escape(title)}"><title>{escape(title)}</title>'
            f'<rect x="{PAD_L}" y="{PAD_T}" width="{pw}" height="{ph}" class="plot"/>{inner}'
            f'<text x="{PAD_L - 4}" y="{PAD_T + 9}" class="ax" text-anchor="end">{escape(y_hi)}</text>'
            f'<text x="{PAD_L - 4}" y="{PAD_T + ph}" class="ax" text-anchor="end">{escape(y_lo)}</text>'
            f'<text x="{PAD_L}" y="{H - 6}" class="ax">{escape(x_lo)}</text>'
            f'<text x="{W - PAD_R}" y="{H - 6}" class="ax" text-anchor="end">{escape(x_hi)}</text>'
            f'<text x="{PAD_L + pw / 2}" y="{H - 6}" class="ax" text-anchor="middle">{escape(x_label)}</text></svg>')


def bar_chart(counts: Sequence[float], x_lo: float, x_hi: float, title: str, x_label: str = "",
              log_y: bool = False) -> str:
    """Histogram bars over [x_lo, x_hi] (equal-width bins)."""
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    vals = [math.log10(1 + c) for c in counts] if log_y else [float(c) for c in counts]
    top = max(vals, default=0.0) or 1.0
    bw = pw / max(1, len(vals))
    bars = "".join(
        f'<rect class="bar" x="{PAD_L + i * bw:.2f}" y="{PAD_T + ph * (1 - v / top):.2f}" width="{max(bw - 0.5, 0.5):.2f}" '
        f'height="{ph * v / top:.2f}"><title>{fmt(x_lo + i * (x_hi - x_lo) / len(vals))}: {fmt(c)}</title></rect>'
        for i, (v, c) in enumerate(zip(vals, counts)) if c)
    return _frame(bars, fmt(x_lo), fmt(x_hi), "0", fmt(max(counts, default=0)) + (" (log)" if log_y else ""),
                  title, x_label)


def line_chart(xs: Sequence[float], ys: Sequence[float], title: str, x_label: str = "step") -> str:
    """One series; log y when all values are positive and span more than 20x."""
    pts = [(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(float(y))]
    if not pts:
        return _frame("", "", "", "", "", title, x_label)
    ymin, ymax = min(p[1] for p in pts), max(p[1] for p in pts)
    log = ymin > 0 and ymax / ymin > 20
    f = (lambda v: math.log10(v)) if log else (lambda v: v)
    lo, hi = f(ymin), f(ymax)
    if hi - lo < 1e-12:
        lo, hi = lo - 1, hi + 1
    x0, x1 = pts[0][0], pts[-1][0]
    x1 = x1 if x1 > x0 else x0 + 1
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    coords = " ".join(f"{PAD_L + pw * (x - x0) / (x1 - x0):.1f},{PAD_T + ph * (1 - (f(y) - lo) / (hi - lo)):.1f}"
                      for x, y in pts)
    line = f'<polyline class="line" points="{coords}"/>'
    return _frame(line, fmt(x0), fmt(x1), fmt(ymin), fmt(ymax) + (" (log)" if log else ""), title, x_label)
