"""What every store offers, and the filter and summary shapes they share."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from pydantic import BaseModel, Field

from usage_callbacks.attribution import check_dimension_keys
from usage_callbacks.store.models import UsageRecord
from usage_callbacks.usage import TokenUsage

#: ``"node"``, ``"node,model"``, ``("node", "model")``, ``"dimension:tenant"``: see
#: ``group_levels``.
GroupBy = str | Sequence[str]

#: What a summary groups by, and the record column behind it ("day" is computed).
GROUP_COLUMNS = {
    "model": "model",
    "user": "user_id",
    "provider": "provider",
    "session": "session_id",
    "day": "ended_at",
    "node": "node",
    "agent": "agent",
    "thread": "thread_id",
    "run_name": "run_name",
    "root_run_name": "root_run_name",
}
DIMENSION_PREFIX = "dimension:"
MAX_GROUP_LEVELS = 2


def group_levels(group_by: GroupBy | None) -> tuple[str, ...]:
    """``group_by`` as its levels (at most two), each checked; () for no grouping."""
    if group_by is None:
        return ()
    parts = group_by.split(",") if isinstance(group_by, str) else list(group_by)
    levels = tuple(str(part).strip() for part in parts if str(part).strip())
    if len(levels) > MAX_GROUP_LEVELS:
        raise ValueError(f"group by at most {MAX_GROUP_LEVELS} levels, e.g. 'node,model'")
    for level in levels:
        if level.startswith(DIMENSION_PREFIX):
            check_dimension_keys([level.removeprefix(DIMENSION_PREFIX)])
        elif level not in GROUP_COLUMNS:
            raise ValueError(
                f"cannot group by {level!r}; use one or two of {', '.join(GROUP_COLUMNS)} "
                "or dimension:<key>, e.g. 'node,model'"
            )
    if len(set(levels)) != len(levels):
        raise ValueError(f"group by {','.join(levels)!r} names a level twice")
    return levels


@dataclass(frozen=True)
class UsageFilter:
    """Which records a query looks at; every field left None matches everything."""

    user_id: str | None = None
    session_id: str | None = None
    model: str | None = None
    provider: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    node: str | None = None
    agent: str | None = None
    thread_id: str | None = None
    run_name: str | None = None
    root_run_name: str | None = None
    #: every key given must have this value
    dimensions: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, datetime):
                raise TypeError(
                    f"{name} takes a timezone-aware datetime, e.g. "
                    f"datetime(2026, 1, 1, tzinfo=timezone.utc), not {value!r}"
                )
            if value is not None and value.tzinfo is None:
                raise ValueError(f"{name}={value!r} is naive; pass a timezone-aware datetime")
        if self.dimensions:
            check_dimension_keys(self.dimensions)
        for name in ("user_id", "session_id", "model", "provider"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} takes a string, not {value!r}")

    @classmethod
    def of(cls, **filters: Any) -> UsageFilter:
        """A filter from keyword arguments, an unknown name refused with the known ones."""
        unknown = sorted(set(filters) - set(cls.__dataclass_fields__))
        if unknown:
            raise TypeError(
                f"unknown filter {', '.join(unknown)}; filters are "
                f"{', '.join(cls.__dataclass_fields__)}"
            )
        return cls(**filters)


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
    #: calls with tokens but no known price: the cost leaves them out
    unpriced_calls: int = 0
    stats: TokenStats
    first_call: datetime | None = None
    last_call: datetime | None = None
    #: the second level's groups (largest cost first) when grouped by two levels
    groups: list[GroupSummary] = Field(default_factory=list)


class UsageSummary(BaseModel):
    #: the levels, comma-separated ("node,model"); None when not grouped
    group_by: str | None = None
    usage: TokenUsage = Field(default_factory=TokenUsage)
    calls: int = 0
    errors: int = 0
    unpriced_calls: int = 0
    stats: TokenStats = Field(default_factory=TokenStats)
    period_start: datetime | None = None
    period_end: datetime | None = None
    groups: list[GroupSummary] = Field(default_factory=list)


class GroupTotals(BaseModel):
    """One group's calls, tokens and cost, without the token kinds and percentiles of a
    GroupSummary: what a dashboard table or chart shows, cheap enough to read per refresh."""

    #: the group's value at each level asked for (None: calls without one)
    keys: tuple[str | None, ...]
    calls: int
    total_tokens: int
    cost_usd: Decimal
    errors: int = 0
    #: calls with tokens but no known price: the cost leaves them out
    unpriced_calls: int = 0


class Breakdown(BaseModel):
    """The largest groups (by cost) and how many groups there are in all."""

    levels: tuple[str, ...]
    groups: list[GroupTotals]
    group_count: int


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

    def daily_by_model(self, where: UsageFilter, *, hourly: bool = False) -> list[DailyUsage]: ...

    def breakdown(
        self, where: UsageFilter, levels: Sequence[str], limit: int | None = None
    ) -> Breakdown:
        """Calls, tokens and cost per group of one or two levels (``day``, ``hour`` too):
        the ``limit`` costliest groups, or every group in key order."""
        ...

    def iter_records(self, where: UsageFilter, chunk_size: int = 1000) -> Iterator[UsageRecord]:
        """Stream records oldest first in constant memory."""
        ...

    def summary(self, where: UsageFilter, group_by: GroupBy | None) -> UsageSummary: ...

    def purge(self, before: datetime, where: UsageFilter | None = None) -> int:
        """Delete the records ended before ``before`` that ``where`` matches."""
        ...

    def close(self) -> None: ...
