"""Summaries of large SQLite files run over rowid ranges in threads: same answers."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from usage_callbacks import TokenUsage, UsageFilter, UsageTracker
from usage_callbacks.store import sql
from usage_callbacks.store.base import GroupBy, UsageSummary

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
GROUPINGS: list[GroupBy | None] = [None, "model", "user", "session", "provider", "day"]


def _fill(tracker: UsageTracker, count: int) -> None:
    rng = random.Random(3)
    for _ in range(count):
        ended = T0 + timedelta(hours=rng.randint(0, 24 * 5), microseconds=rng.randint(0, 10**6))
        tracker.record(
            TokenUsage(
                prompt_tokens=rng.randint(0, 900),
                completion_tokens=rng.randint(0, 90),
                cost_estimate_usd=Decimal(rng.randint(0, 10**6)) / 10**12,
                estimated=rng.random() < 0.1,
            ),
            model=rng.choice(["a", "b", None]),
            provider=rng.choice(["openai", None]),
            user_id=rng.choice(["u1", "u2", None]),
            session_id=rng.choice(["s1", None]),
            status=rng.choice(["ok", "ok", "error"]),
            ended_at=ended,
            started_at=ended,
        )


def _summaries(tracker: UsageTracker, since: datetime) -> list[UsageSummary]:
    return [
        tracker.summary(group_by=group_by, **filters)
        for group_by in GROUPINGS
        for filters in ({}, {"provider": "openai"}, {"since": since}, {"until": since})
    ]


def test_rowid_ranges_give_the_single_query_answers(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    since = T0 + timedelta(days=2)
    with UsageTracker(sqlite_url) as tracker:
        _fill(tracker, 600)
        whole = _summaries(tracker, since)
        monkeypatch.setattr(sql, "_PARALLEL_SUMMARY_ROWS", 100)
        monkeypatch.setattr(sql, "_available_cpus", lambda: 3)
        store = tracker.store
        assert isinstance(store, sql.SqlStore)
        with store.engine.connect() as connection:
            assert len(store._rowid_ranges(connection, UsageFilter())) == 3
            assert len(store._rowid_ranges(connection, UsageFilter(since=since))) == 3
            assert store._rowid_ranges(connection, UsageFilter(model="a")) == []
            short = UsageFilter(since=T0 + timedelta(days=5))
            assert store._rowid_ranges(connection, short) == []
        assert _summaries(tracker, since) == whole
