"""Calls in flight: what a start event learned, kept until the matching end event.

The registry is per tracker and keyed by the framework's run or event id, so that two
handlers of one tracker seeing the same call (an explicit handler plus a session's)
share one state: the first end event records it, the second finds nothing to do.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from usage_callbacks.attribution import NO_ATTRIBUTION, Attribution
from usage_callbacks.usage import CallType, TokenUsage

if TYPE_CHECKING:
    from usage_callbacks.sessions import UsageSession
    from usage_callbacks.tracker import Reservation


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
    """Thread-safe map of run id to RunState; start is idempotent, end pops once."""

    def __init__(self) -> None:
        self._runs: dict[str, RunState] = {}
        self._lock = threading.Lock()

    def start(self, state: RunState) -> tuple[RunState, bool]:
        """Register ``state``; returns the registered state and whether it is new."""
        with self._lock:
            existing = self._runs.get(state.run_id)
            if existing is not None:
                return existing, False
            self._runs[state.run_id] = state
            return state, True

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
