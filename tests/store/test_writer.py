"""The batch writer: size and age bounds, flush, retries after failures."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

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


def _stall(store: _RecordingStore) -> threading.Event:
    """Make ``store``'s writes wait (healthy, but slow) until the event returned is set."""
    stalled = threading.Event()
    write = store.write

    def stalled_write(records: Sequence[UsageRecord]) -> None:
        stalled.wait(60)
        write(records)

    store.write = stalled_write  # type: ignore[method-assign]
    return stalled


def _spilled_ids(spill: SpillFile) -> set[str]:
    """A drain moves the file aside (and leaves it there when it fails) while appends go
    on in a new one: read in the order it moves, a record moved meanwhile is read twice,
    never missed."""
    ids: set[str] = set()
    for path in (spill.path, spill.draining):
        try:
            ids.update(record.id for record in read_records(path))
        except FileNotFoundError:  # not there, or moved aside meanwhile
            continue
    return ids


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
    # a burst that keeps the GIL may send a batch through the spill file: not in order
    assert sorted(i for batch in store.batches for i in batch) == sorted(r.id for r in records)
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


def test_failed_batches_are_retried_and_nothing_is_lost(tmp_path: Path) -> None:
    store = _RecordingStore(failures=3)
    spill = SpillFile(tmp_path / "spill.jsonl")
    writer = BatchWriter(store, batch_size=5, max_delay=0.01, spill=spill)
    records = [UsageRecord() for _ in range(12)]
    for record in records:
        writer.submit(record)
    assert writer.flush(timeout=30)
    # what outgrew the queue went through the spill file: written once, not in order
    assert sorted(i for batch in store.batches for i in batch) == sorted(r.id for r in records)
    assert not spill.exists()
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
    spilled = _spilled_ids(spill)
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


def test_callers_never_wait_for_a_stalled_store_and_every_record_arrives(
    tmp_path: Path,
) -> None:
    """A healthy store slower than its callers: the queue stays within two batches and
    the rest goes to the spill file, while the callers go on. Callers used to wait for
    the writer, up to 2 s for each batch beyond the first (here 38 s); nothing failed,
    yet all records arrive, each once."""
    store = _RecordingStore()
    stalled = _stall(store)
    spill = SpillFile(tmp_path / "spill.jsonl")
    writer = BatchWriter(store, batch_size=5, max_delay=3600, max_buffer=5, spill=spill)
    records = [UsageRecord() for _ in range(100)]
    caller = threading.Thread(target=lambda: [writer.submit(record) for record in records])
    caller.start()
    caller.join(timeout=20)
    try:
        assert not caller.is_alive()  # every submit returned while the store was stalled
        assert writer.pending <= 3 * 5  # in memory: the batch in flight and two queued
        assert len(_spilled_ids(spill)) >= 100 - 3 * 5
    finally:
        stalled.set()
    assert writer.flush(timeout=30)  # flush() reads back the spill file too
    written = [record_id for batch in store.batches for record_id in batch]
    assert sorted(written) == sorted(record.id for record in records)
    assert not spill.exists()
    writer.close()


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
    assert sorted(written) == sorted(r.id for r in records if r.id not in store.bad)
    rejected = tmp_path / "s.rejected.jsonl"
    assert sorted(r.id for r in read_records(rejected)) == sorted([records[2].id, records[7].id])
    writer.close()


def test_a_refused_record_in_the_spill_file_holds_back_none_of_the_others(
    tmp_path: Path,
) -> None:
    """Records that outgrew the queue of a slow store reach the spill file untried; one
    the store refuses used to fail the whole re-ingestion, leaving the rest on disk."""
    records = [UsageRecord() for _ in range(40)]
    store = _PickyStore(set(), ValueError("value too long"))
    stalled = _stall(store)
    spill = SpillFile(tmp_path / "s.jsonl")
    writer = BatchWriter(store, batch_size=5, max_delay=3600, spill=spill)
    for record in records:
        writer.submit(record)
    bad = next(read_records(spill.path)).id  # a record that went to the spill file
    store.bad.add(bad)
    stalled.set()
    assert writer.flush(timeout=30)
    written = [i for batch in store.batches for i in batch]
    assert sorted(written) == sorted(r.id for r in records if r.id != bad)
    assert [r.id for r in read_records(tmp_path / "s.rejected.jsonl")] == [bad]
    assert not spill.exists()
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


ORPHAN_MAKER = r"""
import os, sys
from usage_callbacks.store.models import UsageRecord
from usage_callbacks.store.orphans import spill_folder
from usage_callbacks.store.spill import SpillFile, default_spill_path
from usage_callbacks.store.writer import BatchWriter
identity, count = sys.argv[1], int(sys.argv[2])
class Away:
    def write(self, records):
        raise OSError("database away")
writer = BatchWriter(Away(), batch_size=5, max_delay=3600, max_buffer=5, store_identity=identity)
for _ in range(count):
    writer.submit(UsageRecord())
print(writer.spill_path, flush=True)
if count == 40:
    os._exit(0)  # dies with its records in the spill file
sys.stdin.read()  # lives until the test is done
"""


def test_the_next_writer_on_a_database_writes_what_dead_processes_spilled(
    tmp_path: Path,
) -> None:
    """A process that died with records in its spill file used to leave them on disk
    until someone ingested the file by hand; a live process's file is not touched."""
    import subprocess
    import sys

    identity = f"sqlite:{tmp_path / 'usage.db'}"
    dead = subprocess.run(
        [sys.executable, "-c", ORPHAN_MAKER, identity, "40"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_spill = SpillFile(Path(dead.stdout.strip()))
    spilled = _spilled_ids(dead_spill)
    assert len(spilled) >= 30
    alive = subprocess.Popen(
        [sys.executable, "-c", ORPHAN_MAKER, identity, "20"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert alive.stdout is not None
        alive_spill = SpillFile(Path(alive.stdout.readline().strip()))
        alive_count = len(_spilled_ids(alive_spill))
        assert alive_count >= 10
        away = _RecordingStore(failures=10**6)  # the store away at start: left for the next
        BatchWriter(away, batch_size=5, store_identity=identity).close(timeout=10)
        assert _spilled_ids(dead_spill) == spilled
        store = _RecordingStore()
        writer = BatchWriter(store, batch_size=5, max_delay=3600, store_identity=identity)
        assert writer.flush(timeout=30)  # waits for the adoption
        assert {i for batch in store.batches for i in batch} == spilled
        assert not dead_spill.exists()
        assert len(_spilled_ids(alive_spill)) == alive_count  # its owner lives
        writer.close()
        folder = alive_spill.path.parent  # the dead process's claim went with its file
        assert sorted(path.name for path in folder.glob("*.lock")) == [
            f"{alive_spill.path.name}.lock"
        ]
        other = _RecordingStore()  # another database's tracker takes nothing
        BatchWriter(other, batch_size=5, store_identity="postgresql://elsewhere").close()
        assert other.batches == []
    finally:
        alive.communicate("")


def test_two_writers_on_one_database_in_one_process_keep_their_own_spill_files() -> None:
    """They shared one file: the second waited for the first's claim for good, and one's
    re-ingestion would take the other's records."""
    first = BatchWriter(_RecordingStore(), store_identity="sqlite:/db")
    second = BatchWriter(_RecordingStore(), store_identity="sqlite:/db")
    assert first.spill_path != second.spill_path
    assert first.spill_path.parent == second.spill_path.parent
    first.close()
    second.close()


def test_a_steady_caller_holding_the_gil_spills_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A caller that keeps the GIL (Python work between records, as in a framework's
    call) queues on for up to 5 ms after waking the writer for a full batch. With one
    batch allowed beside the one in flight, nearly every batch went to the spill file."""
    store = _RecordingStore()
    spill = SpillFile(tmp_path / "spill.jsonl")
    # 500 records (~100 ms) of slack for the writer to be scheduled, on a loaded machine
    writer = BatchWriter(store, batch_size=500, max_delay=3600, spill=spill)
    records = [UsageRecord() for _ in range(3000)]
    with caplog.at_level(logging.INFO, logger="usage_callbacks"):
        for record in records:
            writer.submit(record)
            deadline = time.perf_counter() + 0.0002
            while time.perf_counter() < deadline:  # ~200 µs of work, without a GIL release
                pass
        assert writer.flush(timeout=30)
    assert "spill" not in caplog.text
    assert [i for batch in store.batches for i in batch] == [r.id for r in records]
    writer.close()
