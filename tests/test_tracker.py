"""UsageTracker: pricing on record, cache hits, durability, exit flush."""

from __future__ import annotations

import logging
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from genai_prices import Usage, calc_price

from usage_callbacks import ModelPrice, TokenUsage, UsageFilter, UsageTracker


def test_record_prices_with_genai_prices(memory_tracker: UsageTracker) -> None:
    usage = TokenUsage(prompt_tokens=1000, completion_tokens=400, cache_read_tokens=600)
    record = memory_tracker.record(usage, model="gpt-4o-mini", provider="openai")
    expected = calc_price(
        Usage(input_tokens=1000, output_tokens=400, cache_read_tokens=600),
        model_ref="gpt-4o-mini",
        provider_id="openai",
    ).total_price
    assert record.cost_estimate_usd == expected
    assert record.cost_known


def test_unknown_models_cost_nothing_and_warn_once(
    memory_tracker: UsageTracker, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="usage_callbacks"):
        for _ in range(3):
            record = memory_tracker.record(TokenUsage(prompt_tokens=5), model="in-house-llm-7b")
    assert record.cost_estimate_usd == 0 and record.cost_known is False
    assert sum("in-house-llm-7b" in message for message in caplog.messages) == 1


def test_user_prices_win() -> None:
    prices = {"in-house-llm-7b": ModelPrice(input_per_mtok=Decimal(2), output_per_mtok=Decimal(8))}
    with UsageTracker("memory://", prices=prices) as tracker:
        record = tracker.record(
            TokenUsage(prompt_tokens=1_000_000, completion_tokens=500_000), model="in-house-llm-7b"
        )
    assert record.cost_estimate_usd == Decimal(6) and record.cost_known


def test_cache_hits_bill_nothing(memory_tracker: UsageTracker) -> None:
    record = memory_tracker.record(
        TokenUsage(prompt_tokens=100, completion_tokens=10), model="gpt-4o", cache_hit=True
    )
    assert record.cache_hit and record.total_tokens == 0 and record.cost_estimate_usd == 0


def test_durable_mode_writes_before_returning(sqlite_url: str) -> None:
    with UsageTracker(sqlite_url, durable=True, flush_interval=3600) as tracker:
        tracker.record(TokenUsage(prompt_tokens=3), model="m")
        assert len(tracker.store.records(UsageFilter())) == 1


def test_batched_mode_defers_writes_until_flush(sqlite_url: str) -> None:
    with UsageTracker(sqlite_url, flush_interval=3600, batch_size=1000) as tracker:
        tracker.record(TokenUsage(prompt_tokens=3), model="m")
        assert tracker.store.records(UsageFilter()) == []
        tracker.flush()
        assert len(tracker.store.records(UsageFilter())) == 1


def test_a_normal_exit_without_close_loses_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'exit.db'}"
    script = (
        "from usage_callbacks import TokenUsage, UsageTracker\n"
        f"tracker = UsageTracker({url!r}, flush_interval=3600, batch_size=100000)\n"
        "for _ in range(250):\n"
        "    tracker.record(TokenUsage(prompt_tokens=2), model='m')\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    with UsageTracker(url) as reader:
        assert reader.summary().calls == 250


def test_log_line(caplog: pytest.LogCaptureFixture) -> None:
    with (
        caplog.at_level(logging.INFO, logger="usage_callbacks"),
        UsageTracker("memory://", log_usage=True) as tracker,
    ):
        tracker.record(TokenUsage(prompt_tokens=1234, completion_tokens=567), model="gpt-4o-mini")
    assert (
        "Token usage: prompt=1234, completion=567, total=1801, embedding=0, model=gpt-4o-mini, "
        "cost=$0.000525" in caplog.messages
    )


def test_the_log_line_shows_the_parts_there_are(caplog: pytest.LogCaptureFixture) -> None:
    usage = TokenUsage(
        prompt_tokens=1000,
        completion_tokens=500,
        input_audio_tokens=800,
        output_audio_tokens=400,
        web_search_requests=2,
    )
    with (
        caplog.at_level(logging.INFO, logger="usage_callbacks"),
        UsageTracker("memory://", log_usage=True) as tracker,
    ):
        tracker.record(usage, model="gpt-audio")
    [line] = [m for m in caplog.messages if m.startswith("Token usage:")]
    assert line.endswith(", input_audio=800, output_audio=400, web_search_requests=2")


def _ids_in_child(_: int) -> list[str]:
    from usage_callbacks.store.models import new_record_id

    return [new_record_id() for _ in range(1000)]


def test_record_ids_stay_unique_across_forked_workers() -> None:
    import multiprocessing

    from usage_callbacks.store.models import new_record_id

    parent = [new_record_id() for _ in range(1000)]
    with multiprocessing.get_context("fork").Pool(4) as pool:
        children = pool.map(_ids_in_child, range(8))
    every = parent + [i for ids in children for i in ids]
    assert len(set(every)) == len(every) == 9000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in every)


def test_bad_times_are_refused_at_the_call_and_do_not_block_later_records(
    sqlite_url: str,
) -> None:
    with UsageTracker(sqlite_url, flush_interval=0.01) as tracker:
        with pytest.raises(ValueError, match="naive"):
            tracker.record(TokenUsage(prompt_tokens=1), ended_at=datetime(2026, 1, 1, 12))
        with pytest.raises(TypeError, match="started_at must be a datetime"):
            tracker.record(TokenUsage(prompt_tokens=1), started_at="2026-01-01")  # type: ignore[arg-type]
        paris = timezone(timedelta(hours=1))
        made = tracker.record(
            TokenUsage(prompt_tokens=2), ended_at=datetime(2026, 1, 1, 13, tzinfo=paris)
        )
        assert made.ended_at == datetime(2026, 1, 1, 12, tzinfo=timezone.utc)
        assert made.ended_at.tzinfo is timezone.utc
        tracker.record(TokenUsage(prompt_tokens=3), tags=[7, "x", 7])  # type: ignore[list-item]
        assert tracker.flush(timeout=10)  # a poisoned batch would never flush
        stored = tracker.records()
        assert [record.prompt_tokens for record in stored] == [2, 3]
        assert stored[1].tags == ["7", "x"]
