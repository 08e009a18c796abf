"""The SQLModel store: SQLite (WAL, shared by processes) or PostgreSQL (shared by hosts)."""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.pool import StaticPool
from sqlmodel import SQLModel

from usage_callbacks.attribution import check_dimension_keys
from usage_callbacks.files import create_private
from usage_callbacks.store.base import (
    DIMENSION_PREFIX,
    GROUP_COLUMNS,
    Breakdown,
    DailyUsage,
    GroupBy,
    GroupSummary,
    GroupTotals,
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
    records_table,
)
from usage_callbacks.store.sqlite_insert import SqliteBulkInsert
from usage_callbacks.usage import MAX_TOKENS_PER_CALL, TokenUsage

logger = logging.getLogger("usage_callbacks")

_SQLITE_BUSY_TIMEOUT_MS = 30_000
_SCHEMA_LOCK_ID = 0x75736167655F6362  # "usage_cb": serializes schema changes on PostgreSQL
_PERCENTILES = (50, 95, 99)
#: Below this many rows one summary query is done before threads would have started.
_PARALLEL_SUMMARY_ROWS = 200_000
#: More threads than this gain nothing on the machines we measured (and cost memory).
_MAX_SUMMARY_THREADS = 4
#: What a read returns (see SqlStore._read_valid).
_Read = TypeVar("_Read")
_ROWID: sa.ColumnClause[int] = sa.literal_column("rowid", sa.Integer)


class DatabaseFileLost(OSError):
    """The SQLite database file was deleted while in use; the write is to be retried."""


def _database_file(engine: Engine) -> Path | None:
    """The SQLite database file, when the store writes to one."""
    url = engine.url
    if engine.dialect.name != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    if url.database.startswith("file:") or url.query.get("uri"):
        return None  # a URI: maybe shared memory; not a path to watch
    return Path(url.database).absolute()


def _identity(path: Path | None) -> tuple[int, int] | None:
    """Device and inode of ``path``: a deleted or replaced file changes it."""
    if path is None:
        return None
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


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


class _BadRows(Exception):
    """Some stored rows break TokenUsage's rules (or their sums overflow SQLite's integers)."""


def create_engine_for(url: str, *, read_only: bool = False) -> Engine:
    """An engine tuned for the ledger: WAL + busy timeout on SQLite, pre-ping on servers.

    ``read_only`` engines never write: SQLite connections are ``query_only`` (no file
    created, no WAL switch), PostgreSQL sessions default to read-only transactions.
    """
    if url.startswith("memory://"):
        # One shared in-memory connection; the store serializes access to it.
        engine = sa.create_engine(
            "sqlite://",
            poolclass=StaticPool,
            connect_args={"check_same_thread": False},
            hide_parameters=True,
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
            path = parsed.database
            if path and path != ":memory:":
                if read_only:
                    kwargs["creator"] = _read_only_sqlite(path)
                else:
                    create_private(Path(path))
        elif read_only and parsed.get_backend_name() == "postgresql":
            kwargs["connect_args"]["options"] = "-c default_transaction_read_only=on"
        try:
            # errors never quote the values (user ids, sessions) they failed with
            engine = sa.create_engine(parsed, hide_parameters=True, **kwargs)
        except (ImportError, sa.exc.NoSuchModuleError) as error:
            raise StoreConfigurationError(
                f"cannot open {url!r}: {error}. For PostgreSQL install "
                "`usage-callbacks[postgres]` and use postgresql+psycopg://..."
            ) from error
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_busy_timeout if read_only else _sqlite_pragmas)
        # pysqlite's implicit transactions break BEGIN IMMEDIATE; take control of them.
        sa.event.listen(engine, "begin", _sqlite_begin)
    return engine


def _read_only_sqlite(path: str) -> Any:
    """A connection factory for reading ``path``: never creates the file (``mode=rw``),
    and ``query_only`` refuses every write. Not ``mode=ro``: a read-only connection
    cannot remove the -wal and -shm files it opens beside a WAL database."""
    uri = f"{Path(path).resolve().as_uri()}?mode=rw"

    def connect() -> sqlite3.Connection:
        connection = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=30)
        connection.execute("PRAGMA query_only=ON")
        return connection

    return connect


def _sqlite_busy_timeout(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None
    dbapi_connection.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")


def _sqlite_pragmas(dbapi_connection: Any, record: Any) -> None:
    _sqlite_busy_timeout(dbapi_connection, record)
    cursor = dbapi_connection.cursor()
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

    def __init__(self, url: str, *, read_only: bool = False) -> None:
        self.url = url
        self.read_only = read_only
        self.engine = create_engine_for(url, read_only=read_only)
        self.dialect = self.engine.dialect.name
        if read_only:
            self._check_schema()
        else:
            self._ensure_schema()
        self._file = _database_file(self.engine)
        self._file_identity = _identity(self._file)
        self._index_mismatch_told = False
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

    def _check_schema(self) -> None:
        """A read-only store opens only a usage database this version reads as it is."""
        try:
            with self.engine.connect() as connection:
                inspector = sa.inspect(connection)
                missing = [
                    table.name
                    for table in SQLModel.metadata.sorted_tables
                    if not inspector.has_table(table.name)
                ]
                if "usage_records" in missing:
                    raise StoreConfigurationError(
                        f"{self._safe_url()} is not a usage-callbacks database (no usage_records)"
                    )
                schema = SchemaInfo.__table__  # type: ignore[attr-defined]
                version = connection.execute(sa.select(schema.c.version)).scalar()
        except sa.exc.DatabaseError as error:
            raise StoreConfigurationError(
                f"cannot use {self._safe_url()} as a usage database: {error.orig}"
            ) from error
        if version is not None and version > SCHEMA_VERSION:
            raise SchemaTooNewError(
                f"{self._safe_url()} holds usage-callbacks schema v{version}; "
                f"this version reads v{SCHEMA_VERSION}. Upgrade usage-callbacks."
            )
        if missing or version != SCHEMA_VERSION:
            raise StoreConfigurationError(
                f"{self._safe_url()} was written by an older usage-callbacks; open it once "
                "with UsageTracker (which upgrades it) before reading it here"
            )

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

    @property
    def identity(self) -> str | None:
        """The database the records go to, naming its spill folder; None when they do
        not outlive the process (``memory://``, an in-memory or URI SQLite database)."""
        if self.dialect == "sqlite":
            return None if self._file is None else f"sqlite:{self._file}"
        return self._safe_url()

    def _safe_url(self) -> str:
        if self.url.startswith("memory://"):
            return self.url
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    # ------------------------------------------------------------------ writes

    def write(self, records: Sequence[UsageRecord]) -> None:
        if not records:
            return
        if self._file is not None:
            self._check_file()
        with self.engine.begin() as connection:
            if self._bulk_insert is not None:
                self._bulk_insert.execute(connection, records)
            else:
                table = records_table
                statement = postgresql.insert(table).on_conflict_do_nothing(index_elements=["id"])
                connection.execute(statement, [record.row() for record in records])
        if self._file is not None and _identity(self._file) != self._file_identity:
            self._check_file()
            raise DatabaseFileLost(f"{self._file} was deleted while written to; writing again")

    def _check_file(self) -> None:
        """Raise DatabaseFileLost when the SQLite file was deleted with its directory;
        create it anew when only the file was deleted or it was replaced.

        Why: open connections keep writing to a deleted file, and every row is lost
        with it (6,000 of 6,000, with no error, before this check).
        """
        assert self._file is not None
        identity = _identity(self._file)
        if identity is not None and identity == self._file_identity:
            return
        self.engine.dispose()  # connections to the old file
        if not self._file.parent.is_dir():
            raise DatabaseFileLost(
                f"{self._file} was deleted with its directory; records wait in memory, then in "
                "the spill file, and are written once the directory exists again"
            )
        try:
            self._ensure_schema()
        except StoreConfigurationError as error:  # not the records' fault: retry them
            raise DatabaseFileLost(str(error)) from error
        self._file_identity = _identity(self._file)
        logger.error(
            "%s was %s; created it anew for the records that follow",
            self._file,
            "deleted" if identity is None else "replaced",
        )

    def index_dimensions(self, keys: Sequence[str]) -> None:
        """An index per declared dimension, so filters by its value seek, not scan.

        Partial (only rows with dimensions), on the very expression filters use.
        """
        table = records_table
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

    def stored_ids(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` are stored already."""
        column = records_table.c.id
        with self.lock, self.engine.connect() as connection:
            return set(connection.execute(sa.select(column).where(column.in_(ids))).scalars())

    def purge(self, before: datetime, where: UsageFilter | None = None) -> int:
        table = records_table
        statement = self._where(sa.delete(table), where or UsageFilter())
        with self.engine.begin() as connection:
            result = connection.execute(statement.where(table.c.ended_at < before))
            return int(result.rowcount or 0)

    # ------------------------------------------------------------------ reads

    def records(
        self, where: UsageFilter, limit: int | None = None, newest_first: bool = False
    ) -> list[UsageRecord]:
        c = records_table.c
        order = (c.ended_at, c.id)
        statement = self._where(sa.select(records_table), where).order_by(
            *(sa.desc(column) for column in order) if newest_first else order
        )
        if limit is not None:
            statement = statement.limit(limit)
        return self._read(statement)

    def _read(self, statement: sa.Select[Any]) -> list[UsageRecord]:
        with self.lock, self.engine.connect() as connection:
            return [_record(row) for row in connection.execute(statement)]

    def daily_by_model(self, where: UsageFilter, *, hourly: bool = False) -> list[DailyUsage]:
        """Spend and tokens per UTC day (or hour: ``YYYY-MM-DD HH``) and model, for charts."""
        return self._read_valid(
            where, lambda checked: self._daily_by_model(where, hourly=hourly, checked=checked)
        )

    def _daily_by_model(
        self, where: UsageFilter, *, hourly: bool, checked: bool
    ) -> list[DailyUsage]:
        c = records_table.c
        day = self._hour_column() if hourly else self._group_column("day")
        query = (
            self._where(sa.select(day, c.model, *_usage_sums(wide=checked)), where, checked=checked)
            .group_by(day, c.model)
            .order_by(day, c.model)
        )
        with _overflow_is_bad_rows(), self.engine.connect() as connection:
            return [
                DailyUsage(
                    day=str(row[0]),
                    model=row[1] or "unknown",
                    usage=_summed_usage(row[2:], checked=checked),
                )
                for row in connection.execute(query)
            ]

    def breakdown(
        self, where: UsageFilter, levels: Sequence[str], limit: int | None = None
    ) -> Breakdown:
        """Calls, tokens and cost per group of one or two ``levels`` (``hour`` too, for
        charts): the ``limit`` costliest groups, or every group in key order.

        Five aggregates, not a summary's twenty and its per-call histogram: SQLite sorts
        every selected column for a GROUP BY, and narrow rows sort several times faster
        (a dashboard refresh over 1M records: benchmarks/RESULTS.md).
        """
        checked_levels = tuple(
            level if level == "hour" else group_levels(level)[0] for level in levels
        )
        return self._read_valid(
            where, lambda checked: self._breakdown(where, checked_levels, limit, checked=checked)
        )

    def _breakdown(
        self, where: UsageFilter, levels: tuple[str, ...], limit: int | None, *, checked: bool
    ) -> Breakdown:
        c = records_table.c
        groups = [self._group_column(level, index) for index, level in enumerate(levels)]
        costs = _cost_sums(wide=checked)
        query = self._where(
            sa.select(
                *groups,
                sa.func.count(),
                sa.func.sum(c.total_tokens),
                *costs,
                _errors(),
                _unpriced(),
                sa.func.count().over(),  # groups in all, before the limit
            ),
            where,
            checked=checked,
        ).group_by(*groups)
        if limit is None:
            query = query.order_by(*groups)
        else:
            query = query.order_by(sa.desc(sa.func.sum(_pico())), *groups).limit(limit)
        with _overflow_is_bad_rows(), self.lock, self.engine.connect() as connection:
            rows = connection.execute(query).all()
        width = len(levels)
        found = []
        for row in rows:
            calls, tokens, *cost, errors, unpriced, _ = row[width:]
            if not checked and (type(tokens) is float or min(tokens or 0, cost[0] or 0) < 0):
                raise _BadRows()  # a fraction or a negative count or cost stored
            pico = int(cost[0] or 0) * _WIDE_SPLIT + int(cost[1] or 0) if checked else cost[0]
            found.append(
                GroupTotals(
                    keys=tuple(None if key is None else str(key) for key in row[:width]),
                    calls=int(calls),
                    total_tokens=int(tokens or 0),
                    cost_usd=pico_to_usd(int(pico or 0)),
                    errors=int(errors or 0),
                    unpriced_calls=int(unpriced or 0),
                )
            )
        return Breakdown(levels=levels, groups=found, group_count=int(rows[0][-1]) if rows else 0)

    def declared_dimensions(self) -> list[str]:
        """The dimension keys some tracker declared here (each has its index, see
        index_dimensions), in name order."""
        prefix = "ix_usage_records_dim_"
        if self.dialect == "postgresql":
            query = "SELECT indexname FROM pg_indexes WHERE tablename = 'usage_records'"
        else:
            query = "SELECT name FROM sqlite_master WHERE type = 'index'"
        with self.lock, self.engine.connect() as connection:
            names = connection.exec_driver_sql(query).scalars()
            return sorted(name[len(prefix) :] for name in names if name.startswith(prefix))

    def _hour_column(self) -> sa.ColumnElement[Any]:
        c = records_table.c
        if self.dialect == "sqlite":
            return sa.func.strftime("%Y-%m-%d %H", c.ended_at)
        return sa.func.to_char(c.ended_at, "YYYY-MM-DD HH24")

    def costliest(self, where: UsageFilter, limit: int) -> list[UsageRecord]:
        """The ``limit`` most expensive calls ``where`` selects."""
        statement = self._where(sa.select(records_table), where)
        return self._read(statement.order_by(sa.desc(_pico())).limit(limit))

    def failures(self, where: UsageFilter, limit: int) -> list[UsageRecord]:
        """The latest ``limit`` calls that ended in an error."""
        c = records_table.c
        statement = (
            self._where(sa.select(records_table), where)
            .where(c.status != "ok")
            .order_by(sa.desc(c.ended_at))
            .limit(limit)
        )
        return self._read(statement)

    def iter_records(self, where: UsageFilter, chunk_size: int = 1000) -> Iterator[UsageRecord]:
        c = records_table.c
        statement = self._where(sa.select(records_table), where).order_by(c.ended_at, c.id)
        with self.engine.connect() as connection:
            rows = connection.execution_options(yield_per=chunk_size).execute(statement)
            for row in rows:
                yield _record(row)

    def _where(self, statement: Any, where: UsageFilter, *, checked: bool = False) -> Any:
        """``statement`` narrowed to ``where``; ``checked`` also leaves out rows that break
        TokenUsage's rules (slow: only once a read found such rows)."""
        columns = records_table.c
        if checked:
            statement = statement.where(_valid_row())
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
        columns = records_table.c
        label = f"group_key{index or ''}"
        if level is None:
            return sa.literal("all").label(label)
        if level == "day":
            if self.dialect == "sqlite":
                return sa.func.date(columns.ended_at).label(label)
            return sa.cast(sa.cast(columns.ended_at, sa.Date), sa.String).label(label)
        if level == "hour":
            return self._hour_column().label(label)
        if level.startswith(DIMENSION_PREFIX):
            return self._dimension_column(level.removeprefix(DIMENSION_PREFIX)).label(label)
        column: sa.ColumnElement[Any] = columns[GROUP_COLUMNS[level]]
        if self.dialect == "sqlite":
            # "+column" is not the indexed column: grouping by the column itself, SQLite
            # walks its index to skip the sort and looks every row up in the table
            # (1M records by user: 1.46 s against 0.48 s scanned and sorted)
            column = sa.literal_column(f"+{column.table.name}.{column.name}", column.type)
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
        groups, histograms = self._read_valid(
            where, lambda checked: self._grouped(where, levels, checked=checked)
        )
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
            unpriced_calls=sum(group.unpriced_calls for group in groups),
            stats=_token_stats(list(merged.items()), calls, usage.total),
            period_start=min(g.first_call for g in groups if g.first_call),
            period_end=max(g.last_call for g in groups if g.last_call),
            groups=groups if levels else [],
        )

    def _read_valid(self, where: UsageFilter, read: Callable[[bool], _Read]) -> _Read:
        """``read(checked=False)`` while no stored row breaks TokenUsage's rules, else
        ``read(checked=True)``, which leaves those rows out, with a warning.

        Sums give away most such rows (a negative or fractional total), but not a
        negative row that cancels out within its group (a rolled-back call written as
        -N tokens); the partial index of those rows does, by a seek in an index that is
        empty in a healthy database.
        """
        if not self._has_bad_rows():
            try:
                return read(False)
            except _BadRows:
                pass  # sums only valid rows can't add up to: read them again, checked
        self._warn_bad_rows(where)
        return read(True)

    def _has_bad_rows(self) -> bool:
        try:
            with self.lock, self.engine.begin() as connection:
                if self.dialect == "postgresql":
                    # it cannot estimate the predicate, guesses every row matches and would
                    # scan the table for the first (1 s over 1M rows) instead of the index
                    connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
                found = connection.exec_driver_sql(_bad_rows_query(self.dialect)).first()
                return found is not None
        except sa.exc.OperationalError as error:
            if "no query solution" not in str(error.orig):
                raise
            if not self._index_mismatch_told:
                self._index_mismatch_told = True
                logger.warning(
                    "%s: its index of invalid rows (%s) is not the one this version makes; "
                    "reads check every row instead (slower). Drop the index and open the "
                    "database once with UsageTracker to make it again",
                    self._safe_url(),
                    INVALID_ROWS_INDEX,
                )
            return True  # not known: read checked, which is right either way

    def _warn_bad_rows(self, where: UsageFilter) -> None:
        """Say how many stored rows a read leaves out, and why."""
        table = records_table
        query = self._where(sa.select(sa.func.count()).select_from(table), where).where(
            sa.not_(_valid_row())
        )
        with self.engine.connect() as connection:
            skipped = int(connection.execute(query).scalar_one())
        if not skipped:
            return  # only the sums were too large for SQLite's integers: read again wide
        logger.warning(
            "%s: leaving out %d stored record(s) with negative, non-integer or inconsistent "
            "token counts or cost (written by hand or by another program); the totals "
            "cover the other records",
            self._safe_url(),
            skipped,
        )

    def _grouped(
        self, where: UsageFilter, levels: tuple[str, ...], *, checked: bool
    ) -> tuple[list[GroupSummary], list[list[tuple[int, int]]]]:
        """Groups (largest cost first) with their histograms of per-call totals.

        Percentiles come from the histogram (one row per distinct total per group), which
        is several times faster than ranking every row with window functions.
        """
        with _overflow_is_bad_rows():
            if self.dialect == "sqlite":
                sums, histograms = self._sqlite_group_rows(where, levels, checked)
            else:
                sums, histograms = self._server_group_rows(where, levels, checked)

        def fold(key: Any, rows: list[Sequence[Any]], histogram: list[tuple[int, int]]) -> Any:
            return _fold_group(key, rows, histogram, checked=checked)

        if len(levels) < 2:
            pairs = [fold(key[0], rows, histograms[key]) for key, rows in sums.items()]
            return _largest_first(pairs)
        outer_rows: dict[Any, list[Sequence[Any]]] = {}
        outer_histograms: dict[Any, list[tuple[int, int]]] = {}
        inner: dict[Any, list[tuple[GroupSummary, list[tuple[int, int]]]]] = {}
        for (outer, key), rows in sums.items():
            outer_rows.setdefault(outer, []).extend(rows)
            outer_histograms.setdefault(outer, []).extend(histograms[(outer, key)])
            inner.setdefault(outer, []).append(fold(key, rows, histograms[(outer, key)]))
        pairs = []
        for outer, rows in outer_rows.items():
            summary, histogram = fold(outer, rows, outer_histograms[outer])
            summary.groups = _largest_first(inner[outer])[0]
            pairs.append((summary, histogram))
        return _largest_first(pairs)

    def _sqlite_group_rows(
        self, where: UsageFilter, levels: tuple[str, ...], checked: bool
    ) -> _GroupRows:
        """One pass grouped by (total_tokens, group) carries every sum.

        SQLite sorts every row for a GROUP BY; two passes (sums, then histogram) paid
        for that twice. total_tokens leads: the sorter compares an integer key faster.
        """
        c = records_table.c
        groups = self._group_columns(levels)
        width = len(groups)
        query = self._where(
            sa.select(*groups, *_sum_columns(wide=checked), c.total_tokens), where, checked=checked
        ).group_by(c.total_tokens, *groups)
        sums: dict[Any, list[Sequence[Any]]] = {}
        histograms: dict[Any, list[tuple[int, int]]] = {}
        for rows in self._fetch_grouped_rows(query, where):
            for row in rows:
                key = tuple(row[:width])
                sums.setdefault(key, []).append(row[width:])
                histograms.setdefault(key, []).append((int(row[-1]), int(row[width])))
        return sums, histograms

    def _server_group_rows(
        self, where: UsageFilter, levels: tuple[str, ...], checked: bool
    ) -> _GroupRows:
        """Sums per group, then a histogram: PostgreSQL hashes both, whereas one pass
        carrying the sums per (total_tokens, group) sorted (and spilled) instead."""
        c = records_table.c
        groups = self._group_columns(levels)
        width = len(groups)
        sums_query = self._where(
            sa.select(*groups, *_sum_columns(wide=checked)), where, checked=checked
        ).group_by(*groups)
        histogram_query = self._where(
            sa.select(*groups, c.total_tokens, sa.func.count()), where, checked=checked
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
        if where.since or where.until:
            # the period's own rowids, from the ended_at index alone: split over the whole
            # table, a range before the period scanned its rows for none (30 days of 90:
            # a million rows read for a third of them)
            calls, low, high = self._period_rowids(connection, where)
            if calls < _PARALLEL_SUMMARY_ROWS:
                return []  # a short period: its ended_at index range beats scanning rows
        else:
            # one subquery each: SQLite seeks a lone min() or max(), but scans for both
            low, high = connection.execute(
                sa.select(
                    *(
                        sa.select(bound(_ROWID)).select_from(records_table).scalar_subquery()
                        for bound in (sa.func.min, sa.func.max)
                    )
                )
            ).one()
            if low is None or high - low < _PARALLEL_SUMMARY_ROWS:
                return []
        step = -(-(high + 1 - low) // workers)
        return [(start, start + step - 1) for start in range(low, high + 1, step)]

    def _period_rowids(self, connection: sa.Connection, where: UsageFilter) -> tuple[int, int, int]:
        """Records in the since/until period and their lowest and highest rowid."""
        period = UsageFilter(since=where.since, until=where.until)
        query = sa.select(sa.func.count(), sa.func.min(_ROWID), sa.func.max(_ROWID))
        calls, low, high = connection.execute(
            self._where(query.select_from(records_table), period)
        ).one()
        return int(calls), int(low or 0), int(high or 0)

    def checkpoint(self) -> None:
        """Copy SQLite's write-ahead log into the database file, so that the file alone
        holds every record (a copy of usage.db without usage.db-wal had none of a
        script's rows when it never closed its tracker). Nothing to do elsewhere."""
        if self.dialect != "sqlite" or self.read_only or self.url.startswith("memory://"):
            return
        with self.lock, self.engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        self.engine.dispose()

    def reopen_in_child(self) -> None:
        """After ``fork``: the pooled connections are the parent's (sharing a PostgreSQL
        socket or a SQLite handle between processes corrupts both); leave them to it."""
        self.engine.dispose(close=False)


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


#: ``wide`` sums split the pico-USD cost here: thirteen calls of 10^12 tokens overflow
#: SQLite's 64-bit sum, and the split parts stay far from it.
_WIDE_SPLIT = 10**6


def _pico() -> sa.ColumnElement[int]:
    """The cost as stored, integer pico-USD (summed exactly, not as the Decimal the column
    type returns)."""
    return sa.type_coerce(records_table.c.cost_estimate_usd, sa.BigInteger)


def _cost_sums(*, wide: bool) -> list[sa.ColumnElement[Any]]:
    """The summed cost, or its two ``wide`` parts."""
    pico = _pico()
    if wide:
        return [sa.func.sum(pico // _WIDE_SPLIT), sa.func.sum(pico % _WIDE_SPLIT)]
    return [sa.func.sum(pico)]


def _errors() -> sa.ColumnElement[Any]:
    c = records_table.c
    return sa.func.sum(sa.case((c.status != "ok", 1), else_=0))


def _unpriced() -> sa.ColumnElement[Any]:
    """Calls that used tokens at no known price (their cost is 0, not free)."""
    c = records_table.c
    return sa.func.sum(sa.case((sa.and_(sa.not_(c.cost_known), c.total_tokens > 0), 1), else_=0))


def _usage_sums(*, wide: bool) -> list[sa.ColumnElement[Any]]:
    """The usage sums in _SUMMED order (cost as integer pico-USD, or its two parts)."""
    c = records_table.c
    return [*(sa.func.sum(c[name]) for name in _SUMMED[:-1]), *_cost_sums(wide=wide)]


def _sum_columns(*, wide: bool = False) -> list[sa.ColumnElement[Any]]:
    """calls, the usage sums (cost as integer pico-USD, or its two ``wide`` parts), any
    estimated, errors, unpriced calls, first and last call.

    first/last come back as stored (text on SQLite), not parsed for every row.
    """
    c = records_table.c
    return [
        sa.func.count(),
        *_usage_sums(wide=wide),
        sa.func.max(sa.case((c.estimated, 1), else_=0)),
        _errors(),
        _unpriced(),
        sa.type_coerce(sa.func.min(c.ended_at), sa.String),
        sa.type_coerce(sa.func.max(c.ended_at), sa.String),
    ]


def _valid_row() -> sa.ColumnElement[bool]:
    """A stored row TokenUsage would accept (counts are checked when recorded; a row
    written by hand, by another program or by an older version may not be)."""
    c = records_table.c
    counts = [c[name] for name in _SUMMED[:-1]]
    # each count is bounded, but not the total: it is the sum of three (up to 3x the bound)
    rules = [
        sa.and_(count >= 0, count <= MAX_TOKENS_PER_CALL)
        for count in counts
        if count.name != "total_tokens"
    ]
    rules += [
        *(count == sa.cast(count, sa.BigInteger) for count in counts),  # no fractions
        c.total_tokens == c.prompt_tokens + c.completion_tokens + c.embedding_tokens,
        c.cache_read_tokens + c.cache_write_tokens <= c.prompt_tokens,
        c.reasoning_tokens <= c.completion_tokens,
        _pico() >= 0,
    ]
    return sa.and_(*rules)


@contextmanager
def _overflow_is_bad_rows() -> Iterator[None]:
    """SQLite's integer sum overflowing: read again with wide sums."""
    try:
        yield
    except sa.exc.OperationalError as error:
        if "integer overflow" not in str(error.orig):
            raise
        raise _BadRows() from error


def _fold_group(
    key: Any, rows: list[Sequence[Any]], histogram: list[tuple[int, int]], *, checked: bool
) -> tuple[GroupSummary, list[tuple[int, int]]]:
    """One group's summary from its rows of (*_sum_columns(), ...); columns are
    summed by builtins, not row by row (100k rows per run grouping 1M calls by user)."""
    calls, *columns = zip(*rows, strict=True)
    width = len(_SUMMED) + checked  # the wide cost is two columns
    estimated, errors, unpriced, first, last = columns[width : width + 5]
    if not checked and histogram and min(histogram)[0] < 0:
        raise _BadRows()
    usage = _summed_usage(
        [sum(filter(None, column)) for column in columns[:width]],
        checked=checked,
        estimated=any(estimated),
    )
    total_calls = int(sum(calls))
    summary = GroupSummary(
        key=None if key is None else str(key),
        usage=usage,
        calls=total_calls,
        errors=int(sum(filter(None, errors))),
        unpriced_calls=int(sum(filter(None, unpriced))),
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


def _summed_usage(sums: Sequence[Any], *, checked: bool, estimated: bool = False) -> TokenUsage:
    """A TokenUsage from SQL sums in _SUMMED order, the cost as integer pico-USD (in its
    two wide parts when ``checked``). Sums that no set of valid rows adds up to raise
    _BadRows, unless the rows were ``checked`` already."""
    counts: dict[str, Any] = {
        name: int(value or 0) for name, value in zip(_SUMMED[:-1], sums, strict=False)
    }
    pico = int(sums[-2] or 0) * _WIDE_SPLIT + int(sums[-1] or 0) if checked else sums[-1]
    if not checked and (
        any(type(value) is float for value in sums)  # a fraction stored in a count
        or min(*counts.values(), pico or 0) < 0
        or counts["total_tokens"]
        != counts["prompt_tokens"] + counts["completion_tokens"] + counts["embedding_tokens"]
    ):
        raise _BadRows()
    return TokenUsage.model_construct(
        cost_estimate_usd=pico_to_usd(int(pico or 0)), estimated=estimated, **counts
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
    """Indexes added since the tables were made (create_all makes them only with a table).

    ``IF NOT EXISTS``, not ``checkfirst``: that reflects the indexes there are, and warned
    (SAWarning) about each declared dimension's expression index on every upgrade.
    """
    for table in SQLModel.metadata.sorted_tables:
        for index in table.indexes:
            connection.execute(sa.schema.CreateIndex(index, if_not_exists=True))


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


def _record(row: sa.Row[Any]) -> UsageRecord:
    """A stored row as the record value (its column types already converted it)."""
    return UsageRecord.from_values(dict(row._mapping))


#: Every stored row that breaks TokenUsage's rules, and only those (written by hand, by
#: another program or by an older version): reads ask it whether to check every row.
INVALID_ROWS_INDEX = "ix_usage_records_invalid"
sa.Index(
    INVALID_ROWS_INDEX,
    records_table.c.ended_at,
    sqlite_where=sa.not_(_valid_row()),
    postgresql_where=sa.not_(_valid_row()),
)


@functools.cache
def _bad_rows_query(dialect_name: str) -> str:
    """Whether any row is in the partial index of invalid rows: its very predicate, with
    literals (the planners match a partial index only on the same terms), and on SQLite
    ``INDEXED BY`` it (an error, not a table scan, should it ever not match)."""
    dialect: sa.Dialect = (
        sqlite.dialect() if dialect_name == "sqlite" else postgresql.dialect()  # type: ignore[no-untyped-call]
    )
    predicate = sa.not_(_valid_row()).compile(
        dialect=dialect, compile_kwargs={"literal_binds": True}
    )
    hint = f" INDEXED BY {INVALID_ROWS_INDEX}" if dialect_name == "sqlite" else ""
    return f"SELECT 1 FROM {records_table.name}{hint} WHERE {predicate} LIMIT 1"
