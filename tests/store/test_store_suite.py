"""One suite, every backend: memory, a SQLite file and PostgreSQL."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from usage_callbacks import TokenUsage, UsageFilter, UsageTracker
from usage_callbacks.store.models import UsageRecord
from usage_callbacks.store.spill import read_records

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def _record(tracker: UsageTracker, tokens: int, **attrs: object) -> UsageRecord:
    attrs.setdefault("model", "gpt-4o-mini")
    return tracker.record(TokenUsage(prompt_tokens=tokens, completion_tokens=0), **attrs)  # type: ignore[arg-type]


def test_record_round_trips_every_field(tracker: UsageTracker) -> None:
    usage = TokenUsage(
        prompt_tokens=1200,
        completion_tokens=300,
        cache_read_tokens=200,
        cache_write_tokens=100,
        reasoning_tokens=50,
        cost_estimate_usd=Decimal("0.000123456789"),
    )
    made = tracker.record(
        usage,
        model="gpt-4o",
        provider="openai",
        call_type="chat",
        framework="manual",
        user_id="x'); DROP TABLE usage_records;--",
        session_id="sessión-ü",
        run_id="run-1",
        parent_run_id="run-0",
        tags=["a", "b"],
        status="error",
        error_type="TimeoutError",
        started_at=T0,
        ended_at=T0 + timedelta(seconds=2),
        latency_ms=2000.5,
    )
    [stored] = tracker.records()
    assert stored.id == made.id
    assert stored.usage == usage
    assert stored.cost_estimate_usd == Decimal("0.000123456789")
    assert stored.started_at == T0 and stored.started_at.tzinfo is not None
    assert stored.ended_at == T0 + timedelta(seconds=2)
    assert stored.user_id == "x'); DROP TABLE usage_records;--"
    assert stored.session_id == "sessión-ü"
    assert stored.tags == ["a", "b"]
    assert (stored.status, stored.error_type, stored.latency_ms) == (
        "error",
        "TimeoutError",
        2000.5,
    )
    assert (stored.run_id, stored.parent_run_id, stored.provider) == ("run-1", "run-0", "openai")
    assert stored.cost_known is True  # a cost given by the caller is kept


def test_summary_percentiles_and_groups(tracker: UsageTracker) -> None:
    for tokens in range(1, 101):
        model = "gpt-4o-mini" if tokens % 2 else "gpt-4o"
        _record(tracker, tokens, model=model, user_id=f"u{tokens % 3}", ended_at=T0)
    summary = tracker.summary(group_by="model")
    assert summary.calls == 100
    assert summary.usage.total_tokens == 5050
    # nearest rank: the ceil(p% * n)-th smallest value
    assert (summary.stats.p50, summary.stats.p95, summary.stats.p99) == (50, 95, 99)
    assert (summary.stats.min, summary.stats.max, summary.stats.avg) == (1, 100, 50.5)
    groups = {group.key: group for group in summary.groups}
    assert groups["gpt-4o"].calls == 50 and groups["gpt-4o"].usage.total_tokens == 2550
    odd = sorted(range(1, 101, 2))
    assert groups["gpt-4o-mini"].stats.p95 == odd[math.ceil(0.95 * 50) - 1]
    assert summary.usage.cost_estimate_usd == sum(g.usage.cost_estimate_usd for g in summary.groups)
    assert summary.period_start == T0 == summary.period_end
    by_user = tracker.summary(group_by="user")
    assert sorted(g.key for g in by_user.groups) == ["u0", "u1", "u2"]
    assert sum(g.calls for g in by_user.groups) == 100


def test_summary_by_day_and_filters(tracker: UsageTracker) -> None:
    for day in range(3):
        for _ in range(day + 1):
            _record(tracker, 10, ended_at=T0 + timedelta(days=day), session_id=f"s{day}")
    by_day = tracker.summary(group_by="day")
    assert {g.key: g.calls for g in by_day.groups} == {
        "2026-03-01": 1,
        "2026-03-02": 2,
        "2026-03-03": 3,
    }
    assert tracker.summary(since=T0 + timedelta(days=1)).calls == 5
    assert tracker.summary(until=T0 + timedelta(days=1)).calls == 1
    assert tracker.summary(session_id="s2").calls == 3
    assert tracker.summary(model="nope").calls == 0
    assert tracker.summary(model="nope").usage == TokenUsage()


def test_exact_cost_sums(tracker: UsageTracker) -> None:
    cost = Decimal("0.000000000001")  # one pico-dollar
    for _ in range(1000):
        tracker.record(TokenUsage(prompt_tokens=1, cost_estimate_usd=cost), model="m")
    assert tracker.summary().usage.cost_estimate_usd == Decimal("0.000000001")


def test_purge_and_iteration(tracker: UsageTracker) -> None:
    for day in range(5):
        _record(tracker, day + 1, ended_at=T0 + timedelta(days=day))
    assert tracker.purge(before=T0 + timedelta(days=2)) == 2
    tokens = [
        record.total_tokens for record in tracker.store.iter_records(UsageFilter(), chunk_size=2)
    ]
    assert tokens == [3, 4, 5]


def test_writes_are_idempotent(tracker: UsageTracker) -> None:
    record = _record(tracker, 7)
    tracker.flush()
    tracker.store.write([record, record])
    assert len(tracker.records()) == 1


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        UsageFilter(since=datetime(2026, 1, 1))


def test_over_long_and_non_text_values_are_fitted_not_left_to_fail_the_batch(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # PostgreSQL refuses a value longer than its column: one such row used to fail its
    # whole batch on every retry, and every record queued after it with it
    with UsageTracker(store_url, flush_interval=0.01) as tracker:
        tracker.record(TokenUsage(prompt_tokens=1), user_id="u" * 300, model="m" * 400)
        tracker.record(TokenUsage(prompt_tokens=2), user_id=42, session_id=7)  # type: ignore[arg-type]
        assert tracker.flush(timeout=10)
        first, second = tracker.records()
    assert (first.user_id, first.model) == ("u" * 256, "m" * 256)
    assert (second.user_id, second.session_id) == ("42", "7")
    assert "user_id is 300 characters; storing its first 256" in caplog.text


def test_a_row_the_database_refuses_is_set_aside_and_later_records_still_land(
    store_url: str, tmp_path: Path
) -> None:
    # 10^8 USD is 10^20 pico-USD: beyond the BIGINT column on every backend. TokenUsage
    # refuses it (at most $10^5 a call); an unvalidated one stands for any row a database
    # may refuse
    spill = tmp_path / "spill.jsonl"
    unvalidated = TokenUsage.model_construct(
        **{**TokenUsage(prompt_tokens=1).__dict__, "cost_estimate_usd": Decimal(10**8)}
    )
    with UsageTracker(store_url, flush_interval=0.01, spill_path=spill) as tracker:
        bad = tracker.record(unvalidated)
        tracker.record(TokenUsage(prompt_tokens=2), model="gpt-4o-mini")
        assert tracker.flush(timeout=10)
        assert [record.prompt_tokens for record in tracker.records()] == [2]
    [kept] = read_records(tmp_path / "spill.rejected.jsonl")
    assert kept.id == bad.id and kept.cost_estimate_usd == Decimal(10**8)


def test_text_no_store_can_take_is_stored_escaped_and_later_records_land(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # a lone surrogate (valid in JSON, not in UTF-8) used to kill the writer thread:
    # nothing more was stored, record() stalled and close() took 30 s
    surrogate = json.loads('"\\ud800"')
    with UsageTracker(store_url, flush_interval=0.01) as tracker:
        tracker.record(
            TokenUsage(prompt_tokens=1), user_id=surrogate, session_id="ü", tags=[surrogate]
        )
        for _ in range(3):
            tracker.record(TokenUsage(prompt_tokens=2), user_id="ok")
        assert tracker.flush(timeout=10)
        first, *later = tracker.records()
    assert (first.user_id, first.session_id, first.tags) == ("\\ud800", "ü", ["\\ud800"])
    assert [record.user_id for record in later] == ["ok"] * 3
    assert "user_id is not UTF-8 text; storing it escaped as '\\\\ud800'" in caplog.text
