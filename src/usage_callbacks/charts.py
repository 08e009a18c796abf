"""Charts as inline SVG, drawn once for the dashboard and the static HTML report.

Both show the same pictures from the same store queries: spend over time stacked by
model, and the costliest groups of a breakdown (user, node, ...) as bars. The SVG scales
to the width of the window (``viewBox``, ``width="100%"``), carries its values as text
and ``<title>`` tooltips, needs no script and no network, and labels both axes.
"""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal
from html import escape

from usage_callbacks.store.base import Breakdown

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#9c755f")
#: The drawing's own width; the browser scales it to the window.
WIDTH = 1000
#: Longest group label drawn in full (the tooltip has all of it).
LABEL_CHARACTERS = 28
#: Groups a breakdown chart or table shows: the costliest.
TOP_GROUPS = 10


def usd(value: Decimal) -> str:
    return f"${value:,.6f}" if value < 1 else f"${value:,.2f}"


def svg(chart_id: str, height: int, label: str, body: list[str]) -> str:
    """A chart as wide as its container, ``WIDTH`` units across."""
    return (
        f'<svg class="chart" id="{chart_id}" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {WIDTH} {height}" width="100%" role="img" aria-label="{escape(label)}" '
        f'font-family="system-ui, sans-serif">{"".join(body)}</svg>'
    )


def text(
    x: float, y: float, text: str, *, anchor: str = "start", size: int = 12, upright: bool = False
) -> str:
    """A label; ``upright`` turns it to read bottom to top (a vertical axis's title)."""
    turn = f' transform="rotate(-90 {x:.1f} {y:.1f})"' if upright else ""
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}"{turn}>'
        f"{escape(text)}</text>"
    )


def spend_chart(series: Breakdown, *, hourly: bool = False, height: int = 320) -> str:
    """Stacked bars: spend per UTC day (or hour) and model, from a (bucket, model)
    breakdown; a legend names the models."""
    buckets = sorted({str(group.keys[0]) for group in series.groups})
    if not buckets:
        return "<p>No calls in this period.</p>"
    models = sorted({group.keys[1] or "unknown" for group in series.groups})
    spend: dict[str, dict[str, Decimal]] = defaultdict(dict)
    for group in series.groups:
        spend[str(group.keys[0])][group.keys[1] or "unknown"] = group.cost_usd
    peak = max(sum(spend[bucket].values(), Decimal(0)) for bucket in buckets) or Decimal(1)
    left, right, top, bottom = 96, 12, 14, 52
    plot = height - top - bottom
    step = (WIDTH - left - right) / len(buckets)
    bar = min(max(step * 0.7, 1.5), 60)
    body = [
        text(18, top + plot / 2, "spend (USD)", anchor="middle", size=13, upright=True),
        text(left + (WIDTH - left) / 2, height - 6, "UTC " + ("hour" if hourly else "day"),
              anchor="middle", size=13),
    ]  # fmt: skip
    for fraction in (0, 0.5, 1):
        y = top + plot * (1 - fraction)
        body.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{WIDTH - right}" y2="{y:.1f}" '
            f'stroke="{"#888" if fraction == 0 else "#e4e4e4"}"/>'
        )
        body.append(text(left - 6, y + 4, usd(peak * Decimal(fraction)), anchor="end", size=11))
    every = max(len(buckets) // 12, 1)
    for index, bucket in enumerate(buckets):
        x = left + index * step + (step - bar) / 2
        y = float(top + plot)
        for model_index, model in enumerate(models):
            cost = spend[bucket].get(model, Decimal(0))
            if not cost:
                continue
            h = float(cost / peak) * plot
            y -= h
            body.append(
                f'<rect class="bar" data-model="{escape(model)}" data-bucket="{escape(bucket)}" '
                f'x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="{PALETTE[model_index % len(PALETTE)]}">'
                f"<title>{escape(bucket)} {escape(model)}: {usd(cost)}</title></rect>"
            )
        if index % every == 0:
            label = bucket[5:] + (":00" if hourly else "")  # MM-DD or MM-DD HH:00
            body.append(text(x + bar / 2, top + plot + 16, label, anchor="middle", size=11))
    legend = "".join(
        f'<span class="key"><i style="background:{PALETTE[i % len(PALETTE)]}"></i>'
        f"{escape(model)}</span>"
        for i, model in enumerate(models)
    )
    label = f"Spend per UTC {'hour' if hourly else 'day'}, by model"
    return svg("spend-chart", height, label, body) + f'<div class="legend">{legend}</div>'


def breakdown_chart(breakdown: Breakdown, name: str, *, row: int = 26) -> str:
    """Horizontal bars: the cost of each of a breakdown's groups (the costliest first),
    with calls and tokens beside it; says how many groups there are in all."""
    groups = breakdown.groups
    if not groups:
        return "<p>No calls in this period.</p>"
    peak = max(group.cost_usd for group in groups) or Decimal(1)
    left, top, bottom = 230, 8, 44
    plot = WIDTH - left - 250
    height = top + row * len(groups) + bottom
    body = [
        text(16, top + row * len(groups) / 2, name, anchor="middle", size=13, upright=True),
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + row * len(groups)}" stroke="#888"/>',
        text(left + plot / 2, height - 6, "cost (USD)", anchor="middle", size=13),
    ]
    for fraction in (0, 0.5, 1):
        x = left + plot * fraction
        body.append(
            text(x, top + row * len(groups) + 16, usd(peak * Decimal(fraction)), anchor="middle",
                  size=11)
        )  # fmt: skip
    for index, group in enumerate(groups):
        key = group.keys[0] if group.keys[0] is not None else "(none)"
        shown = key if len(key) <= LABEL_CHARACTERS else key[: LABEL_CHARACTERS - 1] + "…"
        y = top + index * row
        w = float(group.cost_usd / peak) * plot
        unpriced = " (some unpriced)" if group.unpriced_calls else ""
        body.append(
            f"<g><title>{escape(key)}: {usd(group.cost_usd)}{unpriced}, {group.calls:,} calls, "
            f"{group.total_tokens:,} tokens</title>"
            + text(left - 8, y + row * 0.65, shown, anchor="end")
            + f'<rect class="group-bar" data-key="{escape(key)}" x="{left}" y="{y + 4}" '
            f'width="{w:.1f}" height="{row - 8}" fill="{PALETTE[0]}"/>'
            + text(
                left + w + 6,
                y + row * 0.65,
                f"{usd(group.cost_usd)}{unpriced} · {group.calls:,} calls · "
                f"{group.total_tokens:,} tokens",
                size=11,
            )
            + "</g>"
        )
    chart_id = f"{breakdown.levels[0].replace(':', '-')}-chart"
    return svg(chart_id, height, f"Cost by {name}", body) + (
        f'<p class="note">{len(groups)} of {breakdown.group_count:,} {escape(name)} values, '
        "the costliest first.</p>"
    )
