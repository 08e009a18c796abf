"""Usage sessions: running totals for every call made inside a ``with`` block.

The active sessions live in a contextvar, so they follow asyncio tasks and
``contextvars.copy_context()``; a plain thread pool does not copy context, which is what
``UsageSession.bind`` is for. The contextvar holds weak references: a session entered
and never exited ends when it is garbage-collected (20,000 such sessions used to stay
open in the context, every call adding to each of them). Framework integrations
register a hook that is entered with the first session, so calls made with no handler
passed are still tracked.
"""

from __future__ import annotations

import contextvars
import functools
import importlib.metadata
import threading
import uuid
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, ParamSpec, Protocol, TypeVar

from usage_callbacks.attribution import Dimensions
from usage_callbacks.usage import TokenUsage, logger

if TYPE_CHECKING:
    from usage_callbacks.store.models import UsageRecord

P = ParamSpec("P")
R = TypeVar("R")

_SessionRefs = tuple["weakref.ref[UsageSession]", ...]
_active: contextvars.ContextVar[_SessionRefs] = contextvars.ContextVar(
    "usage_callbacks_sessions", default=()
)

#: Integrations that capture calls made with no handler declare an entry point in this
#: group (the module, which calls ``register_session_hook`` when imported); each is
#: imported once, lazily, with the first session, so this module names no framework.
INTEGRATIONS_GROUP = "usage_callbacks.integrations"
_integrations_loaded = False
_integrations_lock = threading.Lock()

SessionHook = Callable[[], AbstractContextManager[object]]
_hooks: list[SessionHook] = []


def register_session_hook(hook: SessionHook) -> None:
    """Called by an integration at import: ``hook()`` is entered with every session."""
    if hook not in _hooks:
        _hooks.append(hook)


def _load_integrations() -> None:
    global _integrations_loaded
    if _integrations_loaded:
        return
    with _integrations_lock:
        if _integrations_loaded:
            return
        for entry in importlib.metadata.entry_points(group=INTEGRATIONS_GROUP):
            try:
                entry.load()
            except ModuleNotFoundError as error:  # its framework is not installed: no calls
                logger.debug("%s not loaded: %s", entry.value, error)
            except Exception:  # a broken framework install must not break sessions
                logger.warning(
                    "could not load %s; its calls are not captured by sessions",
                    entry.value,
                    exc_info=True,
                )
        _integrations_loaded = True


class SessionOwner(Protocol):
    """What a session needs of its tracker (the tracker imports sessions, not the reverse)."""

    def forget_session(self, session: UsageSession) -> None:
        """The session has closed: its budgets end with it."""
        ...


def active_sessions() -> tuple[UsageSession, ...]:
    """The sessions open in this context, outermost first."""
    return tuple(session for ref in _active.get() if (session := ref()) is not None)


def sessions_of(tracker: object) -> tuple[UsageSession, ...]:
    """The sessions of ``tracker`` open in this context (no scan when none is open)."""
    refs = _active.get()
    if not refs:
        return ()
    return tuple(
        session for ref in refs if (session := ref()) is not None and session.tracker is tracker
    )


class UsageSession:
    """Totals of the calls made while it is open; nested sessions all accumulate."""

    def __init__(
        self,
        tracker: SessionOwner,
        name: str | None = None,
        *,
        user_id: str | None = None,
        tags: list[str] | None = None,
        dimensions: Dimensions = (),
    ) -> None:
        self.tracker = tracker
        self.session_id = name or uuid.uuid4().hex
        self.user_id = user_id
        self.tags = list(tags or [])
        #: given to every call made inside (declared keys, checked by the tracker)
        self.dimensions = dimensions
        self._lock = threading.Lock()
        self._usage = TokenUsage()
        self._by_model: dict[str, TokenUsage] = {}
        self._by_node: dict[str, TokenUsage] = {}
        self._by_agent: dict[str, TokenUsage] = {}
        self._calls = 0
        self._tokens: list[contextvars.Token[_SessionRefs]] = []
        self._hook_exits: list[list[AbstractContextManager[object]]] = []

    @property
    def name(self) -> str:
        return self.session_id

    @property
    def usage(self) -> TokenUsage:
        with self._lock:
            return self._usage

    @property
    def by_model(self) -> dict[str, TokenUsage]:
        with self._lock:
            return dict(self._by_model)

    @property
    def by_node(self) -> dict[str, TokenUsage]:
        """Usage per graph node or workflow step (calls outside one are left out)."""
        with self._lock:
            return dict(self._by_node)

    @property
    def by_agent(self) -> dict[str, TokenUsage]:
        """Usage per named agent (calls outside one are left out)."""
        with self._lock:
            return dict(self._by_agent)

    @property
    def calls(self) -> int:
        with self._lock:
            return self._calls

    @property
    def cost_usd(self) -> Decimal:
        return self.usage.cost_estimate_usd

    def add(self, record: UsageRecord) -> None:
        """Count a record made inside this session (called by the tracker)."""
        usage = record.usage
        model = record.model or "unknown"
        with self._lock:
            self._usage = self._usage + usage
            self._by_model[model] = self._by_model.get(model, TokenUsage()) + usage
            if record.node:
                self._by_node[record.node] = self._by_node.get(record.node, TokenUsage()) + usage
            if record.agent:
                self._by_agent[record.agent] = (
                    self._by_agent.get(record.agent, TokenUsage()) + usage
                )
            self._calls += 1

    # ------------------------------------------------------------------ context

    def __enter__(self) -> UsageSession:
        _load_integrations()
        live = tuple(ref for ref in _active.get() if ref() is not None)  # drop abandoned ones
        self._tokens.append(_active.set((*live, weakref.ref(self))))
        entered = []
        for hook in _hooks:
            manager = hook()
            manager.__enter__()
            entered.append(manager)
        self._hook_exits.append(entered)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for manager in reversed(self._hook_exits.pop()):
            manager.__exit__(None, None, None)
        _active.reset(self._tokens.pop())
        self.tracker.forget_session(self)

    async def __aenter__(self) -> UsageSession:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, traceback)

    def bind(self, function: Callable[P, R]) -> Callable[P, R]:
        """``pool.submit(session.bind(work), ...)``: run ``work`` with this session active.

        Thread pools do not inherit context variables, so without this a worker's calls
        escape the session. The current context (with any outer sessions) is carried too.
        """
        context = contextvars.copy_context()
        inside = any(ref() is self for ref in context.get(_active, ()))

        @functools.wraps(function)
        def bound(*args: P.args, **kwargs: P.kwargs) -> R:
            def run() -> R:
                if inside:
                    return function(*args, **kwargs)
                with self:
                    return function(*args, **kwargs)

            return context.copy().run(run)

        return bound

    def __repr__(self) -> str:
        usage = self.usage
        return (
            f"UsageSession({self.session_id!r}, calls={self.calls}, "
            f"total_tokens={usage.total}, cost_usd={usage.cost_estimate_usd})"
        )
