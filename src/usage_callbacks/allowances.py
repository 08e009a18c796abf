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

No lock is held while the ledger is asked (a partitioned database used to stall every
thread behind one renewal): a renewal snapshots what it books and keeps under the lock,
talks to the database without it, and applies what was committed under it again. The
room a lease has stays spendable by other threads meanwhile (the renewal keeps it held),
so only a call that needs more than the room waits, and never longer than ``wait``
seconds; then ``budget_failure_mode`` decides. ``record()`` never waits for the ledger:
bookings run in the background thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from usage_callbacks.budgets import Budget, BudgetWarning, describe_failure
from usage_callbacks.store.ledger import (
    BudgetLedger,
    Charge,
    Grant,
    LeaseChange,
    LeasePolicy,
    Renewal,
    bucket_bounds,
)
from usage_callbacks.store.models import usd_to_pico, utcnow

logger = logging.getLogger("usage_callbacks")


#: Ledger transactions run at once (the rest queue): each waits at most its caller's bound.
_LEDGER_THREADS = 4
#: Leases renewed in one transaction when many are (booking, returning, renewing holds).
_CHUNK = 512


class BudgetLedgerTimeout(TimeoutError):
    """The budget ledger did not answer in time (a partitioned or overloaded database):
    the call follows ``budget_failure_mode`` instead of waiting on."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the budget ledger did not answer within {seconds:g} s")


@dataclass(eq=False)
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
    #: spend a renewal in flight is booking: still this hold's until it commits
    booking: dict[datetime, tuple[int, int]] = field(default_factory=dict)
    booking_pico: int = 0
    booking_tokens: int = 0
    #: the renewal in flight for this lease (one at a time), for others to wait on
    pending: _Renewing | None = None
    #: room that renewal hands back: gone from here at once, from the ledger at commit
    returning: tuple[int, int] = (0, 0)
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
            self.hold_pico - self.inflight_pico - self.unbooked_pico - self.booking_pico,
            self.hold_tokens - self.inflight_tokens - self.unbooked_tokens - self.booking_tokens,
        )

    def fits(self, pico: int, tokens: int, now: datetime) -> bool:
        """The call fits in the room, and the hold is not due for renewal."""
        return self.renew_by is not None and now < self.renew_by and self.has_room(pico, tokens)

    def has_room(self, pico: int, tokens: int) -> bool:
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
            budget,
            self.spent_pico + self.unbooked_pico + self.booking_pico,
            self.spent_tokens + self.unbooked_tokens + self.booking_tokens,
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

    def begin(
        self, call: tuple[int, int], *, placed: bool, slices: bool, keep_room: bool
    ) -> LeaseChange:
        """This lease's part of a renewal: book what was spent (it stays counted here until
        the commit), keep the calls in flight and, with ``keep_room``, the room left, which
        other threads may spend while the ledger is asked. ``call`` is the caller's need:
        ``placed`` already in flight (it took the room there was; the ledger is asked for
        the rest) or to hold once granted. ``slices`` asks for room ahead, sized by the
        larger of the call and the largest call seen."""
        room_pico, room_tokens = self.room()
        self.booking, self.unbooked = {b: (p, t) for b, (p, t) in self.unbooked.items()}, {}
        self.booking_pico, self.booking_tokens = self.unbooked_pico, self.unbooked_tokens
        self.unbooked_pico = self.unbooked_tokens = 0
        kept_pico, kept_tokens = self.inflight_pico, self.inflight_tokens
        need_pico, need_tokens = call
        placed_pico = placed_tokens = 0
        if placed:  # in flight already: ask only for what the room did not cover
            need_pico, need_tokens = (
                max(0, min(call[0], -room_pico)),
                max(0, min(call[1], -room_tokens)),
            )
            placed_pico, placed_tokens = call[0] - need_pico, call[1] - need_tokens
            room_pico, room_tokens = room_pico + need_pico, room_tokens + need_tokens
            kept_pico, kept_tokens = kept_pico - need_pico, kept_tokens - need_tokens
        spare_pico, spare_tokens = max(room_pico, 0), max(room_tokens, 0)
        if not keep_room:  # handed back: nobody spends it from here on
            self.hold_pico -= spare_pico
            self.hold_tokens -= spare_tokens
            self.returning = (spare_pico, spare_tokens)
            spare_pico = spare_tokens = 0
        return LeaseChange(
            charge=self.charge,
            bookings=self.booking,
            keep_pico=kept_pico + spare_pico,
            keep_tokens=kept_tokens + spare_tokens,
            need_pico=need_pico,
            need_tokens=need_tokens,
            spare_pico=spare_pico,
            spare_tokens=spare_tokens,
            unit_pico=max(call[0], self.largest_pico) if slices else 0,
            unit_tokens=max(call[1], self.largest_tokens) if slices else 0,
            placed_pico=placed_pico,
            placed_tokens=placed_tokens,
        )

    def committed(self, grant: Grant, now: datetime, ttl: timedelta, warned: bool) -> None:
        """The renewal committed: the ledger holds ``grant`` and has the booked spend."""
        self.hold_pico, self.hold_tokens = grant.hold_pico, grant.hold_tokens
        self.returning = (0, 0)
        self.booking = {}
        self.booking_pico = self.booking_tokens = 0
        self.spent_pico, self.spent_tokens = grant.spent_pico, grant.spent_tokens
        self.renew_by = now + ttl / 2
        budget = self.charge.budget
        if warned or (
            budget.warn_at is not None and _crossed(budget, grant.spent_pico, grant.spent_tokens)
        ):
            start, end = budget.window(now)
            self.warned_until = end if not budget.is_rolling else now + (end - start)

    def failed(self) -> None:
        """The renewal did not commit: what it was booking waits for the next one, and
        the room it was handing back is still held (the ledger still has it)."""
        self.hold_pico += self.returning[0]
        self.hold_tokens += self.returning[1]
        self.returning = (0, 0)
        for bucket, (pico, tokens) in self.booking.items():
            amounts = self.unbooked.setdefault(bucket, [0, 0])
            amounts[0] += pico
            amounts[1] += tokens
        self.unbooked_pico += self.booking_pico
        self.unbooked_tokens += self.booking_tokens
        self.booking = {}
        self.booking_pico = self.booking_tokens = 0


@dataclass(eq=False)
class _Renewing:
    """One ledger transaction over some leases, from its snapshot to its result."""

    leases: list[_Lease]
    changes: list[LeaseChange]
    now: datetime
    #: the reservation to hold on ``awaiting`` once granted; None once its caller gave up
    holder: tuple[str, int, int] | None = None
    awaiting: list[_Lease] = field(default_factory=list)
    future: Future[Renewal] = field(default_factory=Future)


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
        wait: float,
        announce: Callable[[BudgetWarning], None],
    ) -> None:
        self._ledger = ledger
        self._announce = announce  # warnings found in the background, which returns none
        self._ttl = ttl
        self._policy = policy
        self._book_interval = book_interval
        self._wait = wait
        self._reset()
        # weakly: a bound method would keep every tracker ever made alive
        reset = weakref.WeakMethod(self._reset)
        os.register_at_fork(after_in_child=lambda: _call_alive(reset))

    def _reset(self) -> None:
        """A new lease id and no leases: a forked child must not spend its parent's holds
        (nor wait on a lock or a thread its parent had)."""
        self._lock = threading.Lock()
        self._lease_id = uuid.uuid4().hex
        self._leases: dict[tuple[str, str], _Lease] = {}
        self._booked_at = time.monotonic()
        self._book_due = False
        self._abandoned: deque[tuple[str, Sequence[Charge]]] = deque()
        self._heartbeat: threading.Thread | None = None  # a forked child starts its own
        self._pool: ThreadPoolExecutor | None = None
        self._stopped = threading.Event()
        self._wake = threading.Event()

    # ------------------------------------------------------------------ background

    def _keep_alive(self) -> None:
        """Start the background thread that books spend and renews this process's holds
        while calls are in flight: a hold lapses after ``ttl`` only when its process is
        gone, never because one call ran long."""
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
        beaten = time.monotonic()
        while not self._stopped.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if self._stopped.is_set():
                return
            now = utcnow()
            warnings: list[BudgetWarning] = []
            if self._book_due:
                self._book_due = False
                warnings += self._book_in_background(now)
            if time.monotonic() - beaten >= interval:
                beaten = time.monotonic()
                with self._lock:
                    self._drop_abandoned()
                warnings += [*self._renew_live(now), *self._forget_idle(now)]
            for warning in warnings:
                self._announce(warning)

    def _book_in_background(self, now: datetime) -> list[BudgetWarning]:
        """Book every lease's spend; the next booking is due ``book_interval`` from now
        (a renewal for one call books only its own leases)."""
        self._booked_at = time.monotonic()
        return self._renew_many(
            lambda lease: bool(lease.unbooked), now, failure="booking spend against budgets"
        )[0]

    def _renew_live(self, now: datetime) -> list[BudgetWarning]:
        """Renew the holds of leases with calls in flight before they lapse."""
        return self._renew_many(
            lambda lease: (
                bool(lease.inflight) and (lease.renew_by is None or now >= lease.renew_by)
            ),
            now,
            slices=False,
            failure="renewing budget holds",
        )[0]

    def _forget_idle(self, now: datetime) -> list[BudgetWarning]:
        """Book and return the holds of leases unused for a TTL, and forget them: memory
        and holds follow the users active lately, not every user ever seen."""
        quiet_since = time.monotonic() - self._ttl.total_seconds()
        warnings, returned = self._renew_many(
            lambda lease: not lease.inflight and lease.used_at <= quiet_since,
            now,
            slices=False,
            keep_room=False,
            failure="returning idle budget holds",
        )
        self._drop_unused(returned)
        return warnings

    def close(self, now: datetime) -> None:
        """No more background work (the tracker is closing): book the spend and return
        the holds, waiting for the ledger at most the bound."""
        self._stopped.set()
        self._wake.set()
        heartbeat = self._heartbeat
        if heartbeat is not None and heartbeat is not threading.current_thread():
            heartbeat.join(timeout=self._wait)
        self.sync(now, keep_slices=False)
        if self._pool is not None:
            self._pool.shutdown(wait=False)  # a transaction still waiting ends on its own

    # ------------------------------------------------------------------ calls

    def reserve(
        self, reservation_id: str, charges: Sequence[Charge], pico: int, tokens: int, now: datetime
    ) -> Renewal | None:
        """Hold a call's worst case on every charge, or on none and raise.

        Returns the renewal when the ledger was asked (for its warnings and overruns).
        Raises BudgetExceededError when refused, the ledger's errors when it is away and
        BudgetLedgerTimeout when it did not answer within the bound.
        """
        deadline = time.monotonic() + self._wait
        take_room = False  # first ask the ledger for the whole call, leaving the room to others
        while True:
            with self._lock:
                self._drop_abandoned()
                leases = self._leases_of(charges)
                short = [lease for lease in leases if not lease.fits(pico, tokens, now)]
                busy = next((lease.pending for lease in short if lease.pending), None)
                job = None
                if busy is None:
                    awaiting = [
                        lease for lease in short if not (take_room or lease.has_room(pico, tokens))
                    ]
                    for lease in leases:
                        if lease not in awaiting:
                            lease.hold(reservation_id, pico, tokens)
                        lease.used_at = time.monotonic()
                    job = self._start(
                        short, now, (pico, tokens), awaiting, (reservation_id, pico, tokens)
                    )
            if busy is not None:  # another thread is renewing a hold this call needs
                self._outcome(busy, deadline, raises=False)
                continue
            self._keep_alive()
            if job is None:
                return None
            self._submit(job)
            try:
                renewal = self._outcome(job, deadline)
            except BaseException:
                with self._lock:
                    job.holder = None  # if it commits later, its need becomes room
                self.release(reservation_id, charges)
                raise
            if renewal.refused is None:
                return renewal
            self.release(reservation_id, charges)
            if take_room or not any(c.spare_pico or c.spare_tokens for c in job.changes):
                raise renewal.refused
            take_room = True  # near the limit: the room this process holds counts too

    def settle(
        self,
        reservation_id: str | None,
        charges: Sequence[Charge],
        pico: int,
        tokens: int,
        now: datetime,
    ) -> None:
        """Count a call's actual spend; when a booking is due, the background thread makes
        it (a slow ledger never holds up recording). Never raises."""
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
            if due:
                self._book_due = True
        self._keep_alive()  # spend without a reservation (record() by hand) has leases too
        if due:
            self._wake.set()

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

    def sync(
        self, now: datetime, *, keep_slices: bool = True, timeout: float | None = None
    ) -> list[BudgetWarning]:
        """Book everything spent so far; ``keep_slices=False`` also returns unused holds.
        Waits for the ledger at most ``timeout`` in all (None: the bound per transaction);
        what is not booked by then is booked later."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._booked_at = time.monotonic()
        with self._lock:
            busy = [lease.pending for lease in self._leases.values() if lease.pending]
        try:
            for renewing in busy:  # what they book is part of "so far"
                until = time.monotonic() + self._wait if deadline is None else deadline
                self._outcome(renewing, until, raises=False)
        except BudgetLedgerTimeout as error:
            logger.warning("booking spend against budgets: %s; will retry", error)
            return []
        return self._renew_many(
            lambda lease: bool(lease.unbooked) or (not keep_slices and max(lease.room()) > 0),
            now,
            slices=keep_slices,
            keep_room=keep_slices,
            deadline=deadline,
            waited=True,
            failure="booking spend against budgets",
        )[0]

    def forget(self, budget: Budget, now: datetime) -> None:
        """A session's budget stopped applying: book its spend and return its holds."""
        _, returned = self._renew_many(
            lambda lease: lease.charge.budget is budget,
            now,
            slices=False,
            keep_room=False,
            waited=True,
            failure=f"returning the holds of budget {budget.label}",
        )
        self._drop_unused(returned)

    def _renew_many(
        self,
        pick: Callable[[_Lease], bool],
        now: datetime,
        *,
        slices: bool = True,
        keep_room: bool = True,
        deadline: float | None = None,
        waited: bool = False,
        failure: str,
    ) -> tuple[list[BudgetWarning], list[_Lease]]:
        """Renew the leases ``pick`` selects, ``_CHUNK`` to a transaction (one renewal of
        200,000 users' leases held SQLite's write lock from every process for a minute):
        in this thread, or ``waited`` for in a ledger thread until ``deadline`` (None: the
        bound, for each transaction). Returns the
        warnings and the leases renewed; stops at the first failure, logged with what
        failed (never the SQL). Holds not renewed expire on their own."""
        with self._lock:
            chosen = [lease for lease in self._leases.values() if pick(lease)]
        warnings: list[BudgetWarning] = []
        renewed: list[_Lease] = []
        for first in range(0, len(chosen), _CHUNK):
            with self._lock:
                job = self._start(
                    chosen[first : first + _CHUNK], now, slices=slices, keep_room=keep_room
                )
            if job is None:
                continue
            try:
                if not waited:
                    renewal = self._run(job)
                else:
                    self._submit(job)
                    until = time.monotonic() + self._wait if deadline is None else deadline
                    renewal = self._outcome(job, until)
            except Exception as error:  # the ledger is away or slow: retried later
                logger.warning("%s failed (%s); will retry", failure, describe_failure(error))
                break
            warnings += renewal.warnings
            renewed += job.leases
        return warnings, renewed

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

    def _drop_unused(self, leases: list[_Lease]) -> None:
        """Forget leases whose holds were returned, unless a call came since."""
        with self._lock:
            for lease in leases:
                key = (lease.charge.label, lease.charge.key)
                unused = not (lease.inflight or lease.unbooked or lease.pending)
                if unused and self._leases.get(key) is lease:
                    del self._leases[key]

    def _start(
        self,
        leases: list[_Lease],
        now: datetime,
        call: tuple[int, int] = (0, 0),
        awaiting: list[_Lease] | None = None,
        holder: tuple[str, int, int] | None = None,
        *,
        slices: bool = True,
        keep_room: bool = True,
    ) -> _Renewing | None:
        """Snapshot a renewal of the leases no other renewal is at (under the lock). The
        call is in flight on every lease but ``awaiting``, which hold it once granted."""
        free = [lease for lease in leases if lease.pending is None]
        if not free:
            return None
        awaiting = awaiting or []
        changes = [
            lease.begin(call, placed=lease not in awaiting, slices=slices, keep_room=keep_room)
            for lease in free
        ]
        job = _Renewing(free, changes, now, holder, awaiting)
        for lease in free:
            lease.pending = job
        return job

    def _submit(self, job: _Renewing) -> None:
        """Run the renewal in a ledger thread, so that its caller can stop waiting."""
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        _LEDGER_THREADS, thread_name_prefix="usage-callbacks-ledger"
                    )
        try:
            self._pool.submit(self._commit, job)
        except RuntimeError:  # shut down (a closed tracker): run it here
            self._commit(job)

    def _outcome(self, job: _Renewing, deadline: float, *, raises: bool = True) -> Renewal:
        """The renewal's result, waiting at most until ``deadline``; ``raises=False``
        only waits for its end (another caller's renewal: its error is theirs)."""
        done, _ = wait_for([job.future], max(0.0, deadline - time.monotonic()))
        if not done:
            raise BudgetLedgerTimeout(self._wait)
        if not raises and job.future.exception() is not None:
            return Renewal([], None, [], [])
        return job.future.result()

    @staticmethod
    def _settle_holder(job: _Renewing, lease: _Lease, *, granted: bool) -> None:
        """Granted, the caller's call is held where it waited for the grant; otherwise it is
        dropped where it was placed beyond the room, in the same step as the new hold: a
        renewal starting in between would keep it, unchecked, as a call in flight."""
        if job.holder is None:
            return
        if granted and lease in job.awaiting:
            lease.hold(*job.holder)
        elif not granted and lease not in job.awaiting:
            lease.drop(job.holder[0])

    def _run(self, job: _Renewing) -> Renewal:
        """Commit the renewal in this thread (the background one) and return its result."""
        self._commit(job)
        return job.future.result()

    def _commit(self, job: _Renewing) -> None:
        """One ledger transaction, without the lock; local state follows only what was
        committed. The result or error goes to whoever waits on the job."""
        try:
            renewal = self._ledger.renew(
                self._lease_id, job.changes, job.now, self._ttl, self._policy
            )
        except BaseException as error:  # every error reaches the waiters, and frees the leases
            with self._lock:
                for lease in job.leases:
                    lease.failed()
                    self._settle_holder(job, lease, granted=False)
                    lease.pending = None
            job.future.set_exception(error)
            if not isinstance(error, Exception):
                raise
            return
        warned = {(w.budget.label, w.key) for w in renewal.warnings}
        with self._lock:
            for lease, grant in zip(job.leases, renewal.grants, strict=True):
                key = (lease.charge.label, lease.charge.key)
                lease.committed(grant, job.now, self._ttl, key in warned)
                self._settle_holder(job, lease, granted=renewal.refused is None)
                lease.pending = None
        for overrun in renewal.overruns:
            logger.warning("budget exceeded (on_exceed='warn'): %s", overrun)
        job.future.set_result(renewal)


def _call_alive(method: weakref.WeakMethod[Callable[[], None]]) -> None:
    """Call a weakly referenced method if its object still exists."""
    alive = method()
    if alive is not None:
        alive()
