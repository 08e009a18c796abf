"""SQLite's bulk insert of usage records: many rows per statement, converted once.

Why: the writer thread shares the GIL with the application. ``executemany`` drops and
retakes the GIL around every row's ``sqlite3_step``, and each retake can wait for the
busy application thread to yield; under load the writer then crawls, its queue fills
and the application ends up waiting for it. A multi-row ``INSERT ... VALUES (...),
(...)`` binds a whole chunk in C and runs it in one step, so the GIL is given up once
per chunk. Chunks have power-of-two sizes, so a handful of statements, each prepared
once and kept in sqlite3's statement cache, serve every batch size.
"""

from __future__ import annotations

import operator
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite

from usage_callbacks.store.models import RECORD_COLUMNS, UsageRecord, records_table

#: Rows per statement at most; fewer where SQLite allows fewer bound variables.
MAX_ROWS_PER_STATEMENT = 1024

Converter = Callable[[Any], Any]


class SqliteBulkInsert:
    """The usage-record INSERT for one SQLite engine, with each column's bind processor."""

    def __init__(self, dialect: sa.Dialect) -> None:
        table = records_table
        statement = sqlite.insert(table).on_conflict_do_nothing(index_elements=["id"])
        compiled = statement.compile(dialect=dialect, column_keys=list(RECORD_COLUMNS))
        names = tuple(compiled.positiontup or ())
        head, values, tail = _split_values(compiled.string)
        self._head, self._row_marks, self._tail = head, values, tail
        self._values = operator.itemgetter(*names)
        self._converters = tuple(_converters(table, names, dialect))
        self._statements: dict[int, str] = {}
        self._max_rows = _max_rows(len(names))

    def execute(self, connection: sa.Connection, records: Sequence[UsageRecord]) -> None:
        """Insert ``records`` (already stored ids are skipped) in the open transaction."""
        cursor = connection.connection.cursor()
        try:
            start = 0
            for size in _chunk_sizes(len(records), self._max_rows):
                cursor.execute(
                    self._statement(size), self.parameters(records[start : start + size])
                )
                start += size
        finally:
            cursor.close()

    def parameters(self, records: Sequence[UsageRecord]) -> list[Any]:
        """Every record's column values in statement order, converted for SQLite, flat."""
        values, converters = self._values, self._converters
        flat: list[Any] = []
        for record in records:
            row = list(values(record.__dict__))
            for index, process in converters:
                row[index] = process(row[index])
            flat.extend(row)
        return flat

    def _statement(self, rows: int) -> str:
        sql = self._statements.get(rows)
        if sql is None:
            sql = self._statements[rows] = (
                f"{self._head} VALUES {', '.join([self._row_marks] * rows)}{self._tail}"
            )
        return sql


def _max_rows(columns: int) -> int:
    """The largest power of two of rows whose variables SQLite accepts in one statement
    (32,766 since SQLite 3.32, 999 before)."""
    variables = 32_766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999
    rows = MAX_ROWS_PER_STATEMENT
    while rows > 1 and rows * columns > variables:
        rows //= 2
    return rows


def _chunk_sizes(count: int, largest: int) -> list[int]:
    """Full chunks, then the remainder as powers of two (few distinct statements)."""
    sizes = [largest] * (count // largest)
    remainder = count % largest
    size = largest
    while remainder:
        size //= 2
        if remainder >= size:
            sizes.append(size)
            remainder -= size
    return sizes


def _split_values(sql: str) -> tuple[str, str, str]:
    """``INSERT ... VALUES (?, ...) ON CONFLICT ...`` as (head, "(?, ...)", tail)."""
    head, found, rest = sql.partition(" VALUES (")
    marks, closed, tail = rest.partition(")")
    if not found or not closed:
        raise ValueError(f"unexpected INSERT shape: {sql[:80]!r}")
    return head, f"({marks})", tail


def _converters(
    table: sa.Table, names: Sequence[str], dialect: sa.Dialect
) -> list[tuple[int, Converter]]:
    """(position, bind processor) for the columns whose values SQLite cannot take as is."""
    converters: list[tuple[int, Converter]] = []
    for index, name in enumerate(names):
        column_type = table.c[name].type
        if isinstance(column_type, sa.Boolean):
            continue  # sqlite3 binds bool as the integer SQLAlchemy would write
        process: Converter | None = column_type.dialect_impl(dialect).bind_processor(dialect)
        if isinstance(column_type, sa.JSON) and process is not None:
            process = _empty_list_shortcut(process)
        if process is not None:
            converters.append((index, process))
    return converters


def _empty_list_shortcut(process: Converter) -> Converter:
    """Most records carry no tags: skip json.dumps for the empty list."""
    empty = process([])

    def convert(value: Any) -> Any:
        return empty if value == [] else process(value)

    return convert
