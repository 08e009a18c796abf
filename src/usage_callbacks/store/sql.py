"""The SQLModel store: SQLite (WAL, shared by processes) or PostgreSQL (shared by hosts)."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Engine
from sqlalchemy.pool import StaticPool
from sqlmodel import Session, SQLModel, select

from usage_callbacks.attribution import check_dimension_keys
from usage_callbacks.store.base import (
    DIMENSION_PREFIX,
    GROUP_COLUMNS,
    DailyUsage,
    GroupBy,
    GroupSummary,
    TokenStats,
    UsageFilter,
    UsageSummary,
    group_levels,
)
from usage_callbacks.store.ledger import BudgetLedger
from usage_callbacks.store.models import (
    SCHEMA_VERSION,
    USAGE_COLUMNS,
    SchemaInfo,
    UsageRecord,
    pico_to_usd,
)
from usage_callbacks.store.sqlite_insert import SqliteBulkInsert
from usage_callbacks.usage import TokenUsage

logger = logging.getLogger("usage_callbacks")

_SQLITE_BUSY_TIMEOUT_MS = 30_000
_SCHEMA_LOCK_ID = 0x75736167655F6362  # "usage_cb": serializes schema changes on PostgreSQL
_PERCENTILES = (50, 95, 99)
#: Below this many rows one summary query is done before threads would have started.
_PARALLEL_SUMMARY_ROWS = 200_000
#: More threads than this gain nothing on the machines we measured (and cost memory).
_MAX_SUMMARY_THREADS = 4
_ROWID: sa.ColumnClause[int] = sa.literal_column("rowid", sa.Integer)


class StoreConfigurationError(ValueError):
    """The database URL cannot be used; the message says what to write instead."""


class SchemaTooNewError(RuntimeError):
    """The database was written by a newer usage-callbacks."""


#: A server that stops answering (a black-holed route, not a refusal) fails a connection
#: attempt after 5 s and an unacknowledged send after 10 s, instead of blocking reserve()
#: and the writer for minutes; then budget_failure_mode decides. Query parameters of the
#: URL win (``?connect_timeout=30``).
_PG_TIMEOUTS: dict[str, Any] = {
    "connect_timeout": 5,
    "tcp_user_timeout": 10_000,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
}
_PG_POOL_TIMEOUT_S = 10


def create_engine_for(url: str) -> Engine:
    """An engine tuned for the ledger: WAL + busy timeout on SQLite, pre-ping on servers."""
    if url.startswith("memory://"):
        # One shared in-memory connection; the store serializes access to it.
        engine = sa.create_engine(
            "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
    else:
        try:
            parsed = sa.engine.make_url(url)
        except sa.exc.ArgumentError as error:
            raise StoreConfigurationError(
                f"{url!r} is not a database URL; use sqlite:///usage.db, "
                "postgresql+psycopg://user@host/db or memory://"
            ) from error
        if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if parsed.get_backend_name() == "postgresql":
            kwargs["pool_timeout"] = _PG_POOL_TIMEOUT_S
            kwargs["connect_args"] = {
                name: value for name, value in _PG_TIMEOUTS.items() if name not in parsed.query
            }
        if parsed.get_backend_name() == "sqlite":
            kwargs = {"connect_args": {"check_same_thread": False, "timeout": 30}}
        try:
            engine = sa.create_engine(parsed, **kwargs)
        except (ImportError, sa.exc.NoSuchModuleError) as error:
            raise StoreConfigurationError(
                f"cannot open {url!r}: {error}. For PostgreSQL install "
                "`usage-callbacks[postgres]` and use postgresql+psycopg://..."
            ) from error
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's implicit transactions break BEGIN IMMEDIATE; take control of them.
        sa.event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_begin(connection: sa.Connection) -> None:
    mode = connection.info.pop("begin_mode", "")
    connection.exec_driver_sql(f"BEGIN {mode}".strip())


class SqlStore:
    """UsageStore over SQLModel; safe to share between threads and processes."""

    #: Serializes access where the backend cannot (the shared in-memory connection).
    lock: AbstractContextManager[object] = nullcontext()

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine_for(url)
        self.dialect = self.engine.dialect.name
        self._ensure_schema()
        self.ledger = BudgetLedger(self.engine, self.lock)
        self._bulk_insert = (
            SqliteBulkInsert(self.engine.dialect) if self.dialect == "sqlite" else None
        )

    # ------------------------------------------------------------------ schema

    @contextmanager
    def _schema_change(self) -> Iterator[sa.Connection]:
        """A transaction that changes the schema, one process at a time."""
        with self.lock, self.engine.connect() as connection:
            if self.dialect == "sqlite":
                connection.info["begin_mode"] = "IMMEDIATE"
            with connection.begin():
                if self.dialect == "postgresql":
                    connection.execute(
                        sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _SCHEMA_LOCK_ID}
                    )
                yield connection

    def _ensure_schema(self) -> None:
        """Create or upgrade the tables, one process at a time."""
        try:
            with self._schema_change() as connection:
                self._migrate(connection)
        except sa.exc.DatabaseError as error:
            raise StoreConfigurationError(
                f"cannot use {self._safe_url()} as a usage database: {error.orig}"
            ) from error

    def _migrate(self, connection: sa.Connection) -> None:
        had_records = sa.inspect(connection).has_table("usage_records")
        SQLModel.metadata.create_all(connection)
        schema = SchemaInfo.__table__  # type: ignore[attr-defined]
        stored = connection.execute(sa.select(schema.c.version).where(schema.c.id == 1)).scalar()
        version = stored if stored is not None else (0 if had_records else SCHEMA_VERSION)
        if version > SCHEMA_VERSION:
            raise SchemaTooNewError(
                f"{self._safe_url()} holds usage-callbacks schema v{version}; "
                f"this version reads v{SCHEMA_VERSION}. Upgrade usage-callbacks."
            )
        if version < SCHEMA_VERSION:
            added = _add_missing_columns(connection)
            _create_missing_indexes(connection)
            _widen_text_columns(connection)
            logger.warning(
                "upgraded %s from schema v%d to v%d (added %s)",
                self._safe_url(),
                version,
                SCHEMA_VERSION,
                ", ".join(added) or "nothing",
            )
        table = SchemaInfo.__table__  # type: ignore[attr-defined]
        if stored is None:
            connection.execute(sa.insert(table).values(id=1, version=SCHEMA_VERSION))
        elif stored != SCHEMA_VERSION:
            connection.execute(sa.update(table).values(version=SCHEMA_VERSION))

    def _safe_url(self) -> str:
        if self.url.startswith("memory://"):
            return self.url
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    # ------------------------------------------------------------------ writes

    def write(self, records: Sequence[UsageRecord]) -> None:
        if not records:
            return
        with self.engine.begin() as connection:
            if self._bulk_insert is not None:
                self._bulk_insert.execute(connection, records)
                return
            table = UsageRecord.__table__  # type: ignore[attr-defined]
            statement = postgresql.insert(table).on_conflict_do_nothing(index_elements=["id"])
            connection.execute(statement, [record.row() for record in records])

    def index_dimensions(self, keys: Sequence[str]) -> None:
        """An index per declared dimension, so filters by its value seek, not scan.

        Partial (only rows with dimensions), on the very expression filters use.
        """
        table = UsageRecord.__table__  # type: ignore[attr-defined]
        with self._schema_change() as connection:
            for key in check_dimension_keys(keys):
                expression = self._dimension_sql(key)
                connection.exec_driver_sql(
                    f"CREATE INDEX IF NOT EXISTS ix_usage_records_dim_{key} ON "
                    f"{table.name} (({expression}), ended_at) WHERE dimensions IS NOT NULL"
                )

    def _dimension_sql(self, key: str) -> str:
        """The text of a dimension's value, as SQL; ``key`` is a checked identifier, and
        the path is a literal so that the planner matches the expression index."""
        if self.dialect == "postgresql":
            return f"dimensions ->> '{key}'"
        return f"json_extract(dimensions, '$.{key}')"

    def _dimension_column(self, key: str) -> sa.ColumnElement[Any]:
        return sa.literal_column(f"({self._dimension_sql(key)})", sa.String)

    def purge(self, before: datetime, where: UsageFilter | None = None) -> int:
        table = UsageRecord.__table__  # type: ignore[attr-defined]
        statement = self._where(sa.delete(table), where or UsageFilter())
        with self.engine.begin() as connection:
            result = connection.execute(statement.where(table.c.ended_at < before))
            return int(result.rowcount or 0)

    # ------------------------------------------------------------------ reads

    def records(
        self, where: UsageFilter, limit: int | None = None, newest_first: bool = False
    ) -> list[UsageRecord]:
        order = (UsageRecord.ended_at, UsageRecord.id)
        statement = self._where(select(UsageRecord), where).order_by(
            *(sa.desc(column) for column in order) if newest_first else order  # type: ignore[arg-type]
        )
        if limit is not None:
            statement = statement.limit(limit)
        with Session(self.engine, expire_on_commit=False) as session:
            return list(session.exec(statement))

    def daily_by_model(self, where: UsageFilter) -> list[DailyUsage]:
        """Spend and tokens per UTC day and model, for charts."""
        c = UsageRecord.__table__.c  # type: ignore[attr-defined]
        day = self._group_column("day")
        query = (
            self._where(
                sa.select(
                    day,
                    c.model,
                    sa.func.sum(sa.type_coerce(c.cost_estimate_usd, sa.BigInteger)).label("pico"),
                    *(sa.func.sum(c[name]).label(name) for name in _SUMMED[:-1]),
                ),
                where,
            )
            .group_by(day, c.model)
            .order_by(day, c.model)
        )
        with self.engine.connect() as connection:
            return [
                DailyUsage(
                    day=str(row["group_key"]),
                    model=row["model"] or "unknown",
                    usage=_summed_usage(row, "pico", estimated=False),
                )
                for row in connection.execute(query).mappings()
            ]

    def iter_records(self, where: UsageFilter, chunk_size: int = 1000) -> Iterator[UsageRecord]:
        statement = self._where(select(UsageRecord), where).order_by(
            UsageRecord.ended_at,
            UsageRecord.id,
        )
        with Session(self.engine) as session:
            result = session.exec(statement.execution_options(yield_per=chunk_size))
            for record in result:
                session.expunge(record)
                yield record

    def _where(self, statement: Any, where: UsageFilter) -> Any:
        columns = UsageRecord.__table__.c  # type: ignore[attr-defined]
        for name in _FILTER_COLUMNS:
            value = getattr(where, name)
            if value is not None:
                statement = statement.where(columns[name] == value)
        if where.dimensions:
            statement = statement.where(columns.dimensions.is_not(None))
            for key, value in where.dimensions.items():
                statement = statement.where(self._dimension_column(key) == value)
        if where.since is not None:
            statement = statement.where(columns.ended_at >= where.since)
        if where.until is not None:
            statement = statement.where(columns.ended_at < where.until)
        return statement

    def _group_column(self, level: str | None, index: int = 0) -> sa.ColumnElement[Any]:
        columns = UsageRecord.__table__.c  # type: ignore[attr-defined]
        label = f"group_key{index or ''}"
        if level is None:
            return sa.literal("all").label(label)
        if level == "day":
            if self.dialect == "sqlite":
                return sa.func.date(columns.ended_at).label(label)
            return sa.cast(sa.cast(columns.ended_at, sa.Date), sa.String).label(label)
        if level.startswith(DIMENSION_PREFIX):
            return self._dimension_column(level.removeprefix(DIMENSION_PREFIX)).label(label)
        column: sa.ColumnElement[Any] = columns[GROUP_COLUMNS[level]]
        return column.label(label)

    def _group_columns(self, levels: tuple[str, ...]) -> list[sa.ColumnElement[Any]]:
        if not levels:
            return [self._group_column(None)]
        return [self._group_column(level, index) for index, level in enumerate(levels)]

    def summary(self, where: UsageFilter, group_by: GroupBy | None) -> UsageSummary:
        """Totals, groups and token percentiles from one aggregate query.

        The overall line is merged from the groups' sums and histograms, so grouping
        costs no extra pass over the table. Two levels (``"node,model"``) are grouped
        in the same query; the first level's groups are folded from the second's.
        """
        levels = group_levels(group_by)
        groups, histograms = self._grouped(where, levels)
        name = ",".join(levels) or None
        if not groups:
            return UsageSummary(group_by=name)
        merged: Counter[int] = Counter()
        for histogram in histograms:
            for value, count in histogram:
                merged[value] += count
        usage = sum((group.usage for group in groups), TokenUsage())
        calls = sum(group.calls for group in groups)
        return UsageSummary(
            group_by=name,
            usage=usage,
            calls=calls,
            errors=sum(group.errors for group in groups),
            stats=_token_stats(list(merged.items()), calls, usage.total),
            period_start=min(g.first_call for g in groups if g.first_call),
            period_end=max(g.last_call for g in groups if g.last_call),
            groups=groups if levels else [],
        )

    def _grouped(
        self, where: UsageFilter, levels: tuple[str, ...]
    ) -> tuple[list[GroupSummary], list[list[tuple[int, int]]]]:
        """Groups (largest cost first) with their histograms of per-call totals.

        Percentiles come from the histogram (one row per distinct total per group), which
        is several times faster than ranking every row with window functions.
        """
        if self.dialect == "sqlite":
            sums, histograms = self._sqlite_group_rows(where, levels)
        else:
            sums, histograms = self._server_group_rows(where, levels)
        if len(levels) < 2:
            pairs = [_fold_group(key[0], rows, histograms[key]) for key, rows in sums.items()]
            return _largest_first(pairs)
        outer_rows: dict[Any, list[Sequence[Any]]] = {}
        outer_histograms: dict[Any, list[tuple[int, int]]] = {}
        inner: dict[Any, list[tuple[GroupSummary, list[tuple[int, int]]]]] = {}
        for (outer, key), rows in sums.items():
            outer_rows.setdefault(outer, []).extend(rows)
            outer_histograms.setdefault(outer, []).extend(histograms[(outer, key)])
            inner.setdefault(outer, []).append(_fold_group(key, rows, histograms[(outer, key)]))
        pairs = []
        for outer, rows in outer_rows.items():
            summary, histogram = _fold_group(outer, rows, outer_histograms[outer])
            summary.groups = _largest_first(inner[outer])[0]
            pairs.append((summary, histogram))
        return _largest_first(pairs)

    def _sqlite_group_rows(self, where: UsageFilter, levels: tuple[str, ...]) -> _GroupRows:
        """One pass grouped by (total_tokens, group) carries every sum.

        SQLite sorts every row for a GROUP BY; two passes (sums, then histogram) paid
        for that twice. total_tokens leads: the sorter compares an integer key faster.
        """
        c = UsageRecord.__table__.c  # type: ignore[attr-defined]
        groups = self._group_columns(levels)
        width = len(groups)
        query = self._where(sa.select(*groups, *_sum_columns(), c.total_tokens), where).group_by(
            c.total_tokens, *groups
        )
        sums: dict[Any, list[Sequence[Any]]] = {}
        histograms: dict[Any, list[tuple[int, int]]] = {}
        for rows in self._fetch_grouped_rows(query, where):
            for row in rows:
                key = tuple(row[:width])
                sums.setdefault(key, []).append(row[width:])
                histograms.setdefault(key, []).append((int(row[-1]), int(row[width])))
        return sums, histograms

    def _server_group_rows(self, where: UsageFilter, levels: tuple[str, ...]) -> _GroupRows:
        """Sums per group, then a histogram: PostgreSQL hashes both, whereas one pass
        carrying the sums per (total_tokens, group) sorted (and spilled) instead."""
        c = UsageRecord.__table__.c  # type: ignore[attr-defined]
        groups = self._group_columns(levels)
        width = len(groups)
        sums_query = self._where(sa.select(*groups, *_sum_columns()), where).group_by(*groups)
        histogram_query = self._where(
            sa.select(*groups, c.total_tokens, sa.func.count()), where
        ).group_by(*groups, c.total_tokens)
        histograms: dict[Any, list[tuple[int, int]]] = {}
        with self.engine.connect() as connection:
            sums: dict[Any, list[Sequence[Any]]] = {
                tuple(row[:width]): [row[width:]] for row in connection.execute(sums_query)
            }
            for row in connection.execute(histogram_query):
                histograms.setdefault(tuple(row[:width]), []).append(
                    (int(row[width]), int(row[width + 1]))
                )
        return sums, histograms

    def _fetch_grouped_rows(self, query: Any, where: UsageFilter) -> list[Sequence[Any]]:
        """The query's rows, from several threads over rowid ranges of a large SQLite file.

        A query runs on one core; sqlite3 releases the GIL while it steps, so ranges
        on their own connections aggregate in parallel and their rows fold like any
        other rows of the same group.
        """
        with self.engine.connect() as connection:
            ranges = self._rowid_ranges(connection, where)
            if not ranges:
                return [connection.execute(query).all()]
        ranged = query.where(_ROWID.between(sa.bindparam("low"), sa.bindparam("high")))

        def fetch(bounds: tuple[int, int]) -> Sequence[Any]:
            with self.engine.connect() as connection:
                low, high = bounds
                return connection.execute(ranged, {"low": low, "high": high}).all()

        with ThreadPoolExecutor(len(ranges)) as pool:
            return list(pool.map(fetch, ranges))

    def _rowid_ranges(self, connection: sa.Connection, where: UsageFilter) -> list[tuple[int, int]]:
        """Equal inclusive rowid ranges, one per core, or none where splitting would not pay.

        Not for in-memory SQLite (one connection), small tables or periods, or filters
        an index narrows (user, session, model, attribution): there the index beats
        scanning ranges.
        """
        workers = min(_available_cpus(), _MAX_SUMMARY_THREADS)
        if (
            workers < 2
            or self.dialect != "sqlite"
            or not isinstance(self.engine.pool, sa.pool.QueuePool)
            or where.dimensions
            or any(getattr(where, name) is not None for name in _INDEXED_FILTERS)
        ):
            return []
        table = UsageRecord.__table__  # type: ignore[attr-defined]
        # one subquery each: SQLite seeks a lone min() or max(), but scans for both
        low, high = connection.execute(
            sa.select(
                *(
                    sa.select(bound(_ROWID)).select_from(table).scalar_subquery()
                    for bound in (sa.func.min, sa.func.max)
                )
            )
        ).one()
        if low is None or high - low < _PARALLEL_SUMMARY_ROWS:
            return []
        if (where.since or where.until) and self._count_in_period(
            connection, where
        ) < _PARALLEL_SUMMARY_ROWS:
            return []  # a short period: its ended_at index range beats scanning every row
        step = -(-(high + 1 - low) // workers)
        return [(start, start + step - 1) for start in range(low, high + 1, step)]

    def _count_in_period(self, connection: sa.Connection, where: UsageFilter) -> int:
        """Records in the since/until period, counted from the ended_at index alone."""
        period = UsageFilter(since=where.since, until=where.until)
        table = UsageRecord.__table__  # type: ignore[attr-defined]
        query = self._where(sa.select(sa.func.count()).select_from(table), period)
        return int(connection.execute(query).scalar_one())

    def close(self) -> None:
        self.engine.dispose()


#: Rows of aggregates per group key tuple (see _sum_columns), and (total_tokens, calls)
#: pairs.
_GroupRows = tuple[dict[Any, list[Sequence[Any]]], dict[Any, list[tuple[int, int]]]]
#: Filters that compare a column; all but provider have an index.
_FILTER_COLUMNS = (
    "user_id",
    "session_id",
    "model",
    "provider",
    "node",
    "agent",
    "thread_id",
    "run_name",
    "root_run_name",
)
_INDEXED_FILTERS = tuple(name for name in _FILTER_COLUMNS if name != "provider")


def _largest_first(
    pairs: list[tuple[GroupSummary, list[tuple[int, int]]]],
) -> tuple[list[GroupSummary], list[list[tuple[int, int]]]]:
    pairs.sort(key=lambda pair: (-pair[0].usage.cost_estimate_usd, pair[0].key or ""))
    return [summary for summary, _ in pairs], [histogram for _, histogram in pairs]


def _sum_columns() -> list[sa.ColumnElement[Any]]:
    """calls, the usage sums, any estimated, errors, first and last call.

    first/last come back as stored (text on SQLite), not parsed for every row.
    """
    c = UsageRecord.__table__.c  # type: ignore[attr-defined]
    return [
        sa.func.count(),
        *(sa.func.sum(c[name]) for name in _SUMMED[:-1]),
        # sum exact integer pico-USD, not the Decimal the column type returns
        sa.func.sum(sa.type_coerce(c.cost_estimate_usd, sa.BigInteger)),
        sa.func.max(sa.case((c.estimated, 1), else_=0)),
        sa.func.sum(sa.case((c.status != "ok", 1), else_=0)),
        sa.type_coerce(sa.func.min(c.ended_at), sa.String),
        sa.type_coerce(sa.func.max(c.ended_at), sa.String),
    ]


def _fold_group(
    key: Any, rows: list[Sequence[Any]], histogram: list[tuple[int, int]]
) -> tuple[GroupSummary, list[tuple[int, int]]]:
    """One group's summary from its rows of (*_sum_columns(), ...); columns are
    summed by builtins, not row by row (100k rows per run grouping 1M calls by user)."""
    calls, *columns = zip(*rows, strict=True)
    width = len(_SUMMED)
    estimated, errors, first, last = columns[width : width + 4]
    usage = _summed_usage(
        {
            name: sum(filter(None, column))
            for name, column in zip(_SUMMED, columns[:width], strict=True)
        },
        "cost_estimate_usd",
        estimated=any(estimated),
    )
    total_calls = int(sum(calls))
    summary = GroupSummary(
        key=None if key is None else str(key),
        usage=usage,
        calls=total_calls,
        errors=int(sum(filter(None, errors))),
        stats=_token_stats(histogram, total_calls, usage.total),
        # text on SQLite, whose fixed-width timestamps compare in time order
        first_call=_aware(min(filter(None, first), default=None)),
        last_call=_aware(max(filter(None, last), default=None)),
    )
    return summary, histogram


def _available_cpus() -> int:
    """Cores this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


#: Summed per group; cost last (it is summed as integer pico-USD).
_SUMMED = USAGE_COLUMNS[: USAGE_COLUMNS.index("cost_estimate_usd") + 1]


def _summed_usage(row: Any, pico_column: str, *, estimated: bool) -> TokenUsage:
    """A TokenUsage from a row of SQL sums (integer pico-USD for the cost)."""
    counts: dict[str, Any] = {name: int(row[name] or 0) for name in _SUMMED[:-1]}
    return TokenUsage.model_construct(
        **counts, cost_estimate_usd=pico_to_usd(row[pico_column]), estimated=estimated
    )


def _token_stats(histogram: list[tuple[int, int]], calls: int, total: int) -> TokenStats:
    """Nearest-rank percentiles (the ceil(p% * n)-th smallest) from (value, count) pairs."""
    if not histogram or calls == 0:
        return TokenStats()
    histogram.sort()
    ranks = {p: -(-calls * p // 100) for p in _PERCENTILES}
    found: dict[int, int] = {}
    seen = 0
    for value, count in histogram:
        seen += count
        for p, rank in ranks.items():
            if p not in found and seen >= rank:
                found[p] = value
    return TokenStats(
        count=calls,
        avg=total / calls,
        min=histogram[0][0],
        max=histogram[-1][0],
        p50=found[50],
        p95=found[95],
        p99=found[99],
    )


def _add_missing_columns(connection: sa.Connection) -> list[str]:
    """Bring tables written by an older version up to date: add the columns they lack.

    Every column added since the first release has a default, which fills the old rows.
    """
    inspector = sa.inspect(connection)
    added = []
    preparer = connection.dialect.identifier_preparer
    for table in SQLModel.metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            ddl_type = column.type.compile(dialect=connection.dialect)
            default = getattr(column.default, "arg", None)
            clause = ""
            if default is not None and not callable(default):
                literal = sa.literal(default, column.type).compile(
                    dialect=connection.dialect, compile_kwargs={"literal_binds": True}
                )
                clause = f" NOT NULL DEFAULT {literal}"
            connection.exec_driver_sql(
                f"ALTER TABLE {preparer.quote(table.name)} "
                f"ADD COLUMN {preparer.quote(column.name)} {ddl_type}{clause}"
            )
            added.append(f"{table.name}.{column.name}")
    return added


def _create_missing_indexes(connection: sa.Connection) -> None:
    """Indexes added since the tables were made (create_all makes them only with a table)."""
    for table in SQLModel.metadata.sorted_tables:
        for index in table.indexes:
            index.create(connection, checkfirst=True)


def _widen_text_columns(connection: sa.Connection) -> None:
    """Text columns made wider since the tables were made (PostgreSQL enforces widths;
    SQLite does not)."""
    if connection.dialect.name != "postgresql":
        return
    inspector = sa.inspect(connection)
    preparer = connection.dialect.identifier_preparer
    for table in SQLModel.metadata.sorted_tables:
        present = {column["name"]: column["type"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            width = getattr(column.type, "length", None)
            stored = getattr(present.get(column.name), "length", None)
            if width and stored and stored < width:
                connection.exec_driver_sql(
                    f"ALTER TABLE {preparer.quote(table.name)} ALTER COLUMN "
                    f"{preparer.quote(column.name)} TYPE VARCHAR({width})"
                )


def _aware(value: Any) -> datetime | None:
    """min()/max() over a subquery lose the column type on SQLite; restore UTC datetimes."""
    if value is None:
        return None
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    assert isinstance(moment, datetime)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
