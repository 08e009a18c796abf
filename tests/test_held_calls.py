"""HeldCalls: holds released across handlers; the table stays bounded by calls in flight."""

from __future__ import annotations

from usage_callbacks import UsageTracker
from usage_callbacks.integrations.held_calls import _PRUNE_EVERY, HeldCalls
from usage_callbacks.runs import RunState
from usage_callbacks.store.models import utcnow


def test_calls_no_tracker_follows_any_more_are_pruned() -> None:
    """A call whose end never came, forgotten by its tracker after the TTL, must not stay."""
    held = HeldCalls()
    with UsageTracker("memory://") as tracker:
        tracker.runs.start(RunState(run_id="live", started_at=utcnow()))
        held.add("live", tracker)
        for index in range(_PRUNE_EVERY - 1):  # never ended, no longer followed
            held.add(f"lost-{index}", tracker)
        assert len(held) == 1  # only the call still in flight
        held.discard("live")
        assert len(held) == 0
