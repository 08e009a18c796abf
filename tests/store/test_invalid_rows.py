"""Stored rows outside TokenUsage's rules are left out of every read, even a negative row
whose group's sums come out right."""

from __future__ import annotations

import warnings
from datetime import datetime, timezone

import pytest
import sqlalchemy as sa

from usage_callbacks import StoreConfigurationError, TokenUsage, UsageFilter, UsageTracker
from usage_callbacks.store import open_store
from usage_callbacks.store.models import SCHEMA_VERSION, UsageRecord
from usage_callbacks.store.sql import INVALID_ROWS_INDEX, _bad_rows_query

AT = datetime(2026, 3, 1, 12, tzinfo=timezone.utc)


def _rolled_back(tracker: UsageTracker) -> None:
    """Two calls of 100 prompt tokens and a -50 row "rolling back" half of one: the sums
    (150) are non-negative and consistent, so they alone gave nothing away."""
    for _ in range(2):
        tracker.record(TokenUsage(prompt_tokens=100), model="m", user_id="alice", ended_at=AT)
    good = UsageRecord().model_dump()
    negative = {"prompt_tokens": -50, "total_tokens": -50, "model": "m", "user_id": "alice"}
    tracker.store.write(
        [UsageRecord.model_construct(**{**good, "id": "rollback", **negative, "ended_at": AT})]
    )
    tracker.flush()


def _reads_leave_it_out(tracker: UsageTracker) -> None:
    store = tracker.store
    for group_by in (None, "model", "user", "day"):
        summary = tracker.summary(group_by=group_by)
        assert (summary.calls, summary.usage.prompt_tokens) == (2, 200), group_by
    [daily] = store.daily_by_model(UsageFilter())
    assert daily.usage.prompt_tokens == 200
    for level in ("user", "model"):
        [group] = store.breakdown(UsageFilter(), (level,)).groups
        assert (group.calls, group.total_tokens) == (2, 200)


def test_a_negative_row_that_cancels_out_is_left_out(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with UsageTracker(store_url) as tracker:
        _rolled_back(tracker)
        with caplog.at_level("WARNING", logger="usage_callbacks"):
            _reads_leave_it_out(tracker)
    assert "leaving out 1 stored record(s)" in caplog.text


def test_a_v3_database_gains_the_index_of_invalid_rows_in_place(
    file_or_server_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = file_or_server_url
    backend = sa.engine.make_url(url).get_backend_name()
    with UsageTracker(url, dimensions=["tenant"]) as tracker:
        _rolled_back(tracker)
    engine = sa.create_engine(url)
    with engine.begin() as connection:  # back to v3: no index of invalid rows
        connection.exec_driver_sql(f"DROP INDEX {INVALID_ROWS_INDEX}")
        connection.exec_driver_sql("UPDATE usage_schema SET version = 3")
    with pytest.raises(StoreConfigurationError, match="older usage-callbacks"):
        open_store(url, read_only=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with caplog.at_level("WARNING", logger="usage_callbacks"), UsageTracker(url) as tracker:
            _reads_leave_it_out(tracker)
    # the dimension's expression index is not reflected (SQLAlchemy warned it cannot)
    assert not [w for w in caught if issubclass(w.category, sa.exc.SAWarning)]
    assert f"from schema v3 to v{SCHEMA_VERSION}" in caplog.text
    assert "leaving out 1 stored record(s)" in caplog.text
    with engine.connect() as connection:  # the check reads that index, not the table
        explain = "EXPLAIN QUERY PLAN " if backend == "sqlite" else "EXPLAIN "
        if backend == "postgresql":  # as with many rows: three are read faster without it
            connection.exec_driver_sql("SET enable_seqscan = off")
        plan = " ".join(
            str(row[-1])
            for row in connection.exec_driver_sql(explain + _bad_rows_query(engine.dialect.name))
        )
    engine.dispose()
    assert INVALID_ROWS_INDEX in plan and "Seq Scan" not in plan, plan


def test_an_index_of_invalid_rows_made_by_another_version_only_slows_reads(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A predicate that is not this version's cannot answer the check (SQLite: "no query
    solution"): reads check every row instead of failing."""
    with UsageTracker(sqlite_url) as tracker:
        _rolled_back(tracker)
        with tracker.store.engine.begin() as connection:
            connection.exec_driver_sql(f"DROP INDEX {INVALID_ROWS_INDEX}")
            connection.exec_driver_sql(
                f"CREATE INDEX {INVALID_ROWS_INDEX} ON usage_records (ended_at) "
                "WHERE prompt_tokens < 0"
            )
        with caplog.at_level("WARNING", logger="usage_callbacks"):
            _reads_leave_it_out(tracker)
    assert caplog.text.count("is not the one this version makes") == 1
