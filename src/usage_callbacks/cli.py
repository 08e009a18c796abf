"""``usage-callbacks``: read spend without opening Python.

Every subcommand takes ``--db URL`` (default ``$USAGE_CALLBACKS_DB`` or
``sqlite:///usage.db``) and the filters ``--since/--until/--user/--session/--model``,
``--node/--agent/--thread/--run-name`` and ``--dimension key=value`` (repeatable).
Bad input ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa

from usage_callbacks.store import (
    GroupSummary,
    SchemaTooNewError,
    StoreConfigurationError,
    UsageFilter,
    resolve_url,
)
from usage_callbacks.store.base import GROUP_COLUMNS, group_levels
from usage_callbacks.store.models import RECORD_COLUMNS, UsageRecord
from usage_callbacks.tracker import UsageTracker

EXIT_USAGE = 2


class CliError(Exception):
    """A problem the person at the terminal can fix; printed as one line."""


def _when(text: str) -> datetime:
    """An ISO date or datetime; naive values are UTC."""
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date; use YYYY-MM-DD or YYYY-MM-DDTHH:MM"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _group_by(text: str) -> str:
    """One or two comma-separated levels: ``node``, ``node,model``, ``dimension:tenant``."""
    try:
        return ",".join(group_levels(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _dimension(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: write --dimension key=value")
    return key, value


class _Parser(argparse.ArgumentParser):
    """Bad arguments end in one line on stderr and exit code 2, not a usage dump."""

    def error(self, message: str) -> Any:
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--db", help="database URL (default: $USAGE_CALLBACKS_DB or sqlite:///usage.db)"
    )
    common.add_argument("--since", type=_when, help="from this UTC date/time (inclusive)")
    common.add_argument("--until", type=_when, help="up to this UTC date/time (exclusive)")
    common.add_argument("--user")
    common.add_argument("--session")
    common.add_argument("--model")
    common.add_argument("--node", help="graph node or workflow step")
    common.add_argument("--agent")
    common.add_argument("--thread", help="conversation thread id")
    common.add_argument("--run-name", help="nearest named runnable above the call")
    common.add_argument(
        "--dimension",
        type=_dimension,
        action="append",
        metavar="KEY=VALUE",
        help="a declared metadata dimension (repeatable), e.g. tenant=acme",
    )
    parser = _Parser(
        prog="usage-callbacks", description="Token usage, cost and budgets of LLM applications."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser("summary", parents=[common], help="totals and percentiles")
    summary.add_argument(
        "--by",
        type=_group_by,
        help=f"one or two of {', '.join(GROUP_COLUMNS)}, dimension:<key> (e.g. node,model)",
    )
    summary.add_argument("--json", action="store_true", help="machine-readable output")
    report = commands.add_parser("report", parents=[common], help="Markdown or HTML report")
    report.add_argument("--out", required=True, type=Path, help="usage.md or usage.html")
    report.add_argument(
        "--by", type=_group_by, help="add a cost breakdown, e.g. node, agent, dimension:tenant"
    )
    export = commands.add_parser("export", parents=[common], help="every record, streamed")
    export.add_argument("--format", choices=["csv", "jsonl"], required=True)
    export.add_argument("--out", required=True, type=Path)
    purge = commands.add_parser("purge", parents=[common], help="delete old records")
    purge.add_argument("--before", required=True, type=_when)
    purge.add_argument("--yes", action="store_true", help="do not ask")
    commands.add_parser("budgets", parents=[common], help="spend and headroom this period")
    ingest = commands.add_parser("ingest", parents=[common], help="load a spill file")
    ingest.add_argument("file", type=Path)
    commands.add_parser("demo", parents=[common], help="the offline demo")
    return parser


def _open(args: argparse.Namespace, *, must_exist: bool = True) -> UsageTracker:
    url = resolve_url(args.db)
    try:
        parsed = sa.engine.make_url(url) if not url.startswith("memory://") else None
    except sa.exc.ArgumentError:
        raise CliError(f"{url!r} is not a database URL; try sqlite:///usage.db") from None
    if must_exist and parsed is not None and parsed.get_backend_name() == "sqlite":
        path = parsed.database
        if path and path != ":memory:" and not Path(path).exists():
            raise CliError(f"no usage database at {path}; record something first or pass --db")
    try:
        return UsageTracker(url, flush_interval=0.05)
    except (StoreConfigurationError, SchemaTooNewError) as error:
        raise CliError(str(error)) from None
    except sa.exc.SQLAlchemyError as error:
        raise CliError(f"cannot open {url}: {str(error).splitlines()[0]}") from None


def _filter(args: argparse.Namespace) -> UsageFilter:
    return UsageFilter(
        user_id=args.user,
        session_id=args.session,
        model=args.model,
        since=args.since,
        until=args.until,
        node=args.node,
        agent=args.agent,
        thread_id=args.thread,
        run_name=args.run_name,
        dimensions=dict(args.dimension) if args.dimension else None,
    )


def _json_default(value: Any) -> str:
    if isinstance(value, (Decimal, datetime)):
        return str(value) if isinstance(value, Decimal) else value.isoformat()
    raise TypeError(type(value).__name__)


# -------------------------------------------------------------------- commands


def cmd_summary(args: argparse.Namespace, out: IO[str]) -> int:
    with _open(args) as tracker:
        summary = tracker.store.summary(_filter(args), args.by)
    if args.json:
        json.dump(summary.model_dump(mode="json"), out, indent=2)
        out.write("\n")
        return 0
    header = (
        f"{(args.by or 'all'):<24}{'calls':>8}{'prompt':>11}{'compl.':>10}{'embed':>9}"
        f"{'total':>11}{'cost $':>12}{'p50':>7}{'p95':>7}{'p99':>7}  first call        last call"
    )
    print(header, file=out)
    groups = summary.groups if args.by else []
    for group in groups:
        _group_lines(out, group, "")
    _summary_line(
        out,
        "TOTAL",
        summary.calls,
        summary.usage,
        summary.stats,
        summary.period_start,
        summary.period_end,
    )
    return 0


def _group_lines(out: IO[str], group: GroupSummary, indent: str) -> None:
    """A group's line, then its second-level groups indented under it."""
    label = indent + (group.key or "-")
    _summary_line(
        out, label, group.calls, group.usage, group.stats, group.first_call, group.last_call
    )
    for inner in group.groups:
        _group_lines(out, inner, indent + "  ")


def _summary_line(
    out: IO[str],
    label: str,
    calls: int,
    usage: Any,
    stats: Any,
    first: datetime | None,
    last: datetime | None,
) -> None:
    def stamp(value: datetime | None) -> str:
        return f"{value:%Y-%m-%d %H:%M}" if value else "-"

    print(
        f"{label[:23]:<24}{calls:>8,}{usage.prompt_tokens:>11,}{usage.completion_tokens:>10,}"
        f"{usage.embedding_tokens:>9,}{usage.total:>11,}{usage.cost_estimate_usd:>12.6f}"
        f"{stats.p50:>7}{stats.p95:>7}{stats.p99:>7}  {stamp(first):<18}{stamp(last)}",
        file=out,
    )


def cmd_report(args: argparse.Namespace, out: IO[str]) -> int:
    from usage_callbacks.report import gather, html_report, markdown

    suffix = args.out.suffix.lower()
    if suffix not in (".md", ".html", ".htm"):
        raise CliError(f"--out {args.out}: use a .md or .html file name")
    with _open(args) as tracker:
        data = gather(tracker, _filter(args), args.by)
    text = html_report(data) if suffix != ".md" else markdown(data)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({data.overall.calls:,} calls)", file=out)
    return 0


def _progress(total: int, enabled: bool) -> Callable[[int], None]:
    def show(done: int) -> None:
        if enabled and total:
            sys.stderr.write(f"\rexporting {done:,}/{total:,} ({done / total:.0%})")
            if done >= total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    return show


def _rows(records: Iterator[UsageRecord]) -> Iterator[dict[str, Any]]:
    for record in records:
        yield record.model_dump(mode="json")


def cmd_export(args: argparse.Namespace, out: IO[str]) -> int:
    with _open(args) as tracker:
        where = _filter(args)
        total = tracker.store.summary(where, None).calls
        show = _progress(total, sys.stderr.isatty() and total > 10_000)
        done = 0
        with args.out.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(RECORD_COLUMNS))
            if args.format == "csv":
                writer.writeheader()
            for row in _rows(tracker.store.iter_records(where)):
                if args.format == "csv":
                    row["tags"] = json.dumps(row["tags"])
                    row["dimensions"] = json.dumps(row["dimensions"] or {})
                    writer.writerow(row)
                else:
                    handle.write(json.dumps(row, default=_json_default) + "\n")
                done += 1
                if done % 5000 == 0:
                    show(done)
        show(done)
    print(f"exported {done:,} records to {args.out}", file=out)
    return 0


def cmd_purge(args: argparse.Namespace, out: IO[str]) -> int:
    with _open(args) as tracker:
        cutoff = min(args.before, args.until) if args.until else args.before
        where = replace(_filter(args), until=cutoff)
        doomed = tracker.store.summary(where, None).calls
        if not doomed:
            print("nothing to purge", file=out)
            return 0
        if not args.yes:
            if not sys.stdin.isatty():
                raise CliError(f"{doomed:,} records would be deleted; pass --yes to confirm")
            cutoff = f"{args.before:%Y-%m-%d %H:%M} UTC"
            answer = input(f"Delete {doomed:,} records that ended before {cutoff}? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing deleted", file=out)
                return 0
        tracker.flush()
        deleted = tracker.store.purge(cutoff, where)
    print(f"deleted {deleted:,} records", file=out)
    return 0


def cmd_budgets(args: argparse.Namespace, out: IO[str]) -> int:
    with _open(args) as tracker:
        statuses = tracker.store.ledger.overview(datetime.now(timezone.utc))
    if not statuses:
        print(
            "no budgets recorded here (they are set in code: UsageTracker(budgets=...))", file=out
        )
        return 0
    print(
        f"{'budget':<32}{'key':<16}{'spent $':>12}{'held $':>11}{'left $':>12}"
        f"{'tokens':>11}{'left tok':>11}  resets",
        file=out,
    )
    for status in statuses:
        budget = status.budget
        resets = (
            f"{status.period_end:%Y-%m-%d %H:%M}"
            if isinstance(budget.period, str)
            else ("rolling" if budget.period else "never")
        )
        left_usd = status.remaining_usd
        left_tokens = status.remaining_tokens
        print(
            f"{budget.label[:31]:<32}{status.key[:15]:<16}{status.spent_usd:>12.6f}"
            f"{status.reserved_usd:>11.6f}"
            f"{'-' if left_usd is None else f'{left_usd:.6f}':>12}"
            f"{status.spent_tokens:>11,}{'-' if left_tokens is None else f'{left_tokens:,}':>11}"
            f"  {resets}",
            file=out,
        )
    return 0


def cmd_ingest(args: argparse.Namespace, out: IO[str]) -> int:
    if not args.file.exists():
        raise CliError(f"no such file: {args.file}")
    with _open(args, must_exist=False) as tracker:
        count = tracker.ingest(args.file)
    print(f"ingested {count:,} records from {args.file}", file=out)
    return 0


def cmd_demo(args: argparse.Namespace, out: IO[str]) -> int:
    from usage_callbacks.demo import main as demo

    return demo(args.db)


COMMANDS: dict[str, Callable[[argparse.Namespace, IO[str]], int]] = {
    "summary": cmd_summary,
    "report": cmd_report,
    "export": cmd_export,
    "purge": cmd_purge,
    "budgets": cmd_budgets,
    "ingest": cmd_ingest,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args, sys.stdout)
    except CliError as error:
        print(f"usage-callbacks: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
