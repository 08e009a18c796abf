"""No state without an end: after every path a call can take, nothing is left behind.

Paths: ok, error, refusal, a stream abandoned half-read, a stream never read, two
handlers on one call, a session re-entered; for LlamaIndex also both event systems on
one call, embeddings batched at once, and streams no tracker follows. Places: the
tracker's calls in flight and budget holds, every table a handler keeps, session routes,
open sessions, and every module-level container of the LlamaIndex adapter (nothing
global may grow per call).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref
from collections.abc import Callable, Iterator, Sized
from types import ModuleType
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from llama_index.core.base.llms.types import (
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.callbacks import CallbackManager
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.instrumentation import get_dispatcher  # type: ignore[attr-defined]
from llama_index.core.llms import ChatMessage, CustomLLM, MockLLM
from llama_index.core.llms.callbacks import llm_completion_callback

from tests.integrations.lc_models import CountingChatModel
from usage_callbacks import Budget, BudgetExceededError, UsageTracker, active_sessions, runs
from usage_callbacks.collected import wait_for_collected
from usage_callbacks.integrations import langchain as lc
from usage_callbacks.integrations import llamaindex as li
from usage_callbacks.integrations import llamaindex_reach, llamaindex_spans, routing
from usage_callbacks.integrations.llamaindex_spans import span_tree
from usage_callbacks.runs import CALLS

#: Modules whose globals must not grow per call.
MODULES: tuple[ModuleType, ...] = (li, llamaindex_spans, llamaindex_reach, routing, runs)


def _left_over(tracker: UsageTracker, *handlers: object) -> dict[str, int]:
    """Everything kept per call, per open session or per budget hold, by place."""
    gc.collect()  # streams dropped unread end when collected
    assert wait_for_collected(10)  # on a thread of their own
    places = {
        "tracker.runs": len(tracker.runs),
        "calls in flight (any tracker)": len(CALLS),
        "budget holds": sum(len(lease.inflight) for lease in tracker._allowances._leases.values()),
        "session budgets": len(tracker._session_budgets),
        "open sessions": len(active_sessions()),
        "calls in flight by span": len(CALLS.spans()),  # type: ignore[arg-type]
        "llamaindex spans": len(span_tree().open_spans),
        **_module_containers(),
    }
    for index, handler in enumerate(
        (*handlers, li._session_callback_handler, li._session_event_handler)
    ):
        places.update(_containers_of(f"handler {index}", handler))
    return {place: count for place, count in places.items() if count}


def _is_container(value: object) -> bool:
    """Anything sized that can grow; weak containers keep nothing alive (what they hold
    ends with its referent: a manager reached, a handler listening)."""
    immutable = (str, bytes, tuple, frozenset, type)
    weak = (weakref.WeakSet, weakref.WeakKeyDictionary, weakref.WeakValueDictionary)
    return isinstance(value, Sized) and not isinstance(value, (*immutable, *weak))


def _containers_of(place: str, holder: object) -> dict[str, int]:
    """The size of each container an object keeps (its attributes, pydantic's included)."""
    attributes = {**vars(holder), **(getattr(holder, "__pydantic_private__", None) or {})}
    return {
        f"{place}.{name}": len(value) for name, value in attributes.items() if _is_container(value)
    }


def _module_containers() -> dict[str, int]:
    """The size of every container a LlamaIndex module (or the calls in flight) keeps at
    module level, and of those its module-level objects keep: a bounded map of recent
    calls is global per-call state too."""
    places: dict[str, int] = {}
    for module in MODULES:
        for name, value in vars(module).items():
            place = f"{module.__name__}.{name}"
            if name.startswith("__") or isinstance(value, (type, ModuleType, logging.Logger)):
                continue
            if _is_container(value):
                places[place] = len(value)
            elif hasattr(value, "__dict__") and not callable(value):
                places.update(_containers_of(place, value))
    return places


@pytest.fixture
def tracker() -> Iterator[UsageTracker]:
    li._ensure_session_wiring()  # once per process: handlers, not per-call state
    with UsageTracker("memory://", budgets=[Budget(limit_tokens=10**9)]) as tracker:
        yield tracker


# ---------------------------------------------------------------- LangChain


def _lc_paths(tracker: UsageTracker) -> dict[str, Callable[[], object]]:
    handler = lc.UsageCallbackHandler(tracker)
    config = {"callbacks": [handler]}
    model = CountingChatModel()

    def error() -> None:
        with pytest.raises(RuntimeError):
            CountingChatModel(fail_with="boom").invoke("hi", config=config)  # type: ignore[arg-type]

    def refusal() -> None:
        with UsageTracker("memory://", budgets=[Budget(limit_tokens=1)]) as strict:
            before = _left_over(strict)
            with pytest.raises(BudgetExceededError):
                model.invoke("hi", config={"callbacks": [lc.UsageCallbackHandler(strict)]})
            assert _left_over(strict) == before

    def abandoned_stream() -> None:
        stream = model.stream("hi", config=config)  # type: ignore[arg-type]
        next(stream)
        stream.close()

    def unread_stream() -> None:
        model.stream("hi", config=config)  # type: ignore[arg-type]

    def two_handlers() -> None:
        with tracker.session("s"):
            model.invoke([HumanMessage("hi")], config=config)  # type: ignore[arg-type]

    def session_reentered() -> None:
        session = tracker.session("again", max_tokens=10**6)
        with session, session:
            model.invoke("hi")

        async def in_task() -> None:
            with session:
                await model.ainvoke("hi")

        asyncio.run(in_task())

    return {
        "ok": lambda: model.invoke("hi", config=config),  # type: ignore[arg-type]
        "error": error,
        "refusal": refusal,
        "abandoned stream": abandoned_stream,
        "unread stream": unread_stream,
        "two handlers": two_handlers,
        "session re-entered": session_reentered,
    }


@pytest.mark.parametrize(
    "path",
    [
        "ok",
        "error",
        "refusal",
        "abandoned stream",
        "unread stream",
        "two handlers",
        "session re-entered",
    ],
)
def test_langchain_leaves_nothing_behind(tracker: UsageTracker, path: str) -> None:
    before = _left_over(tracker)  # the session handlers are shared with earlier tests
    _lc_paths(tracker)[path]()
    assert _left_over(tracker) == before


# ---------------------------------------------------------------- LlamaIndex


def _li_paths(
    tracker: UsageTracker, handler: li.UsageCallbackHandler
) -> dict[str, Callable[[], object]]:
    llm = MockLLM(max_tokens=8, callback_manager=CallbackManager([handler]))
    messages = [ChatMessage(role="user", content="hi")]

    def error() -> None:
        failing = _FailingLLM(callback_manager=CallbackManager([handler]))
        with pytest.raises(RuntimeError):
            failing.chat(messages)  # chat -> complete, which fails
        with pytest.raises(RuntimeError):
            failing.complete("hi")

    def refusal() -> None:
        with UsageTracker("memory://", budgets=[Budget(limit_tokens=1)]) as strict:
            strict_handler = li.UsageCallbackHandler(strict)
            strict_llm = MockLLM(max_tokens=8, callback_manager=CallbackManager([strict_handler]))
            before = _left_over(strict, strict_handler)
            with pytest.raises(BudgetExceededError):
                strict_llm.complete("hi")
            assert _left_over(strict, strict_handler) == before

    def abandoned_stream() -> None:
        stream = llm.stream_chat(messages)
        next(stream)
        stream.close()

    def unread_stream() -> None:
        llm.stream_chat(messages)

    def read_stream() -> None:
        list(llm.stream_chat(messages))  # chat -> stream_complete: a stream inside a stream

    def two_handlers() -> None:
        with tracker.session("s"):
            llm.chat(messages)

    def session_reentered() -> None:
        session = tracker.session("again", max_tokens=10**6)
        with session, session:
            llm.complete("hi")

    embed = MockEmbedding(embed_dim=4, embed_batch_size=1, callback_manager=llm.callback_manager)

    def embeddings() -> None:  # several calls in one span, open at once when async
        embed.get_text_embedding_batch(["one", "two"])
        asyncio.run(embed.aget_text_embedding_batch(["one", "two", "three"]))

    def failed_embeddings() -> None:  # async: no CallbackManager end, only the span's drop
        failing = _FailingEmbedding(
            embed_dim=4, embed_batch_size=1, callback_manager=llm.callback_manager
        )
        with pytest.raises(RuntimeError):
            asyncio.run(failing.aget_text_embedding_batch(["one", "two"]))

    def untracked_stream() -> None:  # no handler follows it (the session's: none open)
        bare = MockLLM(max_tokens=8)
        list(bare.stream_chat(messages))
        bare.stream_chat(messages)
        next(bare.stream_complete("hi"))

    return {
        "ok": lambda: llm.chat(messages),
        "error": error,
        "refusal": refusal,
        "abandoned stream": abandoned_stream,
        "unread stream": unread_stream,
        "read stream": read_stream,
        "two handlers": two_handlers,
        "session re-entered": session_reentered,
        "embeddings": embeddings,
        "failed embeddings": failed_embeddings,
        "untracked stream": untracked_stream,
    }


class _FailingEmbedding(MockEmbedding):
    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        raise RuntimeError("provider down")


class _FailingLLM(CustomLLM):
    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name="failing")

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        raise RuntimeError("provider refused")

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        raise RuntimeError("provider refused")


@pytest.mark.parametrize(
    "path",
    [
        "ok",
        "error",
        "refusal",
        "abandoned stream",
        "unread stream",
        "read stream",
        "two handlers",
        "session re-entered",
        "embeddings",
        "failed embeddings",
        "untracked stream",
    ],
)
@pytest.mark.parametrize("wiring", ["callback_manager", "instrument", "both handlers"])
def test_llamaindex_leaves_nothing_behind(tracker: UsageTracker, path: str, wiring: str) -> None:
    """``instrument``: our event handler on the dispatcher, and its enforcing handler put
    on each LLM's manager beside ours; ``both handlers``: a CallbackManager handler and an
    event handler made by hand, both of this tracker, on every call."""
    handler = li.UsageCallbackHandler(tracker)
    handle = li.instrument(tracker) if wiring == "instrument" else None
    listener = li.UsageEventHandler(tracker=tracker) if wiring == "both handlers" else None
    if listener is not None:
        get_dispatcher().add_event_handler(listener)
    try:
        handlers = [handler, *(h for h in (handle and handle.handler, listener) if h)]
        before = _left_over(tracker, *handlers)  # shared session handlers: earlier tests
        _li_paths(tracker, handler)[path]()
        assert _left_over(tracker, *handlers) == before
    finally:
        if handle is not None:
            handle.detach()
        root = get_dispatcher()
        root.event_handlers = [h for h in root.event_handlers if h is not listener]


def test_llamaindex_keeps_nothing_per_call_at_module_level(tracker: UsageTracker) -> None:
    """No module-level map of the LlamaIndex adapter grows per call, bounded or not: many
    calls of every kind leave every one as it was (a bounded map of recent spans or
    streams filled up with them, and then pushed out calls still in flight)."""
    handler = li.UsageCallbackHandler(tracker)
    handle = li.instrument(tracker)
    try:
        before = _module_containers()
        paths = _li_paths(tracker, handler)
        for _ in range(3):
            for name in ("ok", "read stream", "embeddings", "untracked stream", "two handlers"):
                paths[name]()
        gc.collect()
        assert wait_for_collected(10)
        assert _module_containers() == before
    finally:
        handle.detach()
