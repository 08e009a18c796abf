"""Usage reports: Markdown for reading in a terminal or a PR, HTML with charts.

The HTML is one self-contained file: inline CSS and inline SVG drawn here, no script and
no network, so it opens anywhere, including from an e-mail attachment.
"""

from __future__ import annotations

import html
import re
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal

from usage_callbacks.store.base import DailyUsage, GroupBy, UsageFilter, UsageStore, UsageSummary
from usage_callbacks.store.models import UsageRecord

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#9c755f")
TOKEN_KINDS = (
    ("prompt (uncached)", "#4e79a7"),
    ("cache read", "#76b7b2"),
    ("cache write", "#59a14f"),
    ("completion", "#f28e2b"),
    ("reasoning", "#e15759"),
    ("embedding", "#b07aa1"),
)


@dataclass(frozen=True)
class ReportData:
    """Everything a report shows, read once."""

    overall: UsageSummary
    by_model: UsageSummary
    daily: list[DailyUsage]
    latest: list[UsageRecord]
    #: the breakdown asked for (node, agent, dimension:tenant, ...), if any
    breakdown: UsageSummary | None = None


def gather(store: UsageStore, where: UsageFilter, by: GroupBy | None = None) -> ReportData:
    """Read what a report shows (a tracker's records reach it after ``flush()``)."""
    return ReportData(
        overall=store.summary(where, None),
        by_model=store.summary(where, "model"),
        daily=store.daily_by_model(where),
        latest=store.records(where, limit=10, newest_first=True),
        breakdown=store.summary(where, by) if by else None,
    )


def cell(value: object) -> str:
    """A value as one Markdown table cell: ``|`` cannot end the cell, ``<`` and ``&``
    cannot start markup, a newline cannot end the row."""
    text = " ".join(str(value).splitlines())
    return text.replace("&", "&amp;").replace("<", "&lt;").replace("|", "\\|")


#: A cell boundary: a ``|`` that cell() did not escape.
_CELL_BORDER = re.compile(r"(?<!\\)\|")


def _usd(value: Decimal) -> str:
    return f"${value:,.6f}" if value < 1 else f"${value:,.2f}"


def _per_1k(cost: Decimal, tokens: int) -> str:
    return _usd(cost * 1000 / tokens) if tokens else "-"


def token_parts(summary: UsageSummary) -> list[int]:
    """Token totals split by kind, in TOKEN_KINDS order, parts adding up to the total."""
    usage = summary.usage
    return [
        usage.prompt_tokens - usage.cache_read_tokens - usage.cache_write_tokens,
        usage.cache_read_tokens,
        usage.cache_write_tokens,
        usage.completion_tokens - usage.reasoning_tokens,
        usage.reasoning_tokens,
        usage.embedding_tokens,
    ]


def markdown(data: ReportData) -> str:
    overall = data.overall
    usage = overall.usage
    lines = [
        "# LLM usage report",
        "",
        f"Period: {overall.period_start:%Y-%m-%d %H:%M} to {overall.period_end:%Y-%m-%d %H:%M} UTC"
        if overall.period_start and overall.period_end
        else "Period: no calls recorded",
        "",
        "## Totals",
        "",
        "| calls | errors | prompt | cached | completion | reasoning | embedding | total | cost "
        "| cost / 1K tokens |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {overall.calls:,} | {overall.errors:,} | {usage.prompt_tokens:,} | "
        f"{usage.cache_read_tokens:,} | {usage.completion_tokens:,} | {usage.reasoning_tokens:,} | "
        f"{usage.embedding_tokens:,} | {usage.total:,} | {_usd(usage.cost_estimate_usd)} | "
        f"{_per_1k(usage.cost_estimate_usd, usage.total)} |",
        "",
        f"Tokens per call: p50 {overall.stats.p50:,}, p95 {overall.stats.p95:,}, "
        f"p99 {overall.stats.p99:,}, max {overall.stats.max:,}.",
        "",
        *_cost_table(data.by_model, usage.cost_estimate_usd),
    ]
    if data.breakdown is not None:
        lines += ["", *_cost_table(data.breakdown, usage.cost_estimate_usd)]
    lines += [
        "",
        "## Last 10 calls",
        "",
        "| ended (UTC) | model | user | session | prompt | completion | embedding | cost "
        "| status |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for record in data.latest:
        lines.append(
            f"| {record.ended_at:%Y-%m-%d %H:%M:%S} | {cell(record.model or '-')} | "
            f"{cell(record.user_id or '-')} | {cell(record.session_id or '-')} | "
            f"{record.prompt_tokens:,} | "
            f"{record.completion_tokens:,} | {record.embedding_tokens:,} | "
            f"{_usd(record.cost_estimate_usd)} | {record.status} |"
        )
    return "\n".join(lines) + "\n"


def _cost_table(summary: UsageSummary, total_cost: Decimal) -> list[str]:
    """A "Cost by ..." section: one row a group, second-level groups indented under it."""
    by = summary.group_by or "model"
    lines = [
        f"## Cost by {by.replace(',', ', then ')}",
        "",
        f"| {by} | calls | total tokens | cost | cost / 1K tokens | share |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    rows = [(group, "") for group in summary.groups]
    while rows:
        group, indent = rows.pop(0)
        cost = group.usage.cost_estimate_usd
        lines.append(
            f"| {indent}{cell(group.key or 'unknown')} | {group.calls:,} | {group.usage.total:,} | "
            f"{_usd(cost)} | {_per_1k(cost, group.usage.total)} | "
            f"{cost / (total_cost or Decimal(1)):.1%} |"
        )
        rows[:0] = [(inner, indent + "↳ ") for inner in group.groups]
    return lines


# -------------------------------------------------------------------- HTML + SVG


def _spend_chart(daily: list[DailyUsage], width: int = 760, height: int = 300) -> str:
    """Stacked bars: spend per day, one colour per model."""
    days = sorted({row.day for row in daily})
    models = sorted({row.model for row in daily})
    if not days:
        return "<p>No calls in this period.</p>"
    spend: dict[str, dict[str, Decimal]] = defaultdict(dict)
    for row in daily:
        spend[row.day][row.model] = row.usage.cost_estimate_usd
    peak = max(sum(spend[day].values(), Decimal(0)) for day in days) or Decimal(1)
    left, bottom, top = 70, 40, 20
    plot_h = height - bottom - top
    step = (width - left - 10) / len(days)
    bar = min(max(step * 0.7, 2), 60)
    parts = [
        f'<svg class="chart" id="spend-chart" xmlns="http://www.w3.org/2000/svg" '
        f'width="{width}" height="{height}" role="img" aria-label="Spend per day by model">',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 10}" y2="{top + plot_h}" '
        'stroke="#888"/>',
        f'<text x="{left - 6}" y="{top + 4}" text-anchor="end" font-size="11">{_usd(peak)}</text>',
        f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end" font-size="11">$0</text>',
    ]
    for index, day in enumerate(days):
        x = left + index * step + (step - bar) / 2
        y = float(top + plot_h)
        for model_index, model in enumerate(models):
            cost = spend[day].get(model, Decimal(0))
            if not cost:
                continue
            h = float(cost / peak) * plot_h
            y -= h
            parts.append(
                f'<rect class="bar" data-model="{html.escape(model)}" data-day="{day}" '
                f'x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="{PALETTE[model_index % len(PALETTE)]}">'
                f"<title>{day} {html.escape(model)}: {_usd(cost)}</title></rect>"
            )
        if len(days) <= 15 or index % max(len(days) // 10, 1) == 0:
            parts.append(
                f'<text x="{x + bar / 2:.1f}" y="{top + plot_h + 16}" text-anchor="middle" '
                f'font-size="10">{day[5:]}</text>'
            )
    parts.append("</svg>")
    legend = "".join(
        f'<span class="key"><i style="background:{PALETTE[i % len(PALETTE)]}"></i>'
        f"{html.escape(model)}</span>"
        for i, model in enumerate(models)
    )
    return "".join(parts) + f'<div class="legend">{legend}</div>'


def _tokens_chart(summary: UsageSummary, width: int = 760, row: int = 28) -> str:
    """Horizontal bars: tokens by type."""
    values = token_parts(summary)
    peak = max(values) or 1
    height = row * len(values) + 10
    parts = [
        f'<svg class="chart" id="tokens-chart" xmlns="http://www.w3.org/2000/svg" '
        f'width="{width}" height="{height}" role="img" aria-label="Tokens by type">'
    ]
    for index, ((label, colour), value) in enumerate(zip(TOKEN_KINDS, values, strict=True)):
        y = 5 + index * row
        w = value / peak * (width - 300)
        parts.append(
            f'<text x="150" y="{y + 17}" text-anchor="end" font-size="12">{label}</text>'
            f'<rect class="bar" data-kind="{label}" x="160" y="{y + 4}" width="{w:.1f}" '
            f'height="{row - 10}" fill="{colour}"><title>{label}: {value:,}</title></rect>'
            f'<text x="{165 + w:.1f}" y="{y + 17}" font-size="12">{value:,}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _markdown_table_to_html(markdown_text: str) -> str:
    """The Markdown report's tables and lines, as plain HTML (escaped)."""
    out: list[str] = []
    rows: list[list[str]] = []

    def flush_table() -> None:
        if rows:
            head, *body = rows
            out.append("<table><thead><tr>")
            out.extend(f"<th>{html.escape(text)}</th>" for text in head)
            out.append("</tr></thead><tbody>")
            for cells in body:
                out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            out.append("</tbody></table>")
            rows.clear()

    for line in markdown_text.splitlines():
        if line.startswith("|"):
            cells = [
                html.unescape(text.strip().replace("\\|", "|"))
                for text in _CELL_BORDER.split(line.strip()[1:-1])
            ]
            if not all(set(text) <= set(":-") for text in cells):
                rows.append(cells)
            continue
        flush_table()
        if line.startswith("## "):
            out.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            out.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line:
            out.append(f"<p>{html.escape(line)}</p>")
    flush_table()
    return "\n".join(out)


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px auto; max-width: 900px; color: #222; }
table { border-collapse: collapse; margin: 8px 0 16px; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.legend .key { margin-right: 14px; white-space: nowrap; }
.legend i { display: inline-block; width: 10px; height: 10px; margin-right: 4px; }
"""


def html_report(data: ReportData) -> str:
    body = _markdown_table_to_html(markdown(data))
    charts = (
        "<h2>Spend per day, by model</h2>"
        + _spend_chart(data.daily)
        + "<h2>Tokens by type</h2>"
        + _tokens_chart(data.overall)
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>LLM usage report</title><style>{STYLE}</style></head><body>"
        f"{body}{charts}</body></html>\n"
    )
