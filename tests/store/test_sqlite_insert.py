"""SQLite's multi-row insert: every record lands once, whatever the batch size."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from usage_callbacks import TokenUsage, UsageFilter
from usage_callbacks.store.models import UsageRecord
from usage_callbacks.store.sql import SqlStore
from usage_callbacks.store.sqlite_insert import MAX_ROWS_PER_STATEMENT, _chunk_sizes, _max_rows

T0 = datetime(2026, 5, 1, 8, 30, tzinfo=timezone.utc)


@pytest.mark.parametrize("count", [0, 1, 2, 3, 255, 1023, 1024, 1025, 2049, 5000])
def test_chunks_cover_the_batch_in_few_statement_sizes(count: int) -> None:
    sizes = _chunk_sizes(count, MAX_ROWS_PER_STATEMENT)
    assert sum(sizes) == count
    assert all(size & (size - 1) == 0 and size <= MAX_ROWS_PER_STATEMENT for size in sizes)
    assert len(set(sizes)) <= MAX_ROWS_PER_STATEMENT.bit_length()


def test_old_sqlite_gets_statements_within_its_999_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import usage_callbacks.store.sqlite_insert as module

    assert _max_rows(27) * 27 <= 32_766
    monkeypatch.setattr(module.sqlite3, "sqlite_version_info", (3, 31, 1))
    assert _max_rows(27) * 27 <= 999
    assert _max_rows(27) >= 16


def _records(count: int, start: int = 0) -> list[UsageRecord]:
    return [
        UsageRecord(
            id=f"r{index:031d}",
            started_at=T0 + timedelta(microseconds=index),
            ended_at=T0 + timedelta(seconds=1, microseconds=index),
            model=f"m{index % 3}",
            user_id=None if index % 5 else f"u{index}",
            tags=["t"] if index % 7 == 0 else [],
            prompt_tokens=index,
            total_tokens=index,
            cost_estimate_usd=Decimal(index) / 10**9,
            estimated=index % 2 == 0,
        )
        for index in range(start, start + count)
    ]


def test_a_batch_across_chunk_sizes_round_trips_and_skips_stored_ids(tmp_path: Path) -> None:
    store = SqlStore(f"sqlite:///{tmp_path / 'bulk.db'}")
    store.write(_records(2500))
    store.write(_records(1000, start=2000))  # 500 stored already, 500 new
    stored = store.records(UsageFilter())
    assert len(stored) == 3000
    assert [record.id for record in stored] == [f"r{index:031d}" for index in range(3000)]
    for record in (stored[0], stored[1777], stored[2999]):
        index = record.prompt_tokens
        assert record.started_at == T0 + timedelta(microseconds=index)
        assert record.ended_at.tzinfo is not None
        assert record.cost_estimate_usd == Decimal(index) / 10**9
        assert record.tags == (["t"] if index % 7 == 0 else [])
        assert record.estimated is (index % 2 == 0)
        assert record.usage == TokenUsage(prompt_tokens=index, estimated=index % 2 == 0).with_cost(
            Decimal(index) / 10**9
        )
    store.close()
