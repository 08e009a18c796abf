"""Budget allowances: a worker spends from its hold in memory; every other worker sees it."""

from __future__ import annotations

import gc
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from usage_callbacks import (
    Budget,
    BudgetExceededError,
    BudgetUnavailableError,
    ModelPrice,
    TokenUsage,
    UsageTracker,
)
from usage_callbacks.store.ledger import BudgetLedger, BudgetStatus, Charge
from usage_callbacks.store.models import utcnow

PRICES = {"m": ModelPrice(input_per_mtok=Decimal(1), output_per_mtok=Decimal(1))}


def _worker(url: str, limit_tokens: int = 1000, **kwargs: object) -> UsageTracker:
    budget = Budget(limit_tokens=limit_tokens, name="shared")
    return UsageTracker(url, budgets=[budget], prices=PRICES, **kwargs)  # type: ignore[arg-type]


def _call(tracker: UsageTracker, reserve: int = 100, bill: int = 100) -> None:
    reservation = tracker.reserve(model="m", prompt_tokens=reserve, max_output_tokens=0)
    tracker.record(TokenUsage(prompt_tokens=bill), model="m", reservation=reservation)


def _ledger_view(
    tracker: UsageTracker, budget: Budget | None = None, key: str = "*"
) -> BudgetStatus:
    """What the ledger shows everyone, without booking or returning this tracker's hold."""
    [status] = tracker.store.ledger.status([Charge(budget or tracker.budgets[0], key)], utcnow())
    return status


def _eventually(read: Callable[[], object], expected: object) -> None:
    """Bookings run in the background thread (record() never waits for the ledger):
    wait for ``read()`` to show ``expected``."""
    deadline = time.monotonic() + 30
    while read() != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert read() == expected


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture
def renewals(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the ledger transactions (renewals) every tracker makes."""
    seen: list[int] = []
    renew = BudgetLedger.renew

    def counted(self: BudgetLedger, *args: object, **kwargs: object) -> object:
        seen.append(1)
        return renew(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(BudgetLedger, "renew", counted)
    return seen


def test_calls_that_fit_the_hold_cost_no_ledger_transaction(url: str, renewals: list[int]) -> None:
    with _worker(url, limit_tokens=1_000_000, flush_interval=3600) as worker:
        for _ in range(30):
            _call(worker)
        assert len(renewals) == 1  # the first call held 32 calls' worth
        assert worker.summary().usage.total_tokens == 3000


def test_fraction_zero_books_every_call_at_once(url: str, renewals: list[int]) -> None:
    with _worker(url, budget_lease_fraction=0) as worker, _worker(url) as reader:
        for calls in range(1, 4):
            _call(worker)
            _eventually(
                lambda: (_ledger_view(reader).spent_tokens, _ledger_view(reader).reserved_tokens),
                (100 * calls, 0),
            )

        assert len(renewals) >= 6  # a reservation and a booking per call


def test_other_workers_see_the_hold_and_cannot_spend_it(url: str) -> None:
    with _worker(url, flush_interval=3600) as first, _worker(url) as second:
        _call(first)
        # first holds its call (100) and a slice: 1/8 of the 900 left -> 212 in all
        [status] = second.budget_status()
        assert (status.spent_tokens, status.reserved_tokens) == (0, 212)
        with pytest.raises(BudgetExceededError) as refused:
            second.reserve(model="m", prompt_tokens=789, max_output_tokens=0)
        assert (refused.value.spent, refused.value.requested) == (212, 789)
        held = second.reserve(model="m", prompt_tokens=788, max_output_tokens=0)
        assert held is not None
        first.flush()  # books the spend, keeps the slice
        status = _ledger_view(first)
        assert (status.spent_tokens, status.reserved_tokens) == (100, 112 + 788)
        second.release(held)
    with _worker(url) as reader:  # closing handed every hold back
        [status] = reader.budget_status()
        assert (status.spent_tokens, status.reserved_tokens) == (100, 0)


def test_a_call_costing_more_than_it_reserved_is_booked_at_once(url: str) -> None:
    with _worker(url, flush_interval=3600) as first, _worker(url) as second:
        _call(first, reserve=100, bill=500)  # no max_tokens: the answer ran long
        _eventually(lambda: _ledger_view(second).spent_tokens, 500)  # not waiting for a flush
        with pytest.raises(BudgetExceededError):
            second.reserve(model="m", prompt_tokens=501, max_output_tokens=0)


def test_spend_is_booked_within_the_interval_while_calls_go_on(url: str) -> None:
    with _worker(url, limit_tokens=1_000_000, flush_interval=0.5) as first, _worker(url) as other:
        first.flush()  # the interval starts
        _call(first)
        assert _ledger_view(other).spent_tokens == 0
        time.sleep(0.6)
        _call(first)  # due: this settlement has both calls booked
        _eventually(lambda: _ledger_view(other).spent_tokens, 200)


def test_a_closed_session_hands_back_its_hold(url: str) -> None:
    with UsageTracker(url, prices=PRICES, flush_interval=3600) as tracker:
        with tracker.session("s1", max_tokens=10_000):
            _call(tracker)
            [budget] = tracker.budgets
            assert _ledger_view(tracker, budget, "s1").reserved_tokens > 0
        status = _ledger_view(tracker, budget, "s1")
        assert (status.spent_tokens, status.reserved_tokens) == (100, 0)


def test_calls_priced_only_after_the_answer_are_held_by_their_typical_size(
    url: str, renewals: list[int]
) -> None:
    """The model is named only in the response: the reservation prices at $0; the hold
    still grows to the calls' real size after the first, and later calls fit in it."""
    budget = Budget(limit_usd=1000, per="user", period="day")
    with UsageTracker(url, budgets=[budget], prices=PRICES, flush_interval=3600) as worker:
        for _ in range(30):
            reservation = worker.reserve(model=None, prompt_tokens=100, user_id="ann")
            worker.record(
                TokenUsage(prompt_tokens=100), model="m", user_id="ann", reservation=reservation
            )
        assert len(renewals) <= 3
        [status] = worker.budget_status()
        assert status.spent_usd == Decimal("0.003")


def test_idle_users_holds_are_returned_and_forgotten(sqlite_url: str) -> None:
    """200,000 users used to keep a lease (and a ledger hold) each for good: +15 MB per
    10k users. A lease unused for a TTL is booked, returned and forgotten."""
    budget = Budget(limit_tokens=10_000, per="user", period="day")
    tracker = UsageTracker(sqlite_url, budgets=[budget], reservation_ttl=timedelta(seconds=0.6))
    with tracker:
        for user in range(300):
            held = tracker.reserve(
                model="gpt-4o-mini", prompt_tokens=10, max_output_tokens=10, user_id=f"u{user}"
            )
            tracker.record(
                TokenUsage(prompt_tokens=10, completion_tokens=5),
                model="gpt-4o-mini",
                user_id=f"u{user}",
                reservation=held,
            )
        deadline = time.monotonic() + 10
        while tracker._allowances._leases and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not tracker._allowances._leases
        statuses = tracker.store.ledger.status(
            [Charge(budget, f"u{user}") for user in range(300)], datetime.now(timezone.utc)
        )
        assert all(s.reserved_tokens == 0 and s.spent_tokens == 15 for s in statuses)


@pytest.fixture
def stuck_ledger(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Renewals for user "slow" hang (a partitioned database that neither answers nor
    refuses) until the test opens the gate; the first event says one is hanging."""
    hanging, gate = threading.Event(), threading.Event()
    renew = BudgetLedger.renew

    def stuck(self: BudgetLedger, lease_id: str, changes: Any, *args: Any) -> Any:
        if any(change.charge.key == "slow" for change in changes):
            hanging.set()
            gate.wait(60)
        return renew(self, lease_id, changes, *args)

    monkeypatch.setattr(BudgetLedger, "renew", stuck)
    yield hanging, gate
    gate.set()


def _per_user_and_global(url: str, **kwargs: Any) -> UsageTracker:
    budgets = [
        Budget(limit_tokens=1_000_000, name="everyone"),
        Budget(limit_tokens=100_000, per="user", name="each"),
    ]
    return UsageTracker(url, budgets=budgets, prices=PRICES, flush_interval=3600, **kwargs)


def test_a_renewal_stuck_on_the_ledger_holds_up_no_other_thread(
    url: str, stuck_ledger: tuple[threading.Event, threading.Event]
) -> None:
    """Another thread's reserve() on holds it has, and its record(), go on while one
    renewal hangs (the allowances' lock was held across the database I/O: they waited)."""
    hanging, gate = stuck_ledger
    with _per_user_and_global(url) as tracker:
        tracker.reserve(model="m", prompt_tokens=100, max_output_tokens=0, user_id="fast")
        slow = threading.Thread(
            target=lambda: tracker.reserve(  # more than the shared hold has room for
                model="m", prompt_tokens=20_000, max_output_tokens=0, user_id="slow"
            ),
            daemon=True,
        )
        slow.start()
        assert hanging.wait(30)
        done: list[str] = []

        def fast_calls() -> None:
            for _ in range(3):
                held = tracker.reserve(
                    model="m", prompt_tokens=100, max_output_tokens=0, user_id="fast"
                )
                assert held is not None
                tracker.record(
                    TokenUsage(prompt_tokens=100), model="m", user_id="fast", reservation=held
                )
                done.append("call")

        fast = threading.Thread(target=fast_calls, daemon=True)
        fast.start()
        fast.join(15)
        assert done == ["call"] * 3, "a stuck renewal held up another thread's calls"
        assert slow.is_alive()  # the renewal still hangs
        gate.set()
        slow.join(30)


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_a_call_waits_for_the_ledger_at_most_budget_wait(
    url: str, mode: str, stuck_ledger: tuple[threading.Event, threading.Event]
) -> None:
    """A call that cannot get its reservation within budget_wait follows
    budget_failure_mode: refused with the provider not called, or let through."""
    hanging, gate = stuck_ledger
    called: list[int] = []
    with _per_user_and_global(url, budget_wait=0.5, budget_failure_mode=mode) as tracker:
        try:
            held = tracker.reserve(model="m", prompt_tokens=10, max_output_tokens=0, user_id="slow")
        except BudgetUnavailableError as refused:
            assert mode == "closed"
            assert "did not answer within 0.5 s" in str(refused)
        else:
            assert mode == "open" and held is None
            called.append(1)  # the provider
        assert hanging.is_set()
        assert called == ([1] if mode == "open" else [])
        gate.set()


def test_a_closed_tracker_with_a_budget_is_garbage_collected(url: str) -> None:
    """The allowances registered a bound method at fork, which kept every tracker alive."""
    tracker = _worker(url)
    _call(tracker)
    tracker.close()
    gone = weakref.ref(tracker._allowances)
    del tracker
    gc.collect()
    assert gone() is None


HOLD_THEN_DIE = """
import os, signal, sys
from datetime import timedelta
from usage_callbacks import Budget, UsageTracker
tracker = UsageTracker(sys.argv[1], budgets=[Budget(limit_tokens=1000, name="shared")],
                       reservation_ttl=timedelta(seconds=float(sys.argv[2])))
tracker.reserve(model="m", prompt_tokens=100, max_output_tokens=0)  # the provider is called...
os.kill(os.getpid(), signal.SIGKILL)  # ...and the worker dies before recording
"""


def test_a_sigkilled_workers_overspend_is_bounded_by_its_holds(url: str) -> None:
    """The killed worker's call may have been billed and never recorded: until its holds
    lapse (reservation_ttl) nobody can spend them, so the limit is exceeded by at most
    what it held (its calls and its slice); then they are everyone's again."""
    ttl = 3.0
    UsageTracker(url).close()
    worker = subprocess.run([sys.executable, "-c", HOLD_THEN_DIE, url, str(ttl)], check=False)
    assert worker.returncode == -signal.SIGKILL
    with _worker(url, reservation_ttl=timedelta(seconds=ttl), budget_lease_fraction=0) as other:
        held = _ledger_view(other).reserved_tokens
        assert held == 100 + 112  # its call and 1/8 of the 900 left
        with pytest.raises(BudgetExceededError):
            other.reserve(model="m", prompt_tokens=1000 - held + 1, max_output_tokens=0)
        _eventually(lambda: _ledger_view(other).reserved_tokens, 0)
        assert other.reserve(model="m", prompt_tokens=1000, max_output_tokens=0) is not None
