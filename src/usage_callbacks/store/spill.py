"""A local JSONL file for records the database could not take while it was away.

When the write buffer overflows during an outage, the oldest records go here instead
of being dropped; they are re-ingested (idempotently, by record id) once writes succeed
again, or by hand with ``usage-callbacks ingest FILE``.
"""

from __future__ import annotations

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


def default_spill_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "usage-callbacks" / f"spill-{os.getpid()}.jsonl"


class SpillFile:
    """Append-only JSONL of UsageRecords; thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

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
                handle.write("".join(lines).encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
        return len(lines)

    def exists(self) -> bool:
        return self.path.exists() and self.path.stat().st_size > 0

    def drain(self, store: _Writable, batch_size: int = 1000) -> int:
        """Write every spilled record to ``store`` and delete the file; returns the count."""
        with self._lock:
            if not self.path.exists():
                return 0
            count = ingest_file(self.path, store, batch_size)
            self.path.unlink()
            return count


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
