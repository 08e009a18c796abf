"""A local JSONL file for records the database has not taken yet.

When the write queue outgrows its bound (the database is away, or slower than the
callers), the oldest records go here instead of waiting in memory; they are re-ingested
(idempotently, by record id) once writes succeed again, or by hand with
``usage-callbacks ingest FILE``. Appending never waits for the database: a drain first
moves the file aside, then writes it to the store while new appends start a new file.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Protocol

from usage_callbacks.files import create_private
from usage_callbacks.store.models import UsageRecord

logger = logging.getLogger("usage_callbacks")


class _Writable(Protocol):
    def write(self, records: Sequence[UsageRecord]) -> None: ...


def spill_base() -> Path:
    """``$XDG_STATE_HOME/usage-callbacks``, else ``~/.cache/usage-callbacks``."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "usage-callbacks"


#: numbers the spill files of one process's trackers: each has its own, or one tracker's
#: drain would take another's records
_spill_numbers = itertools.count(1)


def default_spill_path(folder: Path | None = None) -> Path:
    """A new spill file of this process, in ``folder`` (its database's) or the base one."""
    return (folder or spill_base()) / f"spill-{os.getpid()}-{next(_spill_numbers)}.jsonl"


class SpillFile:
    """Append-only JSONL of UsageRecords; appends are thread-safe, one thread drains."""

    def __init__(self, path: Path) -> None:
        self.path = path
        #: the file a drain writes to the store; left in place when the store fails
        self.draining = path.with_name(f"{path.name}.draining")
        self._lock = threading.Lock()
        self._appended = 0  # lines appended to ``path`` through this object
        self._taken = 0  # of those, the lines moved into ``draining``

    def append(self, records: Iterable[UsageRecord]) -> int:
        """Append one line per record; a record that cannot be serialized is logged and
        left out (it must not cost the others their place). Returns the lines written."""
        lines = [line for record in records if (line := _json_line(record)) is not None]
        with self._lock:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            create_private(self.path)  # owner-only when new
            with self.path.open("a+b") as handle:
                if handle.tell() and not _ends_with_newline(handle):
                    # the last append was torn (disk full mid-write): end that line, or
                    # the first record appended now would be glued to it and lost with it
                    handle.write(b"\n")
                # no fsync (~2 ms a call): the kernel keeps what a killed process wrote,
                # and a power cut takes the records queued in memory as well
                handle.write("".join(lines).encode("utf-8"))
            self._appended += len(lines)
        return len(lines)

    def exists(self) -> bool:
        # in the order a drain moves the file: a check that races it still finds it
        return any(path.exists() and path.stat().st_size > 0 for path in (self.path, self.draining))

    def drain(self, store: _Writable, batch_size: int = 1000) -> int:
        """Write the spilled records to ``store`` and delete what was written: the file
        left by a failed drain first, else the spill file, moved aside so that appends go
        on meanwhile. Returns how many of the lines written this object appended (not
        lines an earlier process left in a file of the same name)."""
        with self._lock:
            if not self.draining.exists():
                if not self.path.exists():
                    return 0
                self.path.replace(self.draining)
                self._taken, self._appended = self._appended, 0
        ingest_file(self.draining, store, batch_size)  # may raise: the file stays for a retry
        self.draining.unlink()
        taken, self._taken = self._taken, 0
        return taken


#: Fields every record has carried since the first release: an object without them is
#: not a usage record (every other field has a default, so ``{}`` would validate).
RECORD_KEYS = ("id", "started_at", "ended_at", "total_tokens", "cost_estimate_usd")


def parse_record(line: str) -> UsageRecord:
    """One spill-file line as a record; ValueError when it is not one."""
    data = json.loads(line)
    if not isinstance(data, dict) or not all(key in data for key in RECORD_KEYS):
        raise ValueError(f"not a usage record (a record has {', '.join(RECORD_KEYS)})")
    return UsageRecord.model_validate(data)


def _json_line(record: UsageRecord) -> str | None:
    try:
        return record.model_dump_json() + "\n"
    except ValueError as error:  # pydantic's serialization error: a value JSON cannot hold
        logger.error("usage record %s cannot be written as JSON (%s); it is lost", record.id, error)
        return None


def _ends_with_newline(handle: BinaryIO) -> bool:
    handle.seek(-1, os.SEEK_END)
    return handle.read(1) == b"\n"


def read_records(path: Path) -> Iterator[UsageRecord]:
    """Records of a spill file; malformed lines are logged and skipped."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield parse_record(line)
            except (ValueError, TypeError) as error:
                logger.warning("%s:%d: skipping malformed record (%s)", path, number, error)


def ingest_file(path: Path, store: _Writable, batch_size: int = 1000) -> int:
    """Write a spill file's records to ``store`` (already stored ids are skipped)."""
    batch: list[UsageRecord] = []
    count = 0
    for record in read_records(path):
        batch.append(record)
        if len(batch) >= batch_size:
            store.write(batch)
            count += len(batch)
            batch = []
    if batch:
        store.write(batch)
        count += len(batch)
    return count
