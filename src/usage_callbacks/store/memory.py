"""The in-process store: the SQL store on a private in-memory SQLite database.

Reusing the SQL store keeps one implementation of filters, summaries and budgets. The
single shared connection is guarded by a lock; records live as long as the process.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from datetime import datetime

from usage_callbacks.store.base import (
    DailyUsage,
    GroupBy,
    UsageFilter,
    UsageSummary,
)
from usage_callbacks.store.models import UsageRecord
from usage_callbacks.store.sql import SqlStore


class _ForkSafeLock:
    """A re-entrant lock that a forked child can replace: a child inherits the parent's
    lock in whatever state the parent's threads left it, and one held by the writer
    thread at the fork would block the child's every read and write for good."""

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()

    def renew(self) -> None:
        self._lock = threading.RLock()


class MemoryStore(SqlStore):
    """Per-process, lock-serialized store; nothing survives the process."""

    lock: _ForkSafeLock

    def __init__(self) -> None:
        self.lock = _ForkSafeLock()
        super().__init__("memory://")

    def write(self, records: Sequence[UsageRecord]) -> None:
        with self.lock:
            super().write(records)

    def purge(self, before: datetime, where: UsageFilter | None = None) -> int:
        with self.lock:
            return super().purge(before, where)

    def records(
        self, where: UsageFilter, limit: int | None = None, newest_first: bool = False
    ) -> list[UsageRecord]:
        with self.lock:
            return super().records(where, limit, newest_first)

    def daily_by_model(self, where: UsageFilter, *, hourly: bool = False) -> list[DailyUsage]:
        with self.lock:
            return super().daily_by_model(where, hourly=hourly)

    def iter_records(self, where: UsageFilter, chunk_size: int = 1000) -> Iterator[UsageRecord]:
        return iter(self.records(where))

    def summary(self, where: UsageFilter, group_by: GroupBy | None) -> UsageSummary:
        with self.lock:
            return super().summary(where, group_by)

    def reopen_in_child(self) -> None:
        """The child keeps its copy of the database (its one connection is private memory),
        with a lock of its own, and without a transaction a parent's thread left open."""
        self.lock.renew()
        connection = self.engine.raw_connection()
        try:
            connection.rollback()  # the parent's write in flight, if any: the parent's to keep
        finally:
            connection.close()
