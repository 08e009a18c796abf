"""Calls in flight: what a start event learned, kept until the matching end event.

One registry per process (``CALLS``), keyed by the framework's run or event id; each
call holds the state of every tracker that follows it, so an end, an error or a refusal
finds all of them at once.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Container
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

from usage_callbacks.attribution import NO_ATTRIBUTION, Attribution
from usage_callbacks.store.ledger import Charge
from usage_callbacks.usage import CallType, TokenUsage

if TYPE_CHECKING:
    from usage_callbacks.sessions import UsageSession


@dataclass(eq=False)
class Reservation:
    """Budget held for one call in flight; settle it by recording, or release it."""

    id: str
    charges: tuple[Charge, ...]
    usd: Decimal
    tokens: int
    estimate: TokenUsage
    #: gives the hold back if the reservation is dropped unsettled (an abandoned call);
    #: settling or releasing it first calls this off
    when_dropped: weakref.finalize[Any, Any] | None = field(default=None, repr=False)

    def ended(self) -> None:
        """Settled or released: nothing left to give back when it is collected."""
        if self.when_dropped is not None:
            self.when_dropped.detach()


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
    #: the handler whose start event made this state: the one that keeps ``streamed``
    #: (every handler of the call sees each token)
    started_by: object = None
    extra: dict[str, Any] = field(default_factory=dict)

    def latency_ms(self) -> float:
        return (time.perf_counter() - self.started_monotonic) * 1000.0


class RunOwner(Protocol):
    """What the registry needs of a tracker following a call."""

    reservation_ttl: timedelta

    def release(self, reservation: Reservation | None) -> None:
        """Hand back what a call that will not be made held."""
        ...

    def forget_runs(self, states: list[RunState]) -> None:
        """Calls whose end never came within ``reservation_ttl``: release their holds."""
        ...


class Call:
    """One call in flight: the state of each tracker following it, the names it is found
    by (its run or event id; another event system's id for it) and the spans it runs in.
    ``detail`` is what its adapter knows of it, shared by its trackers."""

    __slots__ = ("detail", "ended", "names", "spans", "states")

    def __init__(self, detail: Any = None) -> None:
        self.states: dict[RunOwner, RunState] = {}
        self.names: list[str] = []
        self.spans: list[str] = []
        self.detail = detail
        self.ended = False


class CallsInFlight:
    """Every call in flight in this process, by its run or event id: one entry per call,
    holding the state of each tracker that follows it (an explicit handler's tracker, the
    trackers of the sessions open where it started).

    The entry is the call's one lifetime: made by the first start event, gone with the end,
    the error, a refusal (which releases every tracker's hold at once) or abandonment;
    its names and spans go with it. Two handlers of one tracker on one call share that
    tracker's state: the first end records it, the second finds nothing to do. A call whose
    end never comes (a stream created and never read, a framework that skipped its error
    event) is handed to its tracker once older than the tracker's ``reservation_ttl``:
    swept when the map has doubled since the last sweep (amortized O(1); without it every
    such call stayed for good, 7 MB per 10,000, 34 MB with a budget).
    """

    def __init__(self) -> None:
        self._start_empty()

    def _start_empty(self) -> None:
        self._calls: dict[str, Call] = {}
        #: calls by the spans they run in, oldest first (an event system that names a call
        #: by its span only: LlamaIndex's instrumentation, which may send several in one)
        self._spans: dict[str, list[Call]] = {}
        self._lock = threading.Lock()
        self._sweep_at = _FIRST_SWEEP

    def forget_in_child(self) -> None:
        """After ``fork``: the calls in flight are the parent's (so are their holds), and
        the lock may have been held by one of its threads, which the child does not have."""
        self._start_empty()

    def open(self, name: str, span: str | None = None, detail: Any = None) -> Call:
        """A new call named ``name``, running in ``span``; trackers join it with ``start``."""
        call = Call(detail)
        with self._lock:
            self._name(call, name, span)
        return call

    def name(self, call: Call, name: str | None, span: str | None = None) -> bool:
        """Find ``call`` by ``name`` and ``span`` too, until it ends; False once ended."""
        with self._lock:
            if not call.ended:
                self._name(call, name, span)
            return not call.ended

    def _name(self, call: Call, name: str | None, span: str | None) -> None:
        if name is not None:
            self._calls[name] = call
            call.names.append(name)
        if span is not None:
            self._spans.setdefault(span, []).append(call)
            call.spans.append(span)

    def named(self, name: str) -> Call | None:
        return self._calls.get(name)  # one dict read: atomic, no lock needed

    def in_span(self, span: str | None) -> tuple[Call, ...]:
        """The calls running in ``span``, oldest first. Asked at every span's end, so
        without the lock: one dict read and a list copy are atomic."""
        calls = self._spans.get(span) if span is not None else None
        return tuple(calls) if calls else ()

    def spans(self) -> Container[str]:
        """The spans calls run in (a live view)."""
        return self._spans.keys()

    def start(self, owner: RunOwner, state: RunState) -> tuple[RunState, bool]:
        """Register ``owner``'s state of a call; returns the registered state and whether
        it is new (False: another handler of ``owner`` saw this start first)."""
        with self._lock:
            call = self._calls.get(state.run_id)
            if call is None:
                call = Call()
                self._name(call, state.run_id, None)
            else:
                existing = call.states.get(owner)
                if existing is not None:
                    return existing, False
            call.states[owner] = state
            abandoned = self._sweep() if len(self._calls) >= self._sweep_at else None
        if abandoned:
            for stale_owner, stale in abandoned.items():
                stale_owner.forget_runs(stale)
        return state, True

    def get(self, key: str, owner: RunOwner) -> RunState | None:
        with self._lock:
            call = self._calls.get(key)
            return None if call is None else call.states.get(owner)

    def owners(self, key: str) -> tuple[RunOwner, ...]:
        """The trackers following a call (its end may come in another context than its
        start, so a session's handler finds them here, not in the open sessions)."""
        with self._lock:
            call = self._calls.get(key)
            return () if call is None else tuple(call.states)

    def finish(self, key: str, owner: RunOwner) -> RunState | None:
        """Remove and return ``owner``'s state; None when another handler finished it."""
        with self._lock:
            call = self._calls.get(key)
            if call is None:
                return None
            state = call.states.pop(owner, None)
            if not call.states:
                self._forget(call)
            return state

    def end(self, call: Call) -> dict[RunOwner, RunState]:
        """The call ended: forget it and return every tracker's state; empty if it had
        ended already (each call ends once, whichever event system says so first)."""
        with self._lock:
            if call.ended:
                return {}
            self._forget(call)
            return call.states

    def refuse(self, key: str) -> None:
        """The call will not be made: forget it, and every tracker releases what it held."""
        with self._lock:
            call = self._calls.get(key)
            if call is None:
                return
            self._forget(call)
        for owner, state in call.states.items():
            owner.release(state.reservation)

    def owned_by(self, owner: RunOwner) -> int:
        """How many calls ``owner`` follows (a scan: for tests and diagnostics)."""
        with self._lock:
            return sum(owner in call.states for call in self._distinct())

    def __len__(self) -> int:
        """How many calls are in flight (a scan: for tests and diagnostics)."""
        with self._lock:
            return len(self._distinct())

    def _distinct(self) -> list[Call]:
        return list({id(call): call for call in self._calls.values()}.values())

    def _forget(self, call: Call) -> None:
        """Remove ``call`` by all its names and spans (caller holds the lock)."""
        call.ended = True
        for name in call.names:
            if self._calls.get(name) is call:
                del self._calls[name]
        for span in call.spans:
            in_span = self._spans.get(span)
            if in_span is not None and call in in_span:
                in_span.remove(call)
                if not in_span:
                    del self._spans[span]

    def _sweep(self) -> dict[RunOwner, list[RunState]]:
        """Remove the states older than their tracker's TTL (caller holds the lock)."""
        now = time.perf_counter()
        abandoned: dict[RunOwner, list[RunState]] = {}
        for call in self._distinct():
            stale = [
                (owner, state)
                for owner, state in call.states.items()
                if state.started_monotonic < now - owner.reservation_ttl.total_seconds()
            ]
            for owner, state in stale:
                del call.states[owner]
                abandoned.setdefault(owner, []).append(state)
            if stale and not call.states:
                self._forget(call)
        self._sweep_at = max(_FIRST_SWEEP, 2 * len(self._calls))
        return abandoned


class TrackerRuns:
    """One tracker's view of the calls in flight: ``tracker.runs``."""

    def __init__(self, owner: RunOwner, calls: CallsInFlight) -> None:
        self._owner = owner
        self._calls = calls

    def start(self, state: RunState) -> tuple[RunState, bool]:
        return self._calls.start(self._owner, state)

    def get(self, key: str) -> RunState | None:
        return self._calls.get(key, self._owner)

    def finish(self, key: str) -> RunState | None:
        return self._calls.finish(key, self._owner)

    def __len__(self) -> int:
        return self._calls.owned_by(self._owner)


#: Calls in flight before the first sweep for abandoned ones.
_FIRST_SWEEP = 1024
#: The calls in flight of every tracker and adapter in the process.
CALLS = CallsInFlight()
os.register_at_fork(after_in_child=CALLS.forget_in_child)
