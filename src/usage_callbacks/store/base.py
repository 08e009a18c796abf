"""What every store offers, and the filter and summary shapes they share."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from pydantic import BaseModel, Field

from usage_callbacks.store.models import UsageRecord
from usage_callbacks.usage import TokenUsage

GroupBy = Literal["model", "user", "provider", "session", "day"]


@dataclass(frozen=True)
class UsageFilter:
    """Which records a query looks at; every field left None matches everything."""

    user_id: str | None = None
    session_id: str | None = None
    model: str | None = None
    provider: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise ValueError(f"{name}={value!r} is naive; pass a timezone-aware datetime")


class TokenStats(BaseModel):
    """Per-call distribution of total tokens (nearest-rank percentiles)."""

    count: int = 0
    avg: float = 0.0
    min: int = 0
    max: int = 0
    p50: int = 0
    p95: int = 0
    p99: int = 0


class GroupSummary(BaseModel):
    key: str | None
    usage: TokenUsage
    calls: int
    errors: int = 0
    stats: TokenStats
    first_call: datetime | None = None
    last_call: datetime | None = None


class UsageSummary(BaseModel):
    group_by: GroupBy | None = None
    usage: TokenUsage = Field(default_factory=TokenUsage)
    calls: int = 0
    errors: int = 0
    stats: TokenStats = Field(default_factory=TokenStats)
    period_start: datetime | None = None
    period_end: datetime | None = None
    groups: list[GroupSummary] = Field(default_factory=list)


class DailyUsage(BaseModel):
    day: str
    model: str
    usage: TokenUsage


class UsageStore(Protocol):
    """Persistence for usage records; implementations must be thread-safe."""

    def write(self, records: Sequence[UsageRecord]) -> None:
        """Insert records; a record id already stored is skipped (idempotent retries)."""

    def records(
        self, where: UsageFilter, limit: int | None = None, newest_first: bool = False
    ) -> list[UsageRecord]: ...

    def daily_by_model(self, where: UsageFilter) -> list[DailyUsage]: ...

    def iter_records(self, where: UsageFilter, chunk_size: int = 1000) -> Iterator[UsageRecord]:
        """Stream records oldest first in constant memory."""
        ...

    def summary(self, where: UsageFilter, group_by: GroupBy | None) -> UsageSummary: ...

    def purge(self, before: datetime) -> int: ...

    def close(self) -> None: ...
