"""Budgets: construction, periods, scopes, warnings, expiry; refusals before the call."""

from __future__ import annotations

import gc
import logging
import pickle
import threading
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from freezegun import freeze_time

from usage_callbacks import (
    Budget,
    BudgetExceededError,
    BudgetUnavailableError,
    BudgetWarning,
    ModelPrice,
    TokenUsage,
    UsageTracker,
)
from usage_callbacks.usage import MAX_COST_PER_CALL_USD, MAX_TOKENS_PER_CALL

# $1 per 1M tokens in and out: a token costs a micro-dollar, easy to reason about.
PRICES = {"m": ModelPrice(input_per_mtok=Decimal(1), output_per_mtok=Decimal(1))}


class Provider:
    """Stands in for the LLM: counts the calls that reached it."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, tracker: UsageTracker, tokens: int = 100, **scope: str) -> None:
        reservation = tracker.reserve(
            model="m", prompt_tokens=tokens // 2, max_output_tokens=tokens // 2, **scope
        )
        self.calls += 1
        tracker.record(
            TokenUsage(prompt_tokens=tokens // 2, completion_tokens=tokens // 2),
            model="m",
            reservation=reservation,
            **scope,
        )


def _tracker(url: str, *budgets: Budget, **kwargs: object) -> UsageTracker:
    return UsageTracker(url, budgets=budgets, prices=PRICES, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "advice"),
    [
        ({}, "Budget(limit_usd=5)"),
        ({"limit_usd": -1}, "greater than 0"),
        ({"limit_tokens": 0}, "greater than 0"),
        ({"limit_usd": 1, "per": "team"}, "'agent' or 'dimension:<key>'"),
        ({"limit_usd": 1, "period": "fortnight"}, "'minute', 'hour', 'day', 'week' or 'month'"),
        ({"limit_usd": 1, "period": timedelta(0)}, "period=timedelta"),
        ({"limit_usd": 1, "warn_at": 1.5}, "less than 1"),
    ],
)
def test_bad_budgets_fail_at_construction(kwargs: dict[str, object], advice: str) -> None:
    with pytest.raises(ValueError, match=advice.replace("(", r"\(").replace(")", r"\)")):
        Budget(**kwargs)  # type: ignore[arg-type]


def test_calendar_windows_are_utc() -> None:
    now = datetime(2026, 2, 28, 23, 59, 30, tzinfo=timezone(timedelta(hours=-5)))
    utc = now.astimezone(timezone.utc)
    assert utc.day == 1 and utc.month == 3
    assert Budget(limit_usd=1, period="day").window(now) == (
        datetime(2026, 3, 1, tzinfo=timezone.utc),
        datetime(2026, 3, 2, tzinfo=timezone.utc),
    )
    assert Budget(limit_usd=1, period="month").window(now) == (
        datetime(2026, 3, 1, tzinfo=timezone.utc),
        datetime(2026, 4, 1, tzinfo=timezone.utc),
    )
    week = Budget(limit_usd=1, period="week").window(now)
    assert week[0].weekday() == 0 and week[1] - week[0] == timedelta(days=7)
    assert Budget(limit_usd=1, period="minute").window(now) == (
        datetime(2026, 3, 1, 4, 59, tzinfo=timezone.utc),
        datetime(2026, 3, 1, 5, 0, tzinfo=timezone.utc),
    )


def test_the_provider_is_not_called_once_the_budget_is_spent(store_url: str) -> None:
    provider = Provider()
    with _tracker(store_url, Budget(limit_tokens=1000)) as tracker:
        with pytest.raises(BudgetExceededError) as refused:
            for _ in range(100):
                provider(tracker)
        assert provider.calls == 10
        assert tracker.summary().usage.total_tokens == 1000
        error = refused.value
        assert (error.limit, error.spent, error.requested) == (1000, 1000, 100)
        assert "global: 1,000 tokens of 1,000 tokens spent in total" in str(error)
        # a refusal holds nothing
        [status] = tracker.budget_status()
        assert status.reserved_tokens == 0 and status.remaining_tokens == 0


def test_message_says_who_how_much_and_when_it_resets(memory_tracker: UsageTracker) -> None:
    with freeze_time("2026-11-23 15:00:00"):
        tracker = _tracker(
            "memory://", Budget(limit_usd=Decimal("0.0005"), per="user", period="day")
        )
        provider = Provider()
        with pytest.raises(BudgetExceededError) as refused:
            for _ in range(10):
                provider(tracker, tokens=200, user_id="alice")
        tracker.close()
    assert str(refused.value).startswith(
        "user alice: $0.0004 of $0.0005 spent today; this call needs up to $0.0002; "
        "resets 2026-11-24T00:00Z"
    )
    assert refused.value.key == "alice" and refused.value.unit == "usd"
    copy = pickle.loads(pickle.dumps(refused.value))
    assert str(copy) == str(refused.value) and copy.key == "alice"


def test_users_are_isolated_and_anonymous_calls_share_one_bucket(store_url: str) -> None:
    provider = Provider()
    with _tracker(store_url, Budget(limit_tokens=300, per="user")) as tracker:
        for user in ("alice", "bob"):
            for _ in range(3):
                provider(tracker, user_id=user)
            with pytest.raises(BudgetExceededError, match=f"user {user}"):
                provider(tracker, user_id=user)
        for _ in range(3):
            provider(tracker)
        with pytest.raises(BudgetExceededError, match=r"user \(none\)"):
            provider(tracker)
    assert provider.calls == 9


def test_model_budgets_only_limit_their_model(memory_tracker: UsageTracker) -> None:
    prices = {**PRICES, "cheap": PRICES["m"]}
    with UsageTracker(
        "memory://", budgets=[Budget(limit_tokens=100, per="model")], prices=prices
    ) as tracker:
        tracker.record(TokenUsage(prompt_tokens=100), model="m")
        with pytest.raises(BudgetExceededError, match="model m"):
            tracker.reserve(model="m", prompt_tokens=1, max_output_tokens=0)
        assert tracker.reserve(model="cheap", prompt_tokens=1, max_output_tokens=0) is not None


def test_period_rollover_frees_the_budget(sqlite_url: str) -> None:
    provider = Provider()
    with freeze_time("2026-11-23 23:59:00") as clock:
        tracker = _tracker(sqlite_url, Budget(limit_tokens=200, period="day"))
        provider(tracker)
        provider(tracker)
        with pytest.raises(BudgetExceededError, match="resets 2026-11-24T00:00Z"):
            provider(tracker)
        clock.move_to("2026-11-24 00:00:01")
        provider(tracker)
        assert provider.calls == 3
        tracker.close()


def test_rolling_windows_forget_old_spend(memory_tracker: UsageTracker) -> None:
    provider = Provider()
    with freeze_time("2026-11-23 10:00:00") as clock:
        tracker = _tracker("memory://", Budget(limit_tokens=200, period=timedelta(hours=1)))
        provider(tracker)
        clock.tick(timedelta(minutes=30))
        provider(tracker)
        with pytest.raises(BudgetExceededError, match="in the last 1:00:00"):
            provider(tracker)
        clock.tick(timedelta(minutes=31))
        provider(tracker)  # the first call left the window
        with pytest.raises(BudgetExceededError):
            provider(tracker)
        tracker.close()


def test_session_budgets_and_nesting(memory_tracker: UsageTracker) -> None:
    provider = Provider()
    tracker = _tracker("memory://")
    with tracker.session("outer", max_tokens=500):
        with tracker.session("inner", max_tokens=200):
            provider(tracker)
            provider(tracker)
            with pytest.raises(BudgetExceededError, match="session inner"):
                provider(tracker)
        provider(tracker)
        provider(tracker)
        with pytest.raises(BudgetExceededError, match="session outer"):
            provider(tracker)  # 400 spent + 100 requested fits; the sixth does not
            provider(tracker)
    provider(tracker)  # the sessions are closed: their budgets no longer apply
    assert provider.calls == 6
    assert not tracker.has_budgets
    tracker.close()


def test_warning_fires_once_per_period(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[BudgetWarning] = []
    budget = Budget(limit_tokens=1000, period="day", warn_at=0.5, on_warning=seen.append)
    provider = Provider()
    with freeze_time("2026-11-23 08:00:00") as clock, caplog.at_level(logging.WARNING):
        tracker = _tracker("memory://", budget)
        for _ in range(9):
            provider(tracker)
        assert len(seen) == 1 and seen[0].spent_tokens == 500
        clock.move_to("2026-11-24 08:00:00")
        for _ in range(6):
            provider(tracker)
        tracker.close()
    assert [w.spent_tokens for w in seen] == [500, 500]
    assert sum("crossed 50%" in message for message in caplog.messages) == 2


def test_on_exceed_warn_lets_the_call_through(caplog: pytest.LogCaptureFixture) -> None:
    provider = Provider()
    with (
        caplog.at_level(logging.WARNING),
        _tracker("memory://", Budget(limit_tokens=100, on_exceed="warn")) as tracker,
    ):
        provider(tracker)
        provider(tracker)
    assert provider.calls == 2
    assert any("on_exceed='warn'" in message for message in caplog.messages)


def test_reservations_hold_until_settled_released_or_abandoned(
    memory_tracker: UsageTracker,
) -> None:
    with freeze_time("2026-11-23 08:00:00") as clock:
        tracker = _tracker(
            "memory://", Budget(limit_tokens=1000), reservation_ttl=timedelta(minutes=5)
        )
        held = tracker.reserve(model="m", prompt_tokens=400, max_output_tokens=400)
        assert held is not None and held.tokens == 800
        with pytest.raises(BudgetExceededError):
            tracker.reserve(model="m", prompt_tokens=100, max_output_tokens=200)
        tracker.release(held)
        long_call = tracker.reserve(model="m", prompt_tokens=400, max_output_tokens=400)
        assert long_call is not None
        clock.tick(timedelta(minutes=6))  # a live call keeps its hold past the TTL
        with pytest.raises(BudgetExceededError):
            tracker.reserve(model="m", prompt_tokens=400, max_output_tokens=400)
        del long_call  # abandoned: never settled, never released, its state collected
        gc.collect()
        assert tracker.reserve(model="m", prompt_tokens=400, max_output_tokens=400) is not None
        tracker.close()


def test_default_output_allowance_is_reserved_when_max_tokens_is_unknown() -> None:
    with _tracker(
        "memory://", Budget(limit_tokens=10_000), default_output_allowance=700
    ) as tracker:
        reservation = tracker.reserve(model="m", prompt_tokens=50)
        assert reservation is not None and reservation.tokens == 750


def test_unbudgeted_trackers_reserve_nothing(memory_tracker: UsageTracker) -> None:
    assert memory_tracker.reserve(model="m", prompt_tokens=10**9) is None


@pytest.mark.parametrize(
    ("counts", "named"),
    [
        ({"prompt_tokens": -1}, "prompt_tokens"),
        ({"prompt_tokens": True}, "prompt_tokens"),
        ({"prompt_tokens": 2.5}, "prompt_tokens"),
        ({"max_output_tokens": -5}, "max_output_tokens"),
        ({"embedding_tokens": 10**13}, "embedding_tokens"),
    ],
)
def test_bad_reservation_counts_are_refused_with_the_field_named(
    counts: dict[str, object], named: str
) -> None:
    with _tracker("memory://", Budget(limit_tokens=10**6)) as tracker:
        with pytest.raises(ValueError, match=named):
            tracker.reserve(model="m", **counts)  # type: ignore[arg-type]
        held = tracker.reserve(model="m", prompt_tokens=10, max_output_tokens=0)
        assert held is not None and held.tokens == 10  # nothing was held by the refusals
        [status] = tracker.budget_status()
        assert status.reserved_tokens == 10


def test_add_budget_later_and_duplicate_labels() -> None:
    with _tracker("memory://") as tracker:
        tracker.add_budget(Budget(limit_usd=1, per="user", period="day"))
        with pytest.raises(ValueError, match="name="):
            tracker.add_budget(Budget(limit_usd=1, per="user", period="day"))
        tracker.add_budget(Budget(limit_usd=1, per="user", period="day", name="second"))
        assert len(tracker.budgets) == 2


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_budget_database_outage_fails_closed_by_default_or_open_on_request(
    mode: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import sqlalchemy as sa

    from usage_callbacks import BudgetUnavailableError

    statement = "UPDATE budget_counters SET spent_pico = spent_pico + ? WHERE scope_key = ?"

    def database_gone(*_: object, **__: object) -> None:
        raise sa.exc.OperationalError(
            statement, {"scope_key": "alice@example.com"}, ConnectionRefusedError("server closed")
        )

    provider = Provider()
    with _tracker("memory://", Budget(limit_usd=5), budget_failure_mode=mode) as tracker:
        monkeypatch.setattr(tracker.store.ledger, "renew", database_gone)
        if mode == "closed":
            with pytest.raises(BudgetUnavailableError, match="fail-closed") as refused:
                provider(tracker)
            assert provider.calls == 0
            message = str(refused.value)
        else:
            with caplog.at_level(logging.WARNING, logger="usage_callbacks"):
                provider(tracker)
            assert provider.calls == 1
            assert len(tracker.records()) == 1  # the record is kept even if booking failed
            message = caplog.text
    # what failed, without the SQL statement or its parameters (they carry user ids)
    assert "server closed" in message
    assert "budget_counters" not in message and "alice@example.com" not in message


def test_a_budget_added_after_calls_applies_to_the_next_call() -> None:
    # charges are remembered per call scope: adding a budget must forget them
    with _tracker("memory://", Budget(limit_tokens=10**6, per="user")) as tracker:
        provider = Provider()
        provider(tracker, tokens=100, user_id="ann")
        tracker.add_budget(Budget(limit_tokens=50, name="tight"))
        with pytest.raises(BudgetExceededError, match="tight"):
            provider(tracker, tokens=100, user_id="ann")
        assert provider.calls == 1


def test_a_copied_budget_gets_its_own_label() -> None:
    # the label keys the ledger: a copy with another limit must not share its counters
    budget = Budget(limit_usd=1, per="user", period="day")
    assert budget.label != budget.model_copy(update={"limit_usd": Decimal(2)}).label
    assert budget.model_copy(update={"name": "team"}).label == "team"


def test_two_open_sessions_of_one_name_share_their_budget_until_both_close() -> None:
    """Two requests of one conversation: the first to close must not lift the other's limit."""
    provider = Provider()
    tracker = _tracker("memory://")
    opened, first_closed, refused = threading.Event(), threading.Event(), []

    def first_request() -> None:
        with tracker.session("conv-42", max_tokens=300):
            opened.set()
            provider(tracker)  # 100 of 300
        first_closed.set()

    def second_request() -> None:
        opened.wait(10)
        with tracker.session("conv-42", max_tokens=300):
            first_closed.wait(10)
            for _ in range(10):  # room for 2 more calls of 100, not 10
                try:
                    provider(tracker)
                except BudgetExceededError:
                    refused.append(1)
        assert not tracker.has_budgets  # the last one out takes the budget with it

    threads = [threading.Thread(target=first_request), threading.Thread(target=second_request)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert provider.calls == 3 and len(refused) == 8
    assert not tracker.has_budgets
    tracker.close()


@pytest.mark.parametrize("where", ["thread", "process"])
def test_a_call_longer_than_the_ttl_keeps_its_hold(sqlite_url: str, where: str) -> None:
    """A live call's hold is renewed while it runs; only a dead process's lapses. Another
    tracker on the same database stands for another process (its own lease)."""
    ttl = timedelta(seconds=1.2)
    owner = _tracker(sqlite_url, Budget(limit_tokens=1000), reservation_ttl=ttl)
    other = owner if where == "thread" else _tracker(sqlite_url, reservation_ttl=ttl)
    if other is not owner:
        other.add_budget(Budget(limit_tokens=1000))
    holding, done = threading.Event(), threading.Event()

    def long_call() -> None:
        held = owner.reserve(model="m", prompt_tokens=450, max_output_tokens=450)
        holding.set()
        done.wait(30)  # the provider takes longer than the TTL
        owner.record(
            TokenUsage(prompt_tokens=450, completion_tokens=450), model="m", reservation=held
        )

    caller = threading.Thread(target=long_call)
    caller.start()
    assert holding.wait(10)
    time.sleep(3 * ttl.total_seconds())
    try:
        with pytest.raises(BudgetExceededError):
            other.reserve(model="m", prompt_tokens=450, max_output_tokens=450)
    finally:
        done.set()
        caller.join(30)
    owner.close()
    other.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_absurd_usage_reports_do_not_stall_the_ledger(
    backend: str, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    """The largest usage that can enter, priced at the most a call can cost, booked again
    and again: every other user's reservations still work and the summary still sums."""
    url = str(request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url"))
    pricey = {"m": ModelPrice(input_per_mtok=Decimal(1000), output_per_mtok=Decimal(1000))}
    budgets = [Budget(limit_usd=100, per="user"), Budget(limit_tokens=10**12, per="user")]
    with UsageTracker(url, budgets=budgets, prices=pricey, budget_lease_fraction=0) as tracker:
        absurd = TokenUsage(
            prompt_tokens=MAX_TOKENS_PER_CALL, completion_tokens=MAX_TOKENS_PER_CALL
        )
        for _ in range(12):
            record = tracker.record(absurd, model="m", user_id="mallory")
            assert record.cost_estimate_usd == MAX_COST_PER_CALL_USD
        tracker.flush()
        with pytest.raises(BudgetExceededError) as refused:
            tracker.reserve(model="m", prompt_tokens=1, max_output_tokens=1, user_id="mallory")
        assert not isinstance(refused.value, BudgetUnavailableError)
        for _ in range(3):  # everyone else carries on
            held = tracker.reserve(model="m", prompt_tokens=1, max_output_tokens=1, user_id="bob")
            assert held is not None
            tracker.release(held)
        summary = tracker.summary(group_by="user")
        assert summary.calls == 12
        assert summary.usage.total_tokens == 12 * 2 * MAX_TOKENS_PER_CALL


def test_usage_beyond_the_per_call_maximum_cannot_enter() -> None:
    with pytest.raises(ValueError, match="less than or equal to"):
        TokenUsage(prompt_tokens=MAX_TOKENS_PER_CALL + 1)
    with pytest.raises(ValueError, match="less than or equal to"):
        TokenUsage(cost_estimate_usd=MAX_COST_PER_CALL_USD + 1)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_budget_starts_from_the_spend_the_store_already_holds(
    backend: str, request: pytest.FixtureRequest
) -> None:
    url = str(request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url"))
    now = datetime.now(timezone.utc)
    with _tracker(url) as earlier:  # an earlier process, without budgets
        for _ in range(9):
            earlier.record(
                TokenUsage(prompt_tokens=50, completion_tokens=50), model="m", user_id="alice"
            )
        earlier.record(  # yesterday's and an hour ago's spend: outside the windows below
            TokenUsage(prompt_tokens=500),
            model="m",
            user_id="alice",
            ended_at=now - timedelta(days=1, minutes=1),
        )
        earlier.record(
            TokenUsage(prompt_tokens=500),
            model="m",
            user_id="bob",
            ended_at=now - timedelta(minutes=90),
        )
    daily = Budget(limit_tokens=1000, per="user", period="day")
    with _tracker(url, daily) as fresh:
        with pytest.raises(BudgetExceededError, match="900 tokens of 1,000"):
            fresh.reserve(model="m", prompt_tokens=100, max_output_tokens=100, user_id="alice")
        held = fresh.reserve(model="m", prompt_tokens=50, max_output_tokens=50, user_id="alice")
        assert held is not None  # 900 + 100 fits exactly: yesterday's 500 is not counted
        fresh.release(held)
    hourly = Budget(limit_tokens=600, per="user", period=timedelta(hours=1))
    with _tracker(url, hourly) as fresh:
        with pytest.raises(BudgetExceededError, match="900 tokens of 600"):
            fresh.reserve(model="m", prompt_tokens=1, max_output_tokens=1, user_id="alice")
        bob = fresh.reserve(model="m", prompt_tokens=250, max_output_tokens=250, user_id="bob")
        assert bob is not None  # bob's spend is older than the hour
        fresh.release(bob)


def test_a_budget_added_later_counts_the_calls_already_recorded() -> None:
    with _tracker("memory://") as tracker:
        for _ in range(9):
            tracker.record(
                TokenUsage(prompt_tokens=50, completion_tokens=50), model="m", user_id="alice"
            )
        tracker.add_budget(Budget(limit_tokens=1000, per="user", period="day"))
        with pytest.raises(BudgetExceededError, match="900 tokens of 1,000"):
            tracker.reserve(model="m", prompt_tokens=100, max_output_tokens=100, user_id="alice")


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
@pytest.mark.parametrize("user_id", ["a\x00b", "u" * 300])
def test_any_user_id_gets_a_working_budget(
    backend: str, user_id: str, request: pytest.FixtureRequest
) -> None:
    """Fail-closed refused such a user's every call; fail-open let them all through."""
    url = str(request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url"))
    for mode in ("closed", "open"):
        provider = Provider()
        budget = Budget(limit_tokens=250, per="user", name=f"odd-ids-{mode}")
        with _tracker(url, budget, budget_failure_mode=mode) as tracker:
            for _ in range(2):
                provider(tracker, user_id=user_id)
            with pytest.raises(BudgetExceededError) as refused:
                provider(tracker, user_id=user_id)
            assert not isinstance(refused.value, BudgetUnavailableError)
            assert provider.calls == 2


def test_ledger_keys_are_storable_and_distinct() -> None:
    from usage_callbacks.budgets import ledger_key

    keys = ["alice", "a\x00b", "a\x00c", "u" * 300, "u" * 301, "lone-\ud800", "lone-\udfff"]
    stored = [ledger_key(key) for key in keys]
    assert stored[0] == "alice" and len(set(stored)) == len(keys)
    for key in stored:
        assert len(key) <= 256 and "\x00" not in key
        key.encode("utf-8")  # no lone surrogate left


def test_a_postgresql_server_that_never_answers_fails_within_seconds() -> None:
    """A black-holed server (the port accepts, nothing ever answers): the tracker gives up
    after the connect timeout instead of blocking its caller indefinitely."""
    import socket

    from usage_callbacks.store.sql import StoreConfigurationError

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections complete in the kernel; no byte is ever sent back
    port = silent.getsockname()[1]
    outcome: list[BaseException] = []

    def open_tracker() -> None:
        try:
            UsageTracker(f"postgresql+psycopg://u@127.0.0.1:{port}/db")
        except BaseException as error:  # the outcome is the test's to judge
            outcome.append(error)

    opener = threading.Thread(target=open_tracker, daemon=True)
    opener.start()
    opener.join(30)
    silent.close()
    assert not opener.is_alive(), "still waiting for a server that never answers"
    assert len(outcome) == 1 and isinstance(outcome[0], StoreConfigurationError)


def test_rolling_windows_on_postgresql_go_by_the_database_clock(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each host judged a shared rolling window by its own clock: one 90 s ahead saw the
    others' spend as already past (1,500 went through a limit of 1,000)."""
    import usage_callbacks.allowances
    import usage_callbacks.tracker

    budget = Budget(limit_tokens=1000, period=timedelta(minutes=1), name="rolling")
    provider = Provider()
    with _tracker(pg_url, budget, budget_lease_fraction=0) as on_time:
        for _ in range(9):
            provider(on_time)  # 900 of 1,000

    def ahead() -> datetime:
        return datetime.now(timezone.utc) + timedelta(seconds=90)

    for module in (usage_callbacks.tracker, usage_callbacks.allowances):
        monkeypatch.setattr(module, "utcnow", ahead)
    with _tracker(pg_url, budget, budget_lease_fraction=0) as skewed:
        provider(skewed)  # the last 100
        for _ in range(5):
            with pytest.raises(BudgetExceededError):
                provider(skewed)
        [status] = skewed.budget_status()
        assert status.spent_tokens == 1000
    assert provider.calls == 10


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_budget_status_reads_a_page_or_a_key_at_a_time(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """200,000 users' statuses were read one query per key, all at once (70 s)."""
    url = str(request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url"))
    each = Budget(limit_tokens=10_000, per="user", period="day", name="each")
    everyone = Budget(limit_tokens=1_000_000, name="all")
    provider = Provider()
    with _tracker(url, each, everyone) as tracker:
        for user in ("eve", "ann", "dee", "bob", "cy"):
            provider(tracker, user_id=user)
        every = [(s.key, s.budget.label, s.spent_tokens) for s in tracker.budget_status()]
        assert every == [("*", "all", 500)] + [
            (user, "each", 100) for user in ("ann", "bob", "cy", "dee", "eve")
        ]
        pages, after = [], None
        while page := tracker.budget_status(limit=2, after=after):
            pages.append([status.key for status in page])
            after = page[-1].key
        assert pages == [["*", "ann"], ["bob", "cy"], ["dee", "eve"]]
        [bob] = tracker.budget_status("bob")
        assert (bob.budget.label, bob.spent_tokens, bob.remaining_tokens) == ("each", 100, 9_900)
        assert tracker.budget_status("nobody") == []


def test_a_refusal_waits_for_the_holds_garbage_collection_is_giving_back() -> None:
    """An abandoned call's hold is given back on a thread of its own; a call refused while
    that is under way used to be refused for good although the room was coming back."""
    from usage_callbacks.collected import wait_for_collected, when_collected

    with UsageTracker("memory://", budgets=[Budget(limit_tokens=1_000)]) as tracker:
        held = tracker.reserve(model="m", prompt_tokens=400, max_output_tokens=400)
        assert held is not None
        giving_back = threading.Event()

        class Dropped:
            """Stands for a call's state collected while its release is still running."""

        def release_slowly() -> None:
            giving_back.wait(10)
            tracker.release(held)

        dropped = Dropped()
        when_collected(dropped, release_slowly)
        del dropped  # collected: the release runs on its own thread, held up for now
        threading.Timer(0.2, giving_back.set).start()
        assert tracker.reserve(model="m", prompt_tokens=400, max_output_tokens=400) is not None
        assert wait_for_collected(10)


def test_work_set_off_by_collection_that_fails_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from usage_callbacks.collected import wait_for_collected, when_collected

    class Dropped:
        pass

    def fail() -> None:
        raise RuntimeError("the ledger is away")

    dropped = Dropped()
    when_collected(dropped, fail)
    with caplog.at_level(logging.WARNING, logger="usage_callbacks"):
        del dropped
        assert wait_for_collected(10)
    assert "ending a garbage-collected call" in caplog.text


def test_a_settled_or_released_reservation_sets_off_nothing_when_collected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every reservation, settled or not, used to give its hold back again when it was
    collected: a thread started for each budgeted call (~70 µs of CPU)."""
    from usage_callbacks.allowances import BudgetAllowances
    from usage_callbacks.collected import wait_for_collected

    abandoned: list[str] = []
    abandon = BudgetAllowances.abandon

    def count(self: BudgetAllowances, reservation_id: str, charges: object) -> None:
        abandoned.append(reservation_id)
        abandon(self, reservation_id, charges)  # type: ignore[arg-type]

    monkeypatch.setattr(BudgetAllowances, "abandon", count)
    with UsageTracker("memory://", budgets=[Budget(limit_tokens=10_000)]) as tracker:
        settled = tracker.reserve(model="m", prompt_tokens=10, max_output_tokens=10)
        tracker.record(TokenUsage(prompt_tokens=10, completion_tokens=5), reservation=settled)
        released = tracker.reserve(model="m", prompt_tokens=10, max_output_tokens=10)
        tracker.release(released)
        dropped = tracker.reserve(model="m", prompt_tokens=10, max_output_tokens=10)
        assert settled is not None and released is not None and dropped is not None
        dropped_id = dropped.id
        del settled, released, dropped
        gc.collect()
        assert wait_for_collected(10)
    assert abandoned == [dropped_id]  # only the one never settled nor released


def test_work_set_off_by_collection_runs_on_one_thread() -> None:
    """A thread was started for each piece of work, and every streamed call sets some off."""
    from usage_callbacks.collected import wait_for_collected, when_collected

    class Dropped:
        pass

    ran_on: list[threading.Thread] = []
    for _ in range(5):
        dropped = Dropped()
        when_collected(dropped, lambda: ran_on.append(threading.current_thread()))
        del dropped
    assert wait_for_collected(10)
    assert len(ran_on) == 5 and len(set(ran_on)) == 1
    assert ran_on[0] is not threading.current_thread()  # off the collecting thread
