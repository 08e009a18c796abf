"""``usage-callbacks``: read spend without opening Python.

Every subcommand takes ``--db URL`` (default ``$USAGE_CALLBACKS_DB`` or
``sqlite:///usage.db``); the filters ``--since/--until/--user/--session/--model``,
``--node/--agent/--thread/--run-name`` and ``--dimension key=value`` (repeatable) are
accepted only where they apply. Reading commands open the database read-only. Bad input
and failures the person at the terminal can fix end with one line on stderr and exit 2.

The library is imported inside the commands: ``--help`` and argument errors do not pay
for pydantic, SQLAlchemy and the price tables.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from usage_callbacks.store import SqlStore, UsageFilter
    from usage_callbacks.store.models import UsageRecord

EXIT_USAGE = 2
#: Characters that make a spreadsheet read a CSV cell as a formula (OWASP CSV injection).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


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
    from usage_callbacks.store.base import group_levels

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


def _options(*names: str) -> _Parser:
    """A parent parser with ``--db`` and the named filters (a command takes only the
    filters it applies: any other is refused as an unknown argument)."""
    parent = _Parser(add_help=False)
    parent.add_argument(
        "--db", help="database URL (default: $USAGE_CALLBACKS_DB or sqlite:///usage.db)"
    )
    helps = {
        "since": "from this UTC date/time (inclusive)",
        "until": "up to this UTC date/time (exclusive)",
        "user": "only this user id",
        "session": "only this session id",
        "model": "only this model",
        "node": "only this graph node or workflow step",
        "agent": "only this agent",
        "thread": "only this conversation thread id",
        "run-name": "only calls under this named runnable",
    }
    for name in names:
        if name == "dimension":
            parent.add_argument(
                "--dimension",
                type=_dimension,
                action="append",
                metavar="KEY=VALUE",
                help="a declared metadata dimension (repeatable), e.g. tenant=acme",
            )
        elif name in ("since", "until"):
            parent.add_argument(f"--{name}", type=_when, help=helps[name])
        else:
            parent.add_argument(f"--{name}", help=helps[name])
    return parent


_READ_FILTERS = (
    "since", "until", "user", "session", "model", "node", "agent", "thread", "run-name",
    "dimension",
)  # fmt: skip
_GROUP_HELP = (
    "one or two of model, user, provider, session, day, node, agent, thread, run_name, "
    "root_run_name, dimension:<key> (e.g. node,model)"
)


def _parser() -> argparse.ArgumentParser:
    reading = _options(*_READ_FILTERS)
    parser = _Parser(
        prog="usage-callbacks", description="Token usage, cost and budgets of LLM applications."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser("summary", parents=[reading], help="totals and percentiles")
    summary.add_argument("--by", type=_group_by, help=_GROUP_HELP)
    summary.add_argument("--json", action="store_true", help="machine-readable output")
    report = commands.add_parser("report", parents=[reading], help="Markdown or HTML report")
    report.add_argument("--out", required=True, type=Path, help="usage.md or usage.html")
    report.add_argument("--by", type=_group_by, help="add a cost breakdown: " + _GROUP_HELP)
    export = commands.add_parser("export", parents=[reading], help="every record, streamed")
    export.add_argument("--format", choices=["csv", "jsonl"], required=True)
    export.add_argument("--out", required=True, type=Path, help="a file, or - for stdout")
    purge = commands.add_parser(
        "purge",
        parents=[reading],
        help="delete old records (narrowed by the filters given)",
    )
    purge.add_argument("--before", required=True, type=_when)
    purge.add_argument("--yes", action="store_true", help="do not ask")
    commands.add_parser(
        "budgets",
        parents=[_options("user", "session", "model")],
        help="spend and headroom this period (--user: that user's rows of per-user budgets)",
    )
    ingest = commands.add_parser("ingest", parents=[_options()], help="load a spill file")
    ingest.add_argument("file", type=Path)
    commands.add_parser("demo", parents=[_options()], help="the offline demo")
    dashboard = commands.add_parser(
        "dashboard", parents=[_options()], help="a local, read-only web page over the database"
    )
    dashboard.add_argument("--port", type=int, default=8765)
    dashboard.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine)")
    dashboard.add_argument(
        "--allow-remote", action="store_true", help="serve on another address (needs --token)"
    )
    dashboard.add_argument("--token", help="a secret every request must carry (?token=...)")
    return parser


def _url(args: argparse.Namespace, *, must_exist: bool) -> str:
    """The database URL, checked; for reading, a SQLite file that exists."""
    import sqlalchemy as sa

    from usage_callbacks.store import resolve_url

    url = resolve_url(args.db)
    if url.startswith("memory://"):
        return url
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise CliError(f"{url!r} is not a database URL; try sqlite:///usage.db") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database)
        if must_exist and not path.exists():
            raise CliError(f"no usage database at {path}; record something first or pass --db")
        if not path.parent.is_dir():
            raise CliError(f"cannot create {path}: no directory {path.parent}")
    return url


def _open(args: argparse.Namespace, *, read_only: bool = True) -> SqlStore:
    """The store behind ``--db``: read-only (no table, no file, no WAL switch) unless
    the command writes."""
    from usage_callbacks.store import SchemaTooNewError, StoreConfigurationError, open_store

    url = _url(args, must_exist=read_only)
    try:
        return open_store(url, read_only=read_only)
    except (StoreConfigurationError, SchemaTooNewError) as error:
        raise CliError(str(error)) from None


def _filter(args: argparse.Namespace) -> UsageFilter:
    """The filters this command accepted (the others are not on its parser)."""
    from usage_callbacks.store import UsageFilter

    names = {
        "user": "user_id",
        "session": "session_id",
        "model": "model",
        "since": "since",
        "until": "until",
        "node": "node",
        "agent": "agent",
        "thread": "thread_id",
        "run_name": "run_name",
    }
    values = {field: getattr(args, name, None) for name, field in names.items()}
    dimensions = getattr(args, "dimension", None)
    return UsageFilter(**values, dimensions=dict(dimensions) if dimensions else None)


@contextmanager
def _output(path: Path, *, newline: str | None = None) -> Iterator[IO[str]]:
    """``path`` for writing (owner-only when new), or stdout for ``-``."""
    from usage_callbacks.files import open_private

    if str(path) == "-":
        yield sys.stdout
        return
    if not path.parent.is_dir():
        raise CliError(f"cannot write {path}: no directory {path.parent}")
    if path.is_dir():
        raise CliError(f"cannot write {path}: it is a directory")
    with open_private(path, newline=newline) as handle:
        yield handle


def _json_default(value: Any) -> str:
    if isinstance(value, (Decimal, datetime)):
        return str(value) if isinstance(value, Decimal) else value.isoformat()
    raise TypeError(type(value).__name__)


# -------------------------------------------------------------------- commands


def _console(out: IO[str]) -> Console:
    """Rich output on ``out``: the terminal's width there; a pipe or file gets ``$COLUMNS``
    or lines wide enough that no row wraps."""
    from rich.console import Console

    fixed = None if out.isatty() or os.environ.get("COLUMNS") else 200
    return Console(file=out, width=fixed, highlight=False)


def _print_table(
    out: IO[str],
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    optional: Sequence[Sequence[str]] = (),
    total_row: Sequence[str] | None = None,
    note: str = "",
) -> None:
    """A table whose first column is a label (folded, never cut) and the rest values (never
    cut); the ``optional`` column groups are left out, in order, until it fits the width."""
    from rich import box
    from rich.table import Table

    console = _console(out)
    every = [*rows, *([total_row] if total_row is not None else [])]
    widths = [
        max([len(name), *(len(row[index]) for row in every)]) for index, name in enumerate(columns)
    ]
    label_width = min(widths[0], _LABEL_MIN_WIDTH)
    hidden: set[str] = set()
    for drop in ((), *optional):
        hidden.update(drop)
        keep = [index for index, name in enumerate(columns) if name not in hidden]
        needed = label_width + sum(widths[index] + _COLUMN_GAP for index in keep[1:])
        if needed <= console.width:
            break
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    table.add_column(columns[0], overflow="fold", min_width=label_width)
    for index in keep[1:]:
        table.add_column(columns[index], justify="right", no_wrap=True, min_width=widths[index])
    for number, row in enumerate(rows):
        last = number == len(rows) - 1 and total_row is not None
        table.add_row(*(row[index] for index in keep), end_section=last)
    if total_row is not None:
        table.add_row(*(total_row[index] for index in keep))
    console.print(table)
    if note:
        console.print(note)


#: A label column folds down to this width at the least; every other column gets a gap
#: of this many spaces.
_LABEL_MIN_WIDTH = 16
_COLUMN_GAP = 2


def cost_text(cost: Decimal, calls: int, unpriced: int) -> str:
    """USD, or ``unknown`` when no call had a price (0.000000 would read as free), or a
    lower bound ``≥`` when some had none."""
    if unpriced and unpriced >= calls:
        return "unknown"
    return f"{'≥' if unpriced else ''}{cost:.6f}"


def cmd_summary(args: argparse.Namespace, out: IO[str]) -> int:
    with _closing(_open(args)) as store:
        summary = store.summary(_filter(args), args.by)
    if args.json:
        json.dump(summary.model_dump(mode="json"), out, indent=2)
        out.write("\n")
        return 0
    groups = list(summary.groups if args.by else [])
    if args.by == "day":
        groups.sort(key=lambda group: group.key or "")
    rows = []
    for group in groups:  # second-level groups indented under their first
        rows.append(_summary_cells(group.key or "-", group))
        rows += [_summary_cells("  " + (inner.key or "-"), inner) for inner in group.groups]
    _print_table(
        out,
        [args.by or "all", *_SUMMARY_COLUMNS],
        rows,
        optional=[("first call", "last call"), ("p50", "p95", "p99"), ("embed", "compl.")],
        total_row=_summary_cells("TOTAL", summary),
        note=f"{summary.unpriced_calls:,} calls have no known price: their cost is not in the "
        "totals (≥); pass prices= to UsageTracker to price them"
        if summary.unpriced_calls
        else "",
    )
    return 0


_SUMMARY_COLUMNS = (
    "calls", "prompt", "compl.", "embed", "total", "cost $", "p50", "p95", "p99", "first call",
    "last call",
)  # fmt: skip


def _summary_cells(label: str, part: Any) -> list[str]:
    """One row: a group or the whole summary (which name their first/last calls apart)."""
    first = getattr(part, "first_call", None) or getattr(part, "period_start", None)
    last = getattr(part, "last_call", None) or getattr(part, "period_end", None)
    usage, stats = part.usage, part.stats
    return [
        label,
        f"{part.calls:,}",
        f"{usage.prompt_tokens:,}",
        f"{usage.completion_tokens:,}",
        f"{usage.embedding_tokens:,}",
        f"{usage.total:,}",
        cost_text(usage.cost_estimate_usd, part.calls, part.unpriced_calls),
        f"{stats.p50:,}",
        f"{stats.p95:,}",
        f"{stats.p99:,}",
        f"{first:%Y-%m-%d %H:%M}" if first else "-",
        f"{last:%Y-%m-%d %H:%M}" if last else "-",
    ]


def cmd_report(args: argparse.Namespace, out: IO[str]) -> int:
    from usage_callbacks.report import gather, html_report, markdown

    suffix = args.out.suffix.lower()
    if suffix not in (".md", ".html", ".htm"):
        raise CliError(f"--out {args.out}: use a .md or .html file name")
    with _closing(_open(args)) as store, _spinner("reading the records"):
        data = gather(store, _filter(args), args.by)
    text = html_report(data) if suffix != ".md" else markdown(data)
    with _output(args.out) as handle:
        handle.write(text)
    print(f"wrote {args.out} ({data.overall.calls:,} calls)", file=out)
    return 0


@contextmanager
def _progress(label: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A progress bar on a terminal's stderr (nothing on a pipe); yields ``show(done)``."""
    if not sys.stderr.isatty():
        yield lambda _done: None
        return
    from rich.progress import Progress

    with Progress(console=_console(sys.stderr), transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda done: progress.update(task, completed=done)


@contextmanager
def _spinner(label: str) -> Iterator[None]:
    """A spinner on a terminal's stderr while one long step runs."""
    with _progress(label, None):
        yield


def _rows(records: Iterator[UsageRecord]) -> Iterator[dict[str, Any]]:
    for record in records:
        yield record.model_dump(mode="json")


def csv_safe(value: Any) -> Any:
    """A text cell a spreadsheet shows as text: one that would start a formula gets a
    leading apostrophe (OWASP's advice for CSV injection)."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def cmd_export(args: argparse.Namespace, out: IO[str]) -> int:
    from usage_callbacks.store.models import RECORD_COLUMNS

    to_stdout = str(args.out) == "-"
    with _closing(_open(args)) as store:
        where = _filter(args)
        total = store.summary(where, None).calls
        done = 0
        with _output(args.out, newline="") as handle, _progress("exporting", total) as show:
            writer = csv.DictWriter(handle, fieldnames=list(RECORD_COLUMNS))
            if args.format == "csv":
                writer.writeheader()
            for row in _rows(store.iter_records(where)):
                if args.format == "csv":
                    row["tags"] = json.dumps(row["tags"])
                    row["dimensions"] = json.dumps(row["dimensions"] or {})
                    writer.writerow({name: csv_safe(value) for name, value in row.items()})
                else:
                    handle.write(json.dumps(row, default=_json_default) + "\n")
                done += 1
                if done % 5000 == 0:
                    show(done)
    print(f"exported {done:,} records to {args.out}", file=sys.stderr if to_stdout else out)
    return 0


def cmd_purge(args: argparse.Namespace, out: IO[str]) -> int:
    from dataclasses import replace

    cutoff = min(args.before, args.until) if args.until else args.before
    where = replace(_filter(args), until=cutoff)
    with _closing(_open(args, read_only=False)) as store:
        doomed = store.summary(where, None).calls
        if not doomed:
            print("nothing to purge", file=out)
            return 0
        if not args.yes:
            if not sys.stdin.isatty():
                raise CliError(f"{doomed:,} records would be deleted; pass --yes to confirm")
            answer = input(
                f"Delete {doomed:,} records that ended before {cutoff:%Y-%m-%d %H:%M} UTC? [y/N] "
            )
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing deleted", file=out)
                return 0
        with _spinner(f"deleting {doomed:,} records"):
            deleted = store.purge(cutoff, where)
    print(f"deleted {deleted:,} records", file=out)
    return 0


def cmd_budgets(args: argparse.Namespace, out: IO[str]) -> int:
    with _closing(_open(args)) as store:
        statuses = store.ledger.overview(datetime.now(timezone.utc))
    wanted = {scope: getattr(args, scope) for scope in ("user", "session", "model")}
    wanted = {scope: key for scope, key in wanted.items() if key is not None}
    if wanted:
        statuses = [s for s in statuses if wanted.get(s.budget.per) == s.key]
    if not statuses:
        print(
            "no budgets recorded here (they are set in code: UsageTracker(budgets=...))"
            if not wanted
            else "no budget rows for " + ", ".join(f"{k} {v}" for k, v in wanted.items()),
            file=out,
        )
        return 0
    rows = []
    for status in statuses:
        budget = status.budget
        resets = (
            f"{status.period_end:%Y-%m-%d %H:%M}"
            if isinstance(budget.period, str)
            else ("rolling" if budget.period else "never")
        )
        left_usd, left_tokens = status.remaining_usd, status.remaining_tokens
        rows.append(
            [
                budget.label,
                status.key,
                f"{status.spent_usd:.6f}",
                f"{status.reserved_usd:.6f}",
                "-" if left_usd is None else f"{left_usd:.6f}",
                f"{status.spent_tokens:,}",
                "-" if left_tokens is None else f"{left_tokens:,}",
                resets,
            ]
        )
    columns = ("budget", "key", "spent $", "held $", "left $", "tokens", "left tok", "resets")
    _print_table(out, columns, rows, optional=[("tokens", "left tok"), ("held $",)])
    return 0


def cmd_ingest(args: argparse.Namespace, out: IO[str]) -> int:
    from usage_callbacks.store.spill import read_records

    if not args.file.exists():
        raise CliError(f"no such file: {args.file}")
    if not args.file.is_file():
        raise CliError(f"{args.file} is not a file; pass a spill file (.jsonl)")
    added = duplicates = 0
    with _closing(_open(args, read_only=False)) as store:

        def write(batch: list[UsageRecord]) -> None:
            nonlocal added, duplicates
            stored = store.stored_ids([record.id for record in batch])
            store.write([record for record in batch if record.id not in stored])
            added += len(batch) - len(stored)
            duplicates += len(stored)

        batch: list[UsageRecord] = []
        with _progress(f"ingesting {args.file.name}", None) as show:
            for record in read_records(args.file):
                batch.append(record)
                if len(batch) >= 1000:
                    write(batch)
                    batch = []
                    show(added + duplicates)
            if batch:
                write(batch)
    already = f" ({duplicates:,} already stored, skipped)" if duplicates else ""
    print(f"ingested {added:,} new records from {args.file}{already}", file=out)
    return 0


def cmd_demo(args: argparse.Namespace, out: IO[str]) -> int:
    from usage_callbacks.demo import main as demo

    _url(args, must_exist=False)
    return demo(args.db)


def cmd_dashboard(args: argparse.Namespace, out: IO[str]) -> int:
    from usage_callbacks.dashboard import DashboardConfigurationError, check_bind, make_server

    try:
        check_bind(args.host, allow_remote=args.allow_remote, token=args.token)
    except DashboardConfigurationError as error:
        raise CliError(str(error)) from None
    with _closing(_open(args)) as store:
        server = make_server(store, args.host, args.port, args.token)
        host, port = str(server.server_address[0]), server.server_address[1]
        suffix = "/?token=..." if args.token else "/"
        print(f"dashboard on http://{host}:{port}{suffix} (read-only; Ctrl-C stops)", file=out)
        out.flush()
        try:
            server.serve_forever()
        finally:
            server.server_close()
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, IO[str]], int]] = {
    "summary": cmd_summary,
    "report": cmd_report,
    "export": cmd_export,
    "purge": cmd_purge,
    "budgets": cmd_budgets,
    "ingest": cmd_ingest,
    "demo": cmd_demo,
    "dashboard": cmd_dashboard,
}


@contextmanager
def _closing(store: SqlStore) -> Iterator[SqlStore]:
    try:
        yield store
    finally:
        store.close()


def _one_line(error: Exception) -> str | None:
    """A failure the user can act on, said in one line (no SQL, no parameters); None for
    a bug, which keeps its traceback."""
    import sqlalchemy as sa

    if isinstance(error, sa.exc.SQLAlchemyError):
        cause = getattr(error, "orig", None) or error
        first = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        if "malformed" in first or "not a database" in first:
            return f"the database is damaged ({first}); restore it from a backup"
        return f"the database failed: {first}"
    if isinstance(error, OSError):
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror or error}{where}"
    return None


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
    except Exception as error:  # database and file failures become one line; bugs re-raise
        message = _one_line(error)
        if message is None:
            raise
        print(f"usage-callbacks: {message}", file=sys.stderr)
        return EXIT_USAGE
