"""The batch writer: size and age bounds, flush, retries after failures."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from usage_callbacks.store import writer as writer_module
from usage_callbacks.store.models import UsageRecord
from usage_callbacks.store.spill import SpillFile, read_records
from usage_callbacks.store.writer import BatchWriter


class _RecordingStore:
    def __init__(self, failures: int = 0) -> None:
        self.batches: list[list[str]] = []
        self.failures = failures
        self.lock = threading.Lock()

    def write(self, records: Sequence[UsageRecord]) -> None:
        with self.lock:
            if self.failures:
                self.failures -= 1
                raise OSError("disk full")
            self.batches.append([record.id for record in records])


def test_full_batches_are_written_without_waiting_for_the_age_bound() -> None:
    store = _RecordingStore()
    writer = BatchWriter(store, batch_size=10, max_delay=3600)
    records = [UsageRecord() for _ in range(30)]
    for record in records:
        writer.submit(record)
    deadline = time.monotonic() + 10
    while sum(map(len, store.batches)) < 30 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [len(batch) for batch in store.batches] == [10, 10, 10]
    assert [i for batch in store.batches for i in batch] == [r.id for r in records]
    writer.close()


def test_a_lone_record_is_written_after_max_delay() -> None:
    store = _RecordingStore()
    writer = BatchWriter(store, batch_size=100, max_delay=0.05)
    writer.submit(UsageRecord())
    deadline = time.monotonic() + 10
    while not store.batches and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(store.batches) == 1
    writer.close()


def test_flush_waits_for_everything_submitted() -> None:
    store = _RecordingStore()
    writer = BatchWriter(store, batch_size=1000, max_delay=3600)
    for _ in range(7):
        writer.submit(UsageRecord())
    assert writer.flush(timeout=10)
    assert sum(map(len, store.batches)) == 7
    assert writer.pending == 0
    writer.close()


def test_failed_batches_are_retried_in_order_and_nothing_is_lost() -> None:
    store = _RecordingStore(failures=3)
    writer = BatchWriter(store, batch_size=5, max_delay=0.01)
    records = [UsageRecord() for _ in range(12)]
    for record in records:
        writer.submit(record)
    assert writer.flush(timeout=30)
    assert [i for batch in store.batches for i in batch] == [r.id for r in records]
    writer.close()


def test_flush_times_out_while_the_store_is_down_and_close_spills(tmp_path: Path) -> None:
    store = _RecordingStore(failures=10**6)
    spill = SpillFile(tmp_path / "spill.jsonl")
    writer = BatchWriter(store, batch_size=5, max_delay=0.01, spill=spill)
    record = UsageRecord()
    writer.submit(record)
    assert writer.flush(timeout=0.2) is False
    assert writer.pending == 1
    writer.close(timeout=0.2)
    assert [r.id for r in read_records(spill.path)] == [record.id]
    assert writer.pending == 0


def test_concurrent_submitters_lose_nothing() -> None:
    store = _RecordingStore()
    # an hour's max_delay: only full batches and flush() write; a small buffer pushes back
    writer = BatchWriter(store, batch_size=64, max_delay=3600, max_buffer=256)

    def submit_many() -> None:
        for _ in range(500):
            writer.submit(UsageRecord())

    threads = [threading.Thread(target=submit_many) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert writer.flush(timeout=30)
    ids = [i for batch in store.batches for i in batch]
    assert len(ids) == len(set(ids)) == 8000
    assert writer.pending == 0
    writer.close()


def test_overflow_spills_to_jsonl_and_is_reingested_when_the_store_returns(
    tmp_path: Path,
) -> None:
    store = _RecordingStore(failures=10**6)
    spill = SpillFile(tmp_path / "spill.jsonl")
    writer = BatchWriter(store, batch_size=10, max_delay=0.01, max_buffer=20, spill=spill)
    records = [UsageRecord(prompt_tokens=i, total_tokens=i) for i in range(55)]
    for record in records:
        writer.submit(record)
    assert spill.exists()
    spilled = [record.id for record in read_records(spill.path)]
    # at most max_buffer queued plus one batch in flight; the rest went to disk
    assert writer.pending <= 30 and len(spilled) == 55 - writer.pending
    with store.lock:
        store.failures = 0  # the database is back
    assert writer.flush(timeout=30)
    deadline = time.monotonic() + 10
    while spill.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    written = [i for batch in store.batches for i in batch]
    assert sorted(written) == sorted(record.id for record in records)
    assert not spill.path.exists()
    writer.close()


def test_spill_files_round_trip_every_field(tmp_path: Path) -> None:
    from decimal import Decimal

    from usage_callbacks import TokenUsage, UsageTracker

    with UsageTracker("memory://") as source:
        record = source.record(
            TokenUsage(prompt_tokens=5, completion_tokens=2, cost_estimate_usd=Decimal("0.1")),
            model="m",
            user_id="ü",
            tags=["t"],
        )
    spill = SpillFile(tmp_path / "s.jsonl")
    spill.append([record])
    (tmp_path / "s.jsonl").open("a").write("not json\n")
    with UsageTracker("memory://") as target:
        assert target.ingest(spill.path) == 1
        assert target.ingest(spill.path) == 1  # idempotent: still one row
        [copy] = target.records()
    assert copy.model_dump() == record.model_dump()


def test_a_stalled_but_healthy_store_gets_its_spilled_records_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backpressure gives up after a while and spills; nothing failed, yet all arrive."""
    monkeypatch.setattr(writer_module, "_BACKPRESSURE_LIMIT_S", 0.01)
    store = _RecordingStore()
    stalled = threading.Event()
    slow_write = store.write

    def write(records: Sequence[UsageRecord]) -> None:
        stalled.wait(10)
        slow_write(records)

    store.write = write  # type: ignore[method-assign]
    spill = SpillFile(tmp_path / "spill.jsonl")
    writer = BatchWriter(store, batch_size=5, max_delay=3600, max_buffer=5, spill=spill)
    records = [UsageRecord() for _ in range(40)]
    for record in records:
        writer.submit(record)
    assert spill.exists()  # the stall outlasted the backpressure limit
    stalled.set()
    writer.close()
    written = [record_id for batch in store.batches for record_id in batch]
    assert sorted(written) == sorted(record.id for record in records)
    assert not spill.exists()


class _PickyStore(_RecordingStore):
    """Refuses batches holding a record it cannot take, as a database refuses a bad row."""

    def __init__(self, bad: set[str], error: Exception) -> None:
        super().__init__()
        self.bad = bad
        self.error = error

    def write(self, records: Sequence[UsageRecord]) -> None:
        if any(record.id in self.bad for record in records):
            raise self.error
        super().write(records)


def test_records_the_store_refuses_are_set_aside_and_the_rest_written(tmp_path: Path) -> None:
    records = [UsageRecord() for _ in range(9)]
    store = _PickyStore({records[2].id, records[7].id}, ValueError("value too long"))
    spill = SpillFile(tmp_path / "s.jsonl")
    writer = BatchWriter(store, batch_size=5, max_delay=3600, spill=spill)
    for record in records:
        writer.submit(record)
    assert writer.flush(timeout=10)
    written = [i for batch in store.batches for i in batch]
    assert written == [r.id for r in records if r.id not in store.bad]
    rejected = tmp_path / "s.rejected.jsonl"
    assert [r.id for r in read_records(rejected)] == [records[2].id, records[7].id]
    writer.close()


def test_a_store_that_cannot_write_at_all_keeps_the_batch_for_retry(tmp_path: Path) -> None:
    records = [UsageRecord() for _ in range(3)]
    store = _PickyStore({records[0].id}, sqlite3.OperationalError("disk I/O error"))
    writer = BatchWriter(store, batch_size=3, max_delay=3600, spill=SpillFile(tmp_path / "s.jsonl"))
    for record in records:
        writer.submit(record)
    assert not writer.flush(timeout=0.3)  # not set aside: retried until the store recovers
    assert not (tmp_path / "s.rejected.jsonl").exists()
    store.bad.clear()
    assert writer.flush(timeout=10)
    assert sorted(i for batch in store.batches for i in batch) == sorted(r.id for r in records)
    writer.close()


def test_a_torn_spill_line_costs_only_itself(tmp_path: Path) -> None:
    """Disk full mid-append leaves a line without its newline; the next append must not
    be glued to it (and lost with it)."""
    spill = SpillFile(tmp_path / "s.jsonl")
    first, second = UsageRecord(), UsageRecord()
    spill.append([first])
    with spill.path.open("ab") as handle:
        handle.write(UsageRecord().model_dump_json().encode()[:40])  # torn: no newline
    spill.append([second])
    assert [record.id for record in read_records(spill.path)] == [first.id, second.id]


def test_a_record_json_cannot_hold_is_left_out_of_the_spill_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # validation refuses it; model_construct stands for a record that got past it
    bad = UsageRecord.model_construct(user_id=json.loads('"\\ud800"'))
    good = UsageRecord()
    spill = SpillFile(tmp_path / "s.jsonl")
    assert spill.append([bad, good]) == 1
    assert [record.id for record in read_records(spill.path)] == [good.id]
    assert f"usage record {bad.id} cannot be written as JSON" in caplog.text


def test_a_refused_record_json_cannot_hold_does_not_stop_the_writer(tmp_path: Path) -> None:
    """Setting such a record aside used to raise in the writer thread and end it: nothing
    after it was ever written."""
    # validation refuses it; model_construct stands for a record that got past it
    bad = UsageRecord.model_construct(user_id=json.loads('"\\ud800"'))
    later = [UsageRecord() for _ in range(3)]
    store = _PickyStore({bad.id}, UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogate"))
    writer = BatchWriter(store, batch_size=2, max_delay=3600, spill=SpillFile(tmp_path / "s"))
    for record in [bad, *later]:
        writer.submit(record)
    assert writer.flush(timeout=10)
    assert sorted(i for batch in store.batches for i in batch) == sorted(r.id for r in later)
    writer.close()
