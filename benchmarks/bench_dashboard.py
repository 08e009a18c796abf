"""Dashboard benchmark: each query a page refresh runs, and the whole refresh, over N
attributed records spread over the last 90 days.

    python benchmarks/bench_dashboard.py [DB_URL]   # BENCH_RECORDS=100000 for a quick run

With a DB_URL whose database already holds records, the records are reused (building 1M
takes minutes); ``--explain`` prints each query's plan (EXPLAIN QUERY PLAN on SQLite,
EXPLAIN ANALYZE on PostgreSQL).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from usage_callbacks import TokenUsage, UsageTracker
from usage_callbacks.charts import TOP_GROUPS
from usage_callbacks.dashboard import (
    DEFAULT_DAYS,
    TOP_ROWS,
    levels,
    snapshot,
    usage_filter,
)
from usage_callbacks.store import SqlStore, UsageFilter, open_store

Row = tuple[str, str, str, str]
RECORDS = int(os.environ.get("BENCH_RECORDS", "1000000"))
MODELS = ("gpt-4o-mini", "gpt-4o", "claude-sonnet-4-5", "text-embedding-3-small")
DAYS = 90


def build(url: str, records: int = RECORDS) -> None:
    """``records`` calls by 100 users over the last DAYS days: 4 models, 6 nodes, 3 agents,
    1,000 threads, 50 tenants, 1% errors."""
    now = datetime.now(timezone.utc)
    step = timedelta(days=DAYS) / records
    usages = [
        TokenUsage(prompt_tokens=100 + index % 900, completion_tokens=index % 300)
        for index in range(1000)
    ]
    with UsageTracker(url, batch_size=5000, dimensions=["tenant"]) as tracker:
        for index in range(records):
            tracker.record(
                usages[index % 1000],
                model=MODELS[index % 4],
                provider="openai",
                user_id=f"u{index % 97}",
                node=f"node-{index % 6}",
                agent=f"agent-{index % 3}",
                thread_id=f"thread-{index % 1000}",
                dimensions={"tenant": f"tenant-{index % 50}"},
                status="error" if index % 100 == 0 else "ok",
                ended_at=now - step * (records - index),
            )


def _seconds(work: Callable[[], object], runs: int = 3) -> str:
    """Median wall time and CPU time (all threads) of ``runs``: on a shared machine the
    CPU time says what the work costs, the wall time what its load made of it."""
    walls, cpus = [], []
    for _ in range(runs):
        started, cpu = time.perf_counter(), time.process_time()
        work()
        walls.append(time.perf_counter() - started)
        cpus.append(time.process_time() - cpu)
    return f"{statistics.median(walls):.3f} (CPU {statistics.median(cpus):.3f})"


def queries(store: SqlStore, where: UsageFilter) -> dict[str, Callable[[], Any]]:
    """The page's queries, one by one (snapshot() runs each of them; its totals are
    added up from the series)."""
    found: dict[str, Callable[[], Any]] = {
        "series by day": lambda: store.breakdown(where, ("day", "model")),
        "costliest": lambda: store.costliest(where, TOP_ROWS),
        "errors": lambda: store.failures(where, TOP_ROWS),
        "budgets": lambda: store.ledger.overview(datetime.now(timezone.utc)),
    }
    for level in levels(store)[1:]:  # the page adds up "by model" from the series
        found[f"by {level}"] = lambda level=level: store.breakdown(where, (level,), TOP_GROUPS)
    return found


def explain(store: SqlStore, where: UsageFilter) -> None:
    """Print each SQL statement the page runs with its plan."""
    statements: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "usage_records" in statement:
            statements.append((statement, parameters))

    sa.event.listen(store.engine, "before_cursor_execute", capture)
    snapshot(store, where, hourly=False)
    sa.event.remove(store.engine, "before_cursor_execute", capture)
    prefix = "EXPLAIN QUERY PLAN " if store.dialect == "sqlite" else "EXPLAIN ANALYZE "
    with store.engine.connect() as connection:
        for statement, parameters in statements:
            print("\n" + " ".join(statement.split())[:400])
            for row in connection.exec_driver_sql(prefix + statement, parameters):
                print("   ", " | ".join(str(value) for value in row))


def run(url: str) -> list[Row]:
    store = open_store(url, read_only=True)
    assert isinstance(store, SqlStore)
    default = usage_filter({})  # the page's default window
    rows: list[Row] = []
    calls = store.summary(UsageFilter(), None).calls
    note = f"{calls:,} records over {DAYS} days, {store.dialect}, median of 3"
    for name, work in queries(store, default).items():
        rows.append(("dashboard", f"{name} (last {DEFAULT_DAYS} days), s", _seconds(work), note))
    for label, where in [
        (f"last {DEFAULT_DAYS} days", default),
        ("user u7, last 30 days", usage_filter({"user": ["u7"]})),
        ("all time", usage_filter({"since": [""]})),
    ]:
        seconds = _seconds(lambda where=where: snapshot(store, where, hourly=False))
        rows.append(("dashboard", f"whole refresh, {label}, s", seconds, note))
    store.close()
    return rows


def main() -> int:
    args = [arg for arg in sys.argv[1:] if not arg.startswith("--")]
    with tempfile.TemporaryDirectory() as tmp:
        url = args[0] if args else f"sqlite:///{Path(tmp) / 'dashboard.db'}"
        with UsageTracker(url) as tracker:
            empty = tracker.summary().calls == 0
        if empty:
            started = time.perf_counter()
            build(url)
            print(f"built {RECORDS:,} records in {time.perf_counter() - started:.0f} s")
        if "--explain" in sys.argv:
            store = open_store(url, read_only=True)
            assert isinstance(store, SqlStore)
            explain(store, usage_filter({}))
            store.close()
        print(f"load average {os.getloadavg()[0]:.1f}")
        for row in run(url):
            print("  ".join(row))
        print(f"load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
