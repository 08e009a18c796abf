"""Which trackers serve each call a session-injected handler sees, from start to end."""

from __future__ import annotations

import threading

from usage_callbacks.sessions import active_sessions
from usage_callbacks.tracker import UsageTracker


class SessionRoutes:
    """For a handler that sessions inject: which trackers serve each call, start to end.

    The trackers are those of the sessions open where the call starts; its end may come
    from another context (a stream consumed elsewhere), so they are remembered by key.
    """

    def __init__(self) -> None:
        self._routes: dict[str, tuple[UsageTracker, ...]] = {}
        self._lock = threading.Lock()

    def start(self, key: str) -> tuple[UsageTracker, ...]:
        trackers = tuple(
            dict.fromkeys(
                session.tracker
                for session in active_sessions()
                if isinstance(session.tracker, UsageTracker)
            )
        )
        if trackers:
            with self._lock:
                self._routes[key] = trackers
        return trackers

    def get(self, key: str) -> tuple[UsageTracker, ...]:
        with self._lock:
            return self._routes.get(key, ())

    def finish(self, key: str) -> tuple[UsageTracker, ...]:
        with self._lock:
            return self._routes.pop(key, ())
