"""Budget allowances: each process spends from a hold in the shared ledger, in memory.

Why: checking and holding in the database for every call, then booking after it, cost
two transactions a call (~600 µs on SQLite). Instead, when a call does not fit in what
this process already holds, one renewal books the spend so far and holds the call's
worst case plus a slice of the headroom left (``LeasePolicy``); the calls that follow
are checked against that hold under a lock. Holds sit in the ledger, so every process
sees every other's: spend plus all holds never exceeds a limit, which is the guarantee.

Spend is booked (moved from the hold to the counters) when a hold runs short, when a
call cost more than it reserved, when ``warn_at`` may have been crossed, at least every
``book_interval`` seconds while calls are made, and on ``sync()``/``close()``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from usage_callbacks.budgets import Budget, BudgetWarning, describe_failure
from usage_callbacks.store.ledger import (
    BudgetLedger,
    Charge,
    LeaseChange,
    LeasePolicy,
    Renewal,
    bucket_bounds,
)
from usage_callbacks.store.models import usd_to_pico, utcnow

logger = logging.getLogger("usage_callbacks")


@dataclass
class _Lease:
    """This process's hold on one charge and what it has spent from it since booking."""

    charge: Charge
    hold_pico: int = 0
    hold_tokens: int = 0
    #: reservation id -> (pico, tokens) of the calls in flight; a live call keeps its
    #: hold however long it runs (settled, released, or dropped when abandoned)
    inflight: dict[str, tuple[int, int]] = field(default_factory=dict)
    inflight_pico: int = 0
    inflight_tokens: int = 0
    #: bucket start -> [pico, tokens] spent and not yet booked
    unbooked: dict[datetime, list[int]] = field(default_factory=dict)
    unbooked_pico: int = 0
    unbooked_tokens: int = 0
    renew_by: datetime | None = None
    #: the last reservation or spend: a lease idle for a TTL is returned and forgotten
    used_at: float = field(default_factory=time.monotonic)
    spent_pico: int = 0  # booked spend in the window at the last renewal
    spent_tokens: int = 0
    warned_until: datetime | None = None
    largest_pico: int = 0  # the costliest call seen: sizes the slices asked for
    largest_tokens: int = 0
    #: the bucket the last spend went to, [start, end): most calls land in it too
    bucket: tuple[datetime, datetime] | None = None

    def room(self) -> tuple[int, int]:
        return (
            self.hold_pico - self.inflight_pico - self.unbooked_pico,
            self.hold_tokens - self.inflight_tokens - self.unbooked_tokens,
        )

    def fits(self, pico: int, tokens: int, now: datetime) -> bool:
        if self.renew_by is None or now >= self.renew_by:
            return False
        budget = self.charge.budget
        room_pico, room_tokens = self.room()
        return (budget.limit_usd is None or pico <= room_pico) and (
            budget.limit_tokens is None or tokens <= room_tokens
        )

    def overdrawn(self) -> bool:
        """Spent beyond the hold (a call cost more than it reserved): book it now."""
        budget = self.charge.budget
        room_pico, room_tokens = self.room()
        return (budget.limit_usd is not None and room_pico < 0) or (
            budget.limit_tokens is not None and room_tokens < 0
        )

    def may_warn(self, now: datetime) -> bool:
        """Spend may have crossed ``warn_at``: the ledger decides, once per period."""
        budget = self.charge.budget
        if budget.warn_at is None or (self.warned_until and now < self.warned_until):
            return False
        return _crossed(
            budget, self.spent_pico + self.unbooked_pico, self.spent_tokens + self.unbooked_tokens
        )

    def hold(self, key: str, pico: int, tokens: int) -> None:
        self.inflight[key] = (pico, tokens)
        self.inflight_pico += pico
        self.inflight_tokens += tokens

    def drop(self, key: str) -> None:
        pico, tokens = self.inflight.pop(key, (0, 0))
        self.inflight_pico -= pico
        self.inflight_tokens -= tokens

    def spend(self, pico: int, tokens: int, at: datetime) -> None:
        bucket = self.bucket
        if bucket is None or not bucket[0] <= at < bucket[1]:
            bucket = self.bucket = bucket_bounds(self.charge.budget, at)
        amounts = self.unbooked.setdefault(bucket[0], [0, 0])
        amounts[0] += pico
        amounts[1] += tokens
        self.unbooked_pico += pico
        self.unbooked_tokens += tokens
        self.largest_pico = max(self.largest_pico, pico)
        self.largest_tokens = max(self.largest_tokens, tokens)

    def change(self, need: tuple[int, int], *, slices: bool, keep_spare: bool) -> LeaseChange:
        """This lease's part of a renewal: book everything, keep calls in flight; with
        ``slices`` ask for room ahead (sized by the larger of ``need`` and the largest call
        seen), with ``keep_spare`` keep the unused room it has."""
        room_pico, room_tokens = self.room() if keep_spare else (0, 0)
        return LeaseChange(
            charge=self.charge,
            bookings={bucket: (pico, tokens) for bucket, (pico, tokens) in self.unbooked.items()},
            keep_pico=self.inflight_pico,
            keep_tokens=self.inflight_tokens,
            need_pico=need[0],
            need_tokens=need[1],
            spare_pico=max(room_pico, 0),
            spare_tokens=max(room_tokens, 0),
            unit_pico=max(need[0], self.largest_pico) if slices else 0,
            unit_tokens=max(need[1], self.largest_tokens) if slices else 0,
        )


def _crossed(budget: Budget, pico: int, tokens: int) -> bool:
    warn_at = budget.warn_at or 0
    return (budget.limit_usd is not None and pico >= usd_to_pico(budget.limit_usd) * warn_at) or (
        budget.limit_tokens is not None and tokens >= budget.limit_tokens * warn_at
    )


class BudgetAllowances:
    """Reserve, settle and release calls against holds this process keeps in the ledger."""

    def __init__(
        self,
        ledger: BudgetLedger,
        *,
        ttl: timedelta,
        policy: LeasePolicy,
        book_interval: float,
        announce: Callable[[BudgetWarning], None],
    ) -> None:
        self._ledger = ledger
        self._announce = announce  # warnings found by the heartbeat, which returns none
        self._ttl = ttl
        self._policy = policy
        self._book_interval = book_interval
        self._lock = threading.Lock()
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        """A new lease id and no leases: a forked child must not spend its parent's holds."""
        self._lease_id = uuid.uuid4().hex
        self._leases: dict[tuple[str, str], _Lease] = {}
        self._booked_at = time.monotonic()
        self._abandoned: deque[tuple[str, Sequence[Charge]]] = deque()
        self._heartbeat: threading.Thread | None = None  # a forked child starts its own
        self._stopped = threading.Event()

    def _keep_alive(self) -> None:
        """Start the heartbeat that renews this process's holds in the ledger while calls
        are in flight: a hold lapses after ``ttl`` only when its process is gone, never
        because one call ran long."""
        if self._heartbeat is not None or self._stopped.is_set():
            return
        with self._lock:
            if self._heartbeat is None:
                self._heartbeat = threading.Thread(
                    target=self._beat, name="usage-callbacks-holds", daemon=True
                )
                self._heartbeat.start()

    def _beat(self) -> None:
        interval = self._ttl.total_seconds() / 3
        while not self._stopped.wait(interval):
            now = utcnow()
            with self._lock:
                self._drop_abandoned()
                warnings = [*self._renew_live(now), *self._forget_idle(now)]
            for warning in warnings:
                self._announce(warning)

    def _renew_live(self, now: datetime) -> list[BudgetWarning]:
        """Renew the holds of leases with calls in flight before they lapse."""
        due = [
            lease
            for lease in self._leases.values()
            if lease.inflight and (lease.renew_by is None or now >= lease.renew_by)
        ]
        if not due:
            return []
        try:
            return self._renew(due, now, slices=False, keep_spare=True).warnings
        except Exception as error:  # the ledger is away: say why (not the SQL), retry next beat
            logger.warning("renewing budget holds failed (%s); will retry", describe_failure(error))
            return []

    def _forget_idle(self, now: datetime) -> list[BudgetWarning]:
        """Book and return the holds of leases unused for a TTL, and forget them: memory
        and holds follow the users active lately, not every user ever seen."""
        quiet_since = time.monotonic() - self._ttl.total_seconds()
        idle = [
            lease
            for lease in self._leases.values()
            if not lease.inflight and lease.used_at <= quiet_since
        ]
        if not idle:
            return []
        try:
            renewal = self._renew(idle, now, slices=False, keep_spare=False)
        except Exception as error:  # the ledger is away: keep them, try again next beat
            logger.warning(
                "returning idle budget holds failed (%s); will retry", describe_failure(error)
            )
            return []
        for lease in idle:
            del self._leases[(lease.charge.label, lease.charge.key)]
        return renewal.warnings

    def stop(self) -> None:
        """No more heartbeats (the tracker is closing)."""
        self._stopped.set()
        heartbeat = self._heartbeat
        if heartbeat is not None and heartbeat is not threading.current_thread():
            heartbeat.join(timeout=5)

    def reserve(
        self, reservation_id: str, charges: Sequence[Charge], pico: int, tokens: int, now: datetime
    ) -> Renewal | None:
        """Hold a call's worst case on every charge, or on none and raise.

        Returns the renewal when the ledger was asked (for its warnings and overruns).
        Raises BudgetExceededError when refused and the ledger's errors when it is away.
        """
        with self._lock:
            self._drop_abandoned()
            leases = self._leases_of(charges)
            renewal = None
            if not all(lease.fits(pico, tokens, now) for lease in leases):
                renewal = self._renew(leases, now, (pico, tokens), slices=True, keep_spare=False)
                if renewal.refused is not None:
                    raise renewal.refused
            for lease in leases:
                lease.hold(reservation_id, pico, tokens)
                lease.used_at = time.monotonic()
        self._keep_alive()
        return renewal

    def settle(
        self,
        reservation_id: str | None,
        charges: Sequence[Charge],
        pico: int,
        tokens: int,
        now: datetime,
    ) -> list[BudgetWarning]:
        """Count a call's actual spend; book to the ledger when due. Never raises."""
        with self._lock:
            leases = self._leases_of(charges)
            for lease in leases:
                if reservation_id is not None:
                    lease.drop(reservation_id)
                lease.spend(pico, tokens, now)
                lease.used_at = time.monotonic()
            due = (
                self._policy.fraction == 0
                or time.monotonic() - self._booked_at >= self._book_interval
                or any(lease.overdrawn() or lease.may_warn(now) for lease in leases)
            )
            warnings = self._book_all(now, keep_slice=True) if due else []
        self._keep_alive()  # spend without a reservation (record() by hand) has leases too
        return warnings

    def release(self, reservation_id: str, charges: Sequence[Charge]) -> None:
        """Drop a call that never happened; its hold goes back to this process's slice."""
        with self._lock:
            for lease in self._leases_of(charges):
                lease.drop(reservation_id)

    def abandon(self, reservation_id: str, charges: Sequence[Charge]) -> None:
        """A reservation was dropped unsettled (its call's state was garbage-collected):
        release it at the next operation. Lock-free: this runs inside the collector."""
        self._abandoned.append((reservation_id, charges))

    def _drop_abandoned(self) -> None:
        while self._abandoned:
            reservation_id, charges = self._abandoned.popleft()
            for charge in charges:
                lease = self._leases.get((charge.label, charge.key))
                if lease is not None:
                    lease.drop(reservation_id)

    def sync(self, now: datetime, *, keep_slices: bool = True) -> list[BudgetWarning]:
        """Book everything spent so far; ``keep_slices=False`` also returns unused holds."""
        with self._lock:
            return self._book_all(now, keep_slice=keep_slices)

    def forget(self, budget: Budget, now: datetime) -> None:
        """A session's budget stopped applying: book its spend and return its holds."""
        with self._lock:
            leases = [lease for lease in self._leases.values() if lease.charge.budget is budget]
            if not leases:
                return
            try:
                self._renew(leases, now, slices=False, keep_spare=False)
            except Exception as error:  # the holds expire on their own; say why, not the SQL
                logger.warning(
                    "returning the holds of budget %s failed (%s)",
                    budget.label,
                    describe_failure(error),
                )
                return
            for lease in leases:
                if not lease.inflight:
                    del self._leases[(budget.label, lease.charge.key)]

    # ------------------------------------------------------------------ internals

    def _leases_of(self, charges: Sequence[Charge]) -> list[_Lease]:
        leases: dict[tuple[str, str], _Lease] = {}
        for charge in charges:
            key = (charge.label, charge.key)
            lease = self._leases.get(key)
            if lease is None or lease.charge.budget is not charge.budget:
                lease = self._leases[key] = _Lease(charge)
            leases[key] = lease
        return list(leases.values())

    def _book_all(self, now: datetime, *, keep_slice: bool) -> list[BudgetWarning]:
        leases = [lease for lease in self._leases.values() if lease.unbooked or not keep_slice]
        if not leases:
            return []
        try:
            renewal = self._renew(leases, now, slices=keep_slice, keep_spare=keep_slice)
        except Exception as error:  # retried at the next sync; say why, not the SQL
            logger.warning(
                "booking spend against budgets failed (%s); will retry", describe_failure(error)
            )
            return []
        return renewal.warnings

    def _renew(
        self,
        leases: list[_Lease],
        now: datetime,
        need: tuple[int, int] = (0, 0),
        *,
        slices: bool,
        keep_spare: bool,
    ) -> Renewal:
        """One ledger transaction; local state follows only what was committed."""
        changes = [lease.change(need, slices=slices, keep_spare=keep_spare) for lease in leases]
        renewal = self._ledger.renew(self._lease_id, changes, now, self._ttl, self._policy)
        self._booked_at = time.monotonic()
        warned = {(w.budget.label, w.key) for w in renewal.warnings}
        for lease, grant in zip(leases, renewal.grants, strict=True):
            lease.hold_pico, lease.hold_tokens = grant.hold_pico, grant.hold_tokens
            lease.unbooked.clear()
            lease.unbooked_pico = lease.unbooked_tokens = 0
            lease.spent_pico, lease.spent_tokens = grant.spent_pico, grant.spent_tokens
            lease.renew_by = now + self._ttl / 2
            budget = lease.charge.budget
            if (budget.label, lease.charge.key) in warned or (
                budget.warn_at is not None
                and _crossed(budget, grant.spent_pico, grant.spent_tokens)
            ):
                start, end = budget.window(now)
                lease.warned_until = end if not budget.is_rolling else now + (end - start)
        for error in renewal.overruns:
            logger.warning("budget exceeded (on_exceed='warn'): %s", error)
        return renewal
