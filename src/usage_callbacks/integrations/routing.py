"""Which trackers serve a call that a session-injected handler sees.

At the start: the trackers of the sessions open there. Afterwards (a stream may end in
another context than the one it started in): the trackers following the call in flight.
"""

from __future__ import annotations

from usage_callbacks.runs import CALLS
from usage_callbacks.sessions import active_sessions
from usage_callbacks.tracker import UsageTracker


def session_trackers() -> tuple[UsageTracker, ...]:
    """The trackers of the sessions open in this context, each once."""
    return tuple(
        dict.fromkeys(
            session.tracker
            for session in active_sessions()
            if isinstance(session.tracker, UsageTracker)
        )
    )


def call_trackers(key: str) -> tuple[UsageTracker, ...]:
    """The trackers following the call ``key`` (none once it has ended or was refused)."""
    return tuple(owner for owner in CALLS.owners(key) if isinstance(owner, UsageTracker))
