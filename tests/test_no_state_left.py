"""No state without an end: after every path a call can take, nothing is left behind.

Paths: ok, error, refusal, a stream abandoned half-read, a stream never read, two
handlers on one call, a session re-entered. Places: the tracker's calls in flight and
budget holds, each adapter's per-call tables, session routes, open sessions.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from llama_index.core.base.llms.types import (
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.callbacks import CallbackManager
from llama_index.core.llms import ChatMessage, CustomLLM, MockLLM
from llama_index.core.llms.callbacks import llm_completion_callback

from tests.integrations.lc_models import CountingChatModel
from usage_callbacks import Budget, BudgetExceededError, UsageTracker, active_sessions
from usage_callbacks.collected import wait_for_collected
from usage_callbacks.integrations import langchain as lc
from usage_callbacks.integrations import llamaindex as li
from usage_callbacks.integrations.llamaindex_spans import span_tree
from usage_callbacks.runs import CALLS


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
        "llamaindex spans": len(span_tree().open_spans),
        "llamaindex streams": len(li._streamed),
    }
    for index, handler in enumerate(
        (*handlers, li._session_callback_handler, li._session_event_handler)
    ):
        for name in ("_opened", "_span_calls", "_nested", "_calls"):
            table = getattr(handler, name, None)
            if table is not None:
                places[f"handler {index} {name}"] = len(table)
    return {place: count for place, count in places.items() if count}


@pytest.fixture
def tracker() -> Iterator[UsageTracker]:
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

    return {
        "ok": lambda: llm.chat(messages),
        "error": error,
        "refusal": refusal,
        "abandoned stream": abandoned_stream,
        "unread stream": unread_stream,
        "read stream": read_stream,
        "two handlers": two_handlers,
        "session re-entered": session_reentered,
    }


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
    ],
)
@pytest.mark.parametrize("wiring", ["callback_manager", "instrument"])
def test_llamaindex_leaves_nothing_behind(tracker: UsageTracker, path: str, wiring: str) -> None:
    handler = li.UsageCallbackHandler(tracker)
    handle = li.instrument(tracker) if wiring == "instrument" else None
    try:
        handlers = (handler, handle.handler) if handle else (handler,)
        before = _left_over(tracker, *handlers)  # shared session handlers: earlier tests
        _li_paths(tracker, handler)[path]()
        assert _left_over(tracker, *handlers) == before
    finally:
        if handle is not None:
            handle.detach()
