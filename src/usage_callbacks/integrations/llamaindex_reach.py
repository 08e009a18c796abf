"""LlamaIndex budgets wherever a call is visible.

Only a CallbackManager handler can refuse a LlamaIndex call (the instrumentation
dispatcher swallows handler exceptions). But a component keeps the manager it was built
with: one given its own ``callback_manager``, or built before ``Settings.callback_manager``
was set, never meets a handler added to Settings later. A span handler on the root
dispatcher sees every LLM and embedding call enter its span, before the call's
CallbackManager event; there it puts the enforcing handlers onto that component's own
manager. So ``instrument(tracker)`` and ``with tracker.session(...)`` refuse over-budget
calls of every component, whenever and however it was built.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from typing import Any

from llama_index.core import Settings
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.llms.base import BaseLLM
from llama_index.core.callbacks import CallbackManager
from llama_index.core.callbacks.base_handler import BaseCallbackHandler
from llama_index.core.instrumentation import get_dispatcher  # type: ignore[attr-defined]
from llama_index.core.instrumentation.span import BaseSpan
from llama_index.core.instrumentation.span_handlers import BaseSpanHandler


class BudgetReach(BaseSpanHandler[BaseSpan]):
    """Adds the enforcing handlers to each LLM's and embedding model's own manager as its
    call starts; keeps no span (nothing per call), and the managers it reached weakly."""

    @classmethod
    def class_name(cls) -> str:
        return "UsageCallbacksBudgetReach"

    def model_post_init(self, context: Any) -> None:
        self._enforcers: list[BaseCallbackHandler] = []
        self._reached: weakref.WeakSet[CallbackManager] = weakref.WeakSet()
        self._guard = threading.Lock()

    def add(self, handler: BaseCallbackHandler) -> None:
        with self._guard:
            if handler not in self._enforcers:
                self._enforcers.append(handler)

    def remove(self, handler: BaseCallbackHandler) -> None:
        """Stop reaching with ``handler``, and take it off every manager it was put on."""
        with self._guard:
            self._enforcers = [h for h in self._enforcers if h is not handler]
            managers = list(self._reached)
        for manager in managers:
            if handler in manager.handlers:
                manager.remove_handler(handler)

    def new_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        parent_span_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> BaseSpan | None:
        if self._enforcers and isinstance(instance, (BaseLLM, BaseEmbedding)):
            manager = getattr(instance, "callback_manager", None)
            if isinstance(manager, CallbackManager):
                missing = [
                    h for h in self._enforcers if h not in manager.handlers and not _closed(h)
                ]
                for handler in missing:
                    manager.add_handler(handler)
                if missing:
                    with self._guard:
                        self._reached.add(_owner(manager))
        return None  # nothing to keep: the span is not tracked

    def prepare_to_exit_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        result: Any | None = None,
        **kwargs: Any,
    ) -> BaseSpan | None:
        return None

    def prepare_to_drop_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        err: BaseException | None = None,
        **kwargs: Any,
    ) -> BaseSpan | None:
        return None


def _owner(manager: CallbackManager) -> CallbackManager:
    """The manager whose handler list ``manager`` uses: a ``CallbackManager()`` made with
    no handlers once Settings has one shares Settings' list, and is often dropped long
    before ``remove`` (the handler then stayed in Settings' list for good)."""
    settings = Settings._callback_manager
    return settings if settings is not None and manager.handlers is settings.handlers else manager


def _closed(handler: BaseCallbackHandler) -> bool:
    """An enforcer of a closed tracker (instrumented, never detached) reaches nothing new."""
    return bool(getattr(getattr(handler, "tracker", None), "closed", False))


_reach: BudgetReach | None = None
_reach_lock = threading.Lock()


def budget_reach() -> BudgetReach:
    """The one BudgetReach, on the root dispatcher from its first use."""
    global _reach
    with _reach_lock:
        if _reach is None:
            _reach = BudgetReach()
            get_dispatcher().add_span_handler(_reach)
        return _reach
