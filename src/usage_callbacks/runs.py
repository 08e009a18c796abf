"""Calls in flight: what a start event learned, kept until the matching end event.

The registry is per tracker and keyed by the framework's run or event id, so that two
handlers of one tracker seeing the same call (an explicit handler plus a session's)
share one state: the first end event records it, the second finds nothing to do.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from usage_callbacks.attribution import NO_ATTRIBUTION, Attribution
from usage_callbacks.store.ledger import Charge
from usage_callbacks.usage import CallType, TokenUsage

if TYPE_CHECKING:
    from usage_callbacks.sessions import UsageSession


@dataclass(frozen=True)
class Reservation:
    """Budget held for one call in flight; settle it by recording, or release it."""

    id: str
    charges: tuple[Charge, ...]
    usd: Decimal
    tokens: int
    estimate: TokenUsage


@dataclass
class RunState:
    """Everything known about one call between its start and end events."""

    run_id: str
    started_at: datetime
    started_monotonic: float = field(default_factory=time.perf_counter)
    framework: str = "manual"
    call_type: CallType = "chat"
    model: str | None = None
    provider: str | None = None
    parent_run_id: str | None = None
    user_id: str | None = None
    session_id: str | None = None
    tags: list[str] = field(default_factory=list)
    attribution: Attribution = NO_ATTRIBUTION
    sessions: tuple[UsageSession, ...] = ()
    reservation: Reservation | None = None
    prompt_estimate: TokenUsage | None = None
    #: Raw inputs kept so the prompt can be estimated lazily, only when needed.
    inputs: Any = None
    streamed: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def latency_ms(self) -> float:
        return (time.perf_counter() - self.started_monotonic) * 1000.0


class RunRegistry:
    """Thread-safe map of run id to RunState; start is idempotent, end pops once.

    A call whose end never comes (a stream created and never read, a framework that
    skipped its error event) is abandoned once it is older than ``ttl``: swept out when
    the map has doubled since the last sweep and handed to ``on_abandoned``. Without
    this every such call stayed for good (7 MB per 10,000, 34 MB with a budget).
    """

    def __init__(self, ttl: timedelta, on_abandoned: Callable[[list[RunState]], None]) -> None:
        self._runs: dict[str, RunState] = {}
        self._lock = threading.Lock()
        self._ttl_s = ttl.total_seconds()
        self._on_abandoned = on_abandoned
        self._sweep_at = _FIRST_SWEEP

    def start(self, state: RunState) -> tuple[RunState, bool]:
        """Register ``state``; returns the registered state and whether it is new."""
        with self._lock:
            existing = self._runs.get(state.run_id)
            if existing is not None:
                return existing, False
            self._runs[state.run_id] = state
            abandoned = self._sweep() if len(self._runs) >= self._sweep_at else None
        if abandoned:
            self._on_abandoned(abandoned)
        return state, True

    def _sweep(self) -> list[RunState]:
        """Remove the calls older than the TTL (caller holds the lock); amortized O(1)."""
        cutoff = time.perf_counter() - self._ttl_s
        abandoned = [state for state in self._runs.values() if state.started_monotonic < cutoff]
        for state in abandoned:
            del self._runs[state.run_id]
        self._sweep_at = max(_FIRST_SWEEP, 2 * len(self._runs))
        return abandoned

    def get(self, run_id: str) -> RunState | None:
        with self._lock:
            return self._runs.get(run_id)

    def finish(self, run_id: str) -> RunState | None:
        """Remove and return the state; None when another handler already finished it."""
        with self._lock:
            return self._runs.pop(run_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._runs)


#: Calls in flight before the first sweep for abandoned ones.
_FIRST_SWEEP = 1024
