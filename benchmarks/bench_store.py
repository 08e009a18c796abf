"""Store benchmarks: ingest against raw sqlite3, summary latency, reservations, memory.

Each function returns rows for the results table: (benchmark, measurement, value, note).
Sizes scale with ``BENCH_RECORDS`` (default 1,000,000) so a quick run can use less.
"""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

from usage_callbacks import Budget, BudgetExceededError, ModelPrice, TokenUsage, UsageTracker

Row = tuple[str, str, str, str]
RECORDS = int(os.environ.get("BENCH_RECORDS", "1000000"))
MODELS = ("gpt-4o-mini", "gpt-4o", "claude-sonnet-4-5", "text-embedding-3-small")


def _usage(index: int) -> TokenUsage:
    return TokenUsage(prompt_tokens=100 + index % 900, completion_tokens=index % 300)


class Rate(NamedTuple):
    """Items per second of wall time, and per second of this process's CPU time (all
    threads): the second holds up when other work shares the machine."""

    wall: float
    cpu: float


def _rate(count: int, wall: float, cpu: float) -> Rate:
    return Rate(count / (time.perf_counter() - wall), count / (time.process_time() - cpu))


def _raw_insert(path: Path, ddl: list[str], rows: list[tuple[object, ...]]) -> Rate:
    """Rows per second for one sqlite3 executemany of ``rows`` in one transaction."""
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    for statement in ddl:
        connection.execute(statement)
    marks = ", ".join("?" * len(rows[0]))
    wall, cpu = time.perf_counter(), time.process_time()
    connection.execute("BEGIN")
    connection.executemany(f"INSERT INTO usage_records VALUES ({marks})", rows)
    connection.execute("COMMIT")
    rate = _rate(len(rows), wall, cpu)
    connection.close()
    return rate


def _records_per_second(tracker: UsageTracker, extra: Sequence[dict[str, Any]] = ({},)) -> Rate:
    """RECORDS calls of tracker.record, flushed; ``extra[i % len(extra)]`` adds arguments."""
    # the caller's inputs are made before the clock starts, as the raw side's rows are
    usages = [_usage(index) for index in range(1000)]
    users = [f"u{index}" for index in range(97)]
    kinds = len(extra)
    wall, cpu = time.perf_counter(), time.process_time()
    for index in range(RECORDS):
        tracker.record(
            usages[index % 1000],
            model=MODELS[index % 4],
            provider="openai",
            user_id=users[index % 97],
            **extra[index % kinds],
        )
    tracker.flush(timeout=None)
    return _rate(RECORDS, wall, cpu)


def bench_ingest(workdir: Path) -> list[Row]:
    """N records through tracker.record() into SQLite vs raw executemany of the same rows.

    The raw side inserts the rows our store wrote (read back, so nothing extra stays
    alive while ours is timed) into the same table, indexes included, and, for
    reference, into a bare table without the primary key and indexes.
    """
    url = f"sqlite:///{workdir / 'ingest.db'}"
    tracker = UsageTracker(url, batch_size=5000)
    ours = _records_per_second(tracker)
    tracker.close()

    with sqlite3.connect(workdir / "ingest.db") as source:
        ddl = [
            sql
            for (sql,) in source.execute(
                "SELECT sql FROM sqlite_master WHERE tbl_name = 'usage_records' AND sql NOT NULL"
            )
        ]
        rows = source.execute("SELECT * FROM usage_records").fetchall()
    columns = ", ".join(f"c{i}" for i in range(len(rows[0])))
    same = _raw_insert(workdir / "raw.db", ddl, rows)
    bare = _raw_insert(workdir / "bare.db", [f"CREATE TABLE usage_records ({columns})"], rows)
    return [
        (
            "ingest",
            "tracker.record -> SQLite, records/s",
            f"{ours.wall:,.0f}",
            f"{RECORDS:,} records",
        ),
        (
            "ingest",
            "raw sqlite3 executemany, same table, rows/s",
            f"{same.wall:,.0f}",
            "one transaction",
        ),
        ("ingest", "ratio ours/raw (same table)", f"{ours.wall / same.wall:.2f}", "target >= 0.50"),
        (
            "ingest",
            "ratio ours/raw (same table), per CPU second",
            f"{ours.cpu / same.cpu:.2f}",
            f"{ours.cpu:,.0f} vs {same.cpu:,.0f} per CPU second (all threads)",
        ),
        ("ingest", "raw executemany, bare table, rows/s", f"{bare.wall:,.0f}", "no key, no index"),
        ("ingest", "ratio ours/raw (bare table)", f"{ours.wall / bare.wall:.2f}", "for reference"),
    ]


def bench_summary(workdir: Path) -> list[Row]:
    """summary(group_by='model') with p50/p95/p99 over the ingested ledger."""
    with UsageTracker(f"sqlite:///{workdir / 'ingest.db'}") as tracker:
        timings = []
        for _ in range(3):
            started = time.perf_counter()
            summary = tracker.summary(group_by="model")
            timings.append(time.perf_counter() - started)
    return [
        (
            "summary",
            f"group by model + percentiles over {summary.calls:,} records, s",
            f"{statistics.median(timings):.2f}",
            "median of 3; target < 1 s",
        )
    ]


def _median_seconds(work: Callable[[], object], runs: int = 3) -> float:
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        work()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def bench_attribution(workdir: Path) -> list[Row]:
    """Group-by and filters on attribution over N attributed records (6 nodes, 3 agents,
    1,000 threads, 50 tenants): grouping scans like group by model; narrow filters seek
    their partial or expression index."""
    url = f"sqlite:///{workdir / 'attributed.db'}"
    places = [
        {
            "node": f"node-{index % 6}",
            "agent": f"agent-{index % 3}",
            "thread_id": f"thread-{index}",
            "dimensions": {"tenant": f"tenant-{index % 50}"},
        }
        for index in range(1000)
    ]
    with UsageTracker(url, batch_size=5000, dimensions=["tenant"]) as tracker:
        ingest = _records_per_second(tracker, places)
        timings = [
            ("group by model (as before attribution)", lambda: tracker.summary(group_by="model")),
            ("group by node", lambda: tracker.summary(group_by="node")),
            ("group by node, then model", lambda: tracker.summary(group_by="node,model")),
            ("group by dimension:tenant", lambda: tracker.summary(group_by="dimension:tenant")),
            ("filter thread (0.1%), summary", lambda: tracker.summary(thread_id="thread-7")),
            (
                "filter tenant (2%), summary by node",
                lambda: tracker.summary(group_by="node", dimensions={"tenant": "tenant-7"}),
            ),
            ("filter thread (0.1%), records", lambda: tracker.records(thread_id="thread-7")),
        ]
        measured = [(name, _median_seconds(work)) for name, work in timings]
    note = f"{RECORDS:,} attributed records, median of 3"
    return [
        (
            "attribution",
            "tracker.record with attribution -> SQLite, records/s",
            f"{ingest.wall:,.0f}",
            "",
        ),
        *(("attribution", f"{name}, s", f"{seconds:.3f}", note) for name, seconds in measured),
    ]


def _reservations_per_second(url: str, threads: int = 8, seconds: float = 3.0) -> float:
    prices = {"m": ModelPrice(input_per_mtok=Decimal(1), output_per_mtok=Decimal(1))}
    budget = Budget(limit_usd=Decimal(10**6), per="user", period="day")
    tracker = UsageTracker(url, budgets=[budget], prices=prices)
    done = [0] * threads
    stop = time.perf_counter() + seconds

    def work(index: int) -> None:
        while time.perf_counter() < stop:
            try:
                reservation = tracker.reserve(
                    model="m", prompt_tokens=50, max_output_tokens=50, user_id=f"u{index % 4}"
                )
            except BudgetExceededError:
                continue
            tracker.release(reservation)
            done[index] += 1

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    tracker.close()
    return sum(done) / seconds


def bench_reservations(workdir: Path, pg_url: str | None) -> list[Row]:
    rows: list[Row] = []
    rate = _reservations_per_second(f"sqlite:///{workdir / 'budget.db'}")
    rows.append(("budgets", "reserve+release/s, 8 threads, SQLite", f"{rate:,.0f}", ""))
    if pg_url:
        rate = _reservations_per_second(pg_url)
        rows.append(("budgets", "reserve+release/s, 8 threads, PostgreSQL", f"{rate:,.0f}", ""))
    return rows


PEAK_RSS = """
import sys
from usage_callbacks import TokenUsage, UsageTracker
def peak_mb():  # VmHWM: this process's own peak (ru_maxrss survives exec from the parent)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
tracker = UsageTracker(sys.argv[1], batch_size=5000)
usage = TokenUsage(prompt_tokens=120, completion_tokens=40)
marks = []
for index in range(int(sys.argv[2])):
    tracker.record(usage, model="gpt-4o-mini", user_id=f"u{index % 97}")
    if index == 100_000:
        marks.append(peak_mb())
tracker.close()
print(marks[0] if marks else peak_mb(), peak_mb())
"""


def bench_memory(workdir: Path) -> list[Row]:
    """Peak RSS of a process recording N calls into SQLite: constant, not growing with N."""
    out = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, f"sqlite:///{workdir / 'rss.db'}", str(RECORDS)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    early, peak = (int(value) for value in out.split())
    return [
        ("memory", f"peak RSS after {RECORDS:,} recorded calls, MB", str(peak), ""),
        ("memory", "peak RSS after the first 100k calls, MB", str(early), "flat = constant memory"),
    ]


BUDGET_USERS = """
import json, sys, time
from datetime import timedelta
from usage_callbacks import Budget, TokenUsage, UsageTracker
from usage_callbacks.store.ledger import Charge
from usage_callbacks.store.models import utcnow
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
url, users, ttl = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
budget = Budget(limit_tokens=100_000, per="user", period="day")
tracker = UsageTracker(url, budgets=[budget], reservation_ttl=timedelta(seconds=ttl))
usage = TokenUsage(prompt_tokens=120, completion_tokens=40)
out = {"rss": {}}
started = time.perf_counter()
for index in range(users):
    user = f"u{index}"
    held = tracker.reserve(
        model="gpt-4o-mini", prompt_tokens=120, max_output_tokens=40, user_id=user
    )
    tracker.record(usage, model="gpt-4o-mini", user_id=user, reservation=held)
    if (index + 1) % (users // 4) == 0:
        out["rss"][index + 1] = round(rss_mb(), 1)
out["calls_s"] = time.perf_counter() - started
out["leases"] = len(tracker._allowances._leases)
started = time.perf_counter()
tracker.flush(timeout=600)
out["flush_s"] = time.perf_counter() - started
started = time.perf_counter()
statuses = tracker.budget_status()
out["status_all_s"] = time.perf_counter() - started
assert len(statuses) == users, len(statuses)
started = time.perf_counter()
after, pages = None, 0
while page := tracker.budget_status(limit=1000, after=after):
    after, pages = page[-1].key, pages + 1
out["status_paged_s"] = time.perf_counter() - started
out["pages"] = pages
started = time.perf_counter()
tracker.budget_status(limit=1000)
out["status_page_s"] = time.perf_counter() - started
started = time.perf_counter()
tracker.budget_status("u12345")
out["status_key_s"] = time.perf_counter() - started
started = time.perf_counter()
tracker.store.ledger.status([Charge(budget, f"u{i}") for i in range(users)], utcnow())
out["status_per_key_s"] = time.perf_counter() - started
deadline = time.monotonic() + 4 * ttl + 60
while tracker._allowances._leases and time.monotonic() < deadline:
    time.sleep(1)
out["leases_after_idle"] = len(tracker._allowances._leases)
out["rss_after_idle"] = round(rss_mb(), 1)
tracker.close()
print(json.dumps(out))
"""
BUDGET_USERS_COUNT = int(os.environ.get("BENCH_BUDGET_USERS", "200000"))


def bench_budget_users(workdir: Path) -> list[Row]:
    """Per-user budgets for many users: memory while they come, then flush and status."""
    users = BUDGET_USERS_COUNT
    out = json.loads(
        subprocess.run(
            [
                sys.executable,
                "-c",
                BUDGET_USERS,
                f"sqlite:///{workdir / 'users.db'}",
                str(users),
                "30",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    rss = {int(count): mb for count, mb in out["rss"].items()}
    first, last = min(rss), max(rss)
    per_10k = (rss[last] - rss[first]) / ((last - first) / 10_000)
    name = f"{users:,} users, per-user budget"
    return [
        (
            "budget users",
            f"{name}: reserve+record, µs/call",
            f"{out['calls_s'] / users * 1e6:,.0f}",
            "each user new: one renewal each",
        ),
        (
            "budget users",
            f"{name}: RSS growth per 10k users, MB",
            f"{per_10k:.1f}",
            f"RSS {rss[first]:.0f} -> {rss[last]:.0f} MB; idle leases go after 30 s",
        ),
        (
            "budget users",
            f"{name}: leases after the users went idle",
            str(out["leases_after_idle"]),
            f"{out['leases']:,} at the end of the calls; RSS then {out['rss_after_idle']:.0f} MB",
        ),
        (
            "budget users",
            f"{name}: flush(), s",
            f"{out['flush_s']:.1f}",
            "books every user's spend",
        ),
        (
            "budget users",
            f"{name}: budget_status() all keys, s",
            f"{out['status_all_s']:.1f}",
            "returns the slices, then grouped reads",
        ),
        (
            "budget users",
            f"{name}: budget_status(limit=1000) pages through all, s",
            f"{out['status_paged_s']:.1f}",
            f"{out['pages']} pages",
        ),
        (
            "budget users",
            f"{name}: budget_status(limit=1000), first page, s",
            f"{out['status_page_s']:.3f}",
            "",
        ),
        ("budget users", f"{name}: budget_status(key), s", f"{out['status_key_s']:.3f}", ""),
        (
            "budget users",
            f"{name}: ledger.status() one query per key (before), s",
            f"{out['status_per_key_s']:.1f}",
            "for comparison",
        ),
    ]


def run(pg_url: str | None) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        rows = bench_ingest(workdir)
        rows += bench_summary(workdir)
        rows += bench_attribution(workdir)
        rows += bench_reservations(workdir, pg_url)
        rows += bench_memory(workdir)
        rows += bench_budget_users(workdir)
    return rows
