"""Which trackers hold a reservation for each call that has started and not ended.

A framework calls a call's handlers one after another (LangChain's callback manager,
LlamaIndex's CallbackManager): when one refuses, the call is never made and no end
event comes, so the reservations the handlers before it took (another tracker's handler,
or another tracker of the same session) are released by the refusal, here. An entry
lives from its reservation to the call's end, error or refusal. Each adapter keeps one.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from usage_callbacks.tracker import UsageTracker


#: How often ``add`` looks for entries whose calls no tracker follows any more.
_PRUNE_EVERY = 1024


class HeldCalls:
    """call id -> the trackers holding a reservation for it."""

    def __init__(self) -> None:
        self._by_call: dict[str, list[UsageTracker]] = {}
        self._lock = threading.Lock()
        self._adds = 0

    def add(self, call_id: str, tracker: UsageTracker) -> None:
        with self._lock:
            self._by_call.setdefault(call_id, []).append(tracker)
            self._adds += 1
            if self._adds % _PRUNE_EVERY == 0:
                self._prune()

    def _prune(self) -> None:
        """Drop calls no tracker follows any more (ended without an end event, forgotten
        by their tracker after its TTL), so the table stays bounded by the calls in flight."""
        for call_id in [
            call_id
            for call_id, trackers in self._by_call.items()
            if all(tracker.runs.get(call_id) is None for tracker in trackers)
        ]:
            del self._by_call[call_id]

    def discard(self, call_id: str) -> None:
        """The call ended: its trackers settle their own reservations."""
        if self._by_call:  # no lock when nothing is held: the usual, budget-less case
            with self._lock:
                self._by_call.pop(call_id, None)

    def refuse(self, call_id: str, trackers: tuple[UsageTracker, ...] = ()) -> None:
        """The call will not be made: forget it in every tracker that saw its start (those
        holding for it and ``trackers``) and release what they held."""
        with self._lock:
            holding = self._by_call.pop(call_id, [])
        for tracker in dict.fromkeys([*holding, *trackers]):
            state = tracker.runs.finish(call_id)
            if state is not None:
                tracker.release(state.reservation)

    def __len__(self) -> int:
        return len(self._by_call)
