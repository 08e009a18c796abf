"""Usage reports: Markdown for reading in a terminal or a PR, HTML with charts.

The HTML is one self-contained file: inline CSS and the dashboard's inline SVG charts
(charts.py), no script and no network, so it opens anywhere, including from an e-mail
attachment.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from decimal import Decimal

from usage_callbacks import charts
from usage_callbacks.store.base import Breakdown, GroupBy, UsageFilter, UsageStore, UsageSummary
from usage_callbacks.store.models import UsageRecord

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
    #: spend per day and model, for the chart
    series: Breakdown
    by_user: Breakdown
    by_node: Breakdown
    latest: list[UsageRecord]
    #: the breakdown asked for (node, agent, dimension:tenant, ...), if any
    breakdown: UsageSummary | None = None


def gather(store: UsageStore, where: UsageFilter, by: GroupBy | None = None) -> ReportData:
    """Read what a report shows (a tracker's records reach it after ``flush()``)."""
    return ReportData(
        overall=store.summary(where, None),
        by_model=store.summary(where, "model"),
        series=store.breakdown(where, ("day", "model")),
        by_user=store.breakdown(where, ("user",), charts.TOP_GROUPS),
        by_node=store.breakdown(where, ("node",), charts.TOP_GROUPS),
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


def _per_1k(cost: Decimal, tokens: int) -> str:
    return charts.usd(cost * 1000 / tokens) if tokens else "-"


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
        f"{usage.embedding_tokens:,} | {usage.total:,} | {charts.usd(usage.cost_estimate_usd)} | "
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
            f"{charts.usd(record.cost_estimate_usd)} | {record.status} |"
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
            f"{charts.usd(cost)} | {_per_1k(cost, group.usage.total)} | "
            f"{cost / (total_cost or Decimal(1)):.1%} |"
        )
        rows[:0] = [(inner, indent + "↳ ") for inner in group.groups]
    return lines


# -------------------------------------------------------------------- HTML + SVG


def _tokens_chart(summary: UsageSummary, row: int = 28) -> str:
    """Horizontal bars: tokens by type."""
    values = token_parts(summary)
    peak = max(values) or 1
    left, plot, bottom = 160, charts.WIDTH - 360, 40
    height = row * len(values) + bottom
    body = [
        f'<line x1="{left}" y1="0" x2="{left}" y2="{row * len(values)}" stroke="#888"/>',
        charts.text(left + plot / 2, height - 6, "tokens", anchor="middle", size=13),
    ]
    for index, ((label, colour), value) in enumerate(zip(TOKEN_KINDS, values, strict=True)):
        y = index * row
        w = value / peak * plot
        body.append(
            charts.text(left - 8, y + 18, label, anchor="end")
            + f'<rect class="bar" data-kind="{label}" x="{left}" y="{y + 5}" width="{w:.1f}" '
            f'height="{row - 10}" fill="{colour}"><title>{label}: {value:,}</title></rect>'
            + charts.text(left + 6 + w, y + 18, f"{value:,}")
        )
    return charts.svg("tokens-chart", height, "Tokens by type", body)


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
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px 24px; color: #222; }
.chart { display: block; max-height: 90vh; }
.note { color: #777; font-size: 12px; }
table { border-collapse: collapse; margin: 8px 0 16px; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.legend .key { margin-right: 14px; white-space: nowrap; }
.legend i { display: inline-block; width: 10px; height: 10px; margin-right: 4px; }
"""


def html_report(data: ReportData) -> str:
    body = _markdown_table_to_html(markdown(data))
    drawn = (
        "<h2>Spend per day, by model</h2>"
        + charts.spend_chart(data.series)
        + "<h2>Cost by user</h2>"
        + charts.breakdown_chart(data.by_user, "user")
        + "<h2>Cost by node</h2>"
        + charts.breakdown_chart(data.by_node, "node")
        + "<h2>Tokens by type</h2>"
        + _tokens_chart(data.overall)
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>LLM usage report</title><style>{STYLE}</style></head><body>"
        f"{body}{drawn}</body></html>\n"
    )
