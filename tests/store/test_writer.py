"""The batch writer: size and age bounds, flush, retries after failures."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from usage_callbacks.store.models import UsageRecord
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


def test_flush_reports_a_timeout_while_the_store_is_down() -> None:
    store = _RecordingStore(failures=10**6)
    writer = BatchWriter(store, batch_size=5, max_delay=0.01)
    writer.submit(UsageRecord())
    assert writer.flush(timeout=0.2) is False
    assert writer.pending == 1


def test_concurrent_submitters_lose_nothing() -> None:
    store = _RecordingStore()
    writer = BatchWriter(store, batch_size=64, max_delay=0.01)

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
    writer.close()
