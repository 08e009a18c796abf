"""CallsInFlight: one entry per call, whatever the number of trackers and handlers."""

from __future__ import annotations

from datetime import timedelta

from usage_callbacks import Budget, UsageTracker
from usage_callbacks.runs import _FIRST_SWEEP, CallsInFlight, RunState
from usage_callbacks.store.models import utcnow


def _state(key: str) -> RunState:
    return RunState(run_id=key, started_at=utcnow())


def test_two_handlers_of_one_tracker_share_its_state_and_the_first_end_records() -> None:
    calls = CallsInFlight()
    with UsageTracker("memory://") as one, UsageTracker("memory://") as two:
        first, new = calls.start(one, _state("run"))
        again, new_again = calls.start(one, _state("run"))
        assert new and not new_again and again is first
        calls.start(two, _state("run"))
        assert calls.owners("run") == (one, two) and len(calls) == 1
        assert calls.finish("run", one) is first and calls.finish("run", one) is None
        assert calls.owners("run") == (two,)
        assert calls.finish("run", two) is not None
        assert len(calls) == 0 and calls.owners("run") == ()


def test_a_refusal_releases_every_trackers_hold_and_leaves_nothing() -> None:
    calls = CallsInFlight()
    budget = [Budget(limit_tokens=10_000)]
    with UsageTracker("memory://", budgets=budget) as roomy, UsageTracker("memory://") as plain:
        held = calls.start(roomy, _state("run"))[0]
        held.reservation = roomy.reserve(model="gpt-4o", prompt_tokens=100, max_output_tokens=100)
        calls.start(plain, _state("run"))  # a tracker without a budget follows it too
        assert roomy.budget_status()[0].reserved_tokens == 200
        calls.refuse("run")
        assert len(calls) == 0 and calls.owned_by(roomy) == calls.owned_by(plain) == 0
        assert roomy.budget_status()[0].reserved_tokens == 0


def test_calls_whose_end_never_comes_are_handed_to_their_tracker_after_its_ttl() -> None:
    calls = CallsInFlight()
    with (
        UsageTracker("memory://", reservation_ttl=timedelta(0)) as quick,
        UsageTracker("memory://", reservation_ttl=timedelta(hours=1)) as patient,
    ):
        forgotten: list[RunState] = []
        quick.forget_runs = forgotten.extend  # type: ignore[method-assign]
        calls.start(patient, _state("live"))
        for index in range(_FIRST_SWEEP):  # never ended
            calls.start(quick, _state(f"lost-{index}"))
        assert len(forgotten) == _FIRST_SWEEP - 1  # the last one started after the sweep
        assert calls.owners("live") == (patient,) and len(calls) == 2
