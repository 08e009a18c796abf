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


class MemoryStore(SqlStore):
    """Per-process, lock-serialized store; nothing survives the process."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
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
        """The child keeps its copy of the database: its one connection is private memory."""
