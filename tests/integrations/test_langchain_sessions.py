"""Sessions capture LangChain calls made with no handler, once, in any context."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from langchain_core.callbacks import get_usage_metadata_callback
from langchain_core.tracers import context as tracer_context

from tests.integrations.lc_models import CountingChatModel
from usage_callbacks import Budget, BudgetExceededError, UsageTracker
from usage_callbacks.langchain import UsageCallbackHandler


def test_a_session_captures_calls_with_no_handler(memory_tracker: UsageTracker) -> None:
    model = CountingChatModel()
    with memory_tracker.session("conv-1", user_id="alice") as session:
        model.invoke("hi")
        model.batch(["a", "b"])
        list(model.stream("c"))
    model.invoke("outside")  # after the session: nobody tracks it
    assert session.calls == 4 and session.usage.total_tokens == 4 * 28
    records = memory_tracker.records()
    assert len(records) == 4
    assert {(r.session_id, r.user_id) for r in records} == {("conv-1", "alice")}


async def test_sessions_capture_async_calls_per_task(memory_tracker: UsageTracker) -> None:
    model = CountingChatModel()

    async def conversation(index: int) -> int:
        async with memory_tracker.session(f"c{index}") as session:
            for _ in range(index % 3 + 1):
                await model.ainvoke("hi")
        return session.calls

    assert await asyncio.gather(*(conversation(i) for i in range(30))) == [
        i % 3 + 1 for i in range(30)
    ]


def test_an_explicit_handler_inside_a_session_is_not_double_counted(
    memory_tracker: UsageTracker,
) -> None:
    model = CountingChatModel()
    handler = UsageCallbackHandler(memory_tracker, user_id="bob", tags=["explicit"])
    with memory_tracker.session("s") as session:
        model.invoke("hi", config={"callbacks": [handler]})
        model.invoke("hi")
    assert session.calls == 2
    first, second = memory_tracker.records()
    assert (first.user_id, first.session_id, first.tags) == ("bob", "s", ["explicit"])
    assert (second.user_id, second.session_id) == (None, "s")


def test_one_configure_hook_whatever_the_number_of_sessions(memory_tracker: UsageTracker) -> None:
    with memory_tracker.session():
        pass
    before = len(tracer_context._configure_hooks)
    for _ in range(50):
        with memory_tracker.session():
            CountingChatModel().invoke("hi")
    assert len(tracer_context._configure_hooks) == before
    for _ in range(3):  # langchain-core's own context manager adds one hook per use
        with get_usage_metadata_callback():
            pass
    assert len(tracer_context._configure_hooks) > before


def test_thread_pools_need_bind_to_carry_the_session(memory_tracker: UsageTracker) -> None:
    model = CountingChatModel()
    with memory_tracker.session("pool") as session, ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: model.invoke("lost"), range(4)))
        assert session.calls == 0
        list(pool.map(session.bind(lambda _: model.invoke("kept")), range(4)))
    assert session.calls == 4


def test_langchain_batch_copies_the_context_itself(memory_tracker: UsageTracker) -> None:
    with memory_tracker.session() as session:
        CountingChatModel().batch([str(i) for i in range(8)], config={"max_concurrency": 4})
    assert session.calls == 8


def test_session_budgets_refuse_calls_with_no_handler() -> None:
    with UsageTracker("memory://") as tracker:
        model = CountingChatModel(max_tokens=10)
        with tracker.session("tight", max_tokens=60), pytest.raises(BudgetExceededError):
            for _ in range(5):
                model.invoke("hi")
        assert model.calls == 2  # 2 x 28 spent; a third could need 11 + 10 more


def test_tracker_budgets_apply_to_session_captured_calls() -> None:
    with UsageTracker("memory://", budgets=[Budget(limit_tokens=30)]) as tracker:
        model = CountingChatModel(max_tokens=5)
        with tracker.session(), pytest.raises(BudgetExceededError):
            model.invoke("hi")
            model.invoke("hi")
        assert model.calls == 1


def test_streamed_tokens_count_once_for_every_tracker_of_a_call(
    memory_tracker: UsageTracker,
) -> None:
    """Handlers of two trackers on one call, one of them a session's: each token reaches
    every handler, and a stream that broke off before any chunk came back (no response)
    is estimated from the tokens seen, once per tracker."""
    from uuid import uuid4

    from langchain_core.messages import HumanMessage

    from usage_callbacks.integrations import langchain as lc_adapter
    from usage_callbacks.tokens import count_text_tokens

    other = UsageTracker("memory://")
    explicit = UsageCallbackHandler(other)
    run_id = uuid4()
    tokens = ["one ", "two ", "three ", "four "]
    with memory_tracker.session("s"):
        handlers = [explicit, lc_adapter._session_handler]
        for handler in handlers:
            handler.on_chat_model_start({}, [[HumanMessage("hi")]], run_id=run_id)
        for token in tokens:
            for handler in handlers:
                handler.on_llm_new_token(token, run_id=run_id)
        for handler in handlers:
            handler.on_llm_error(ConnectionError("broke off"), run_id=run_id)
    other.flush()
    memory_tracker.flush()
    [mine], [theirs] = memory_tracker.records(), other.records()
    other.close()
    once = count_text_tokens("".join(tokens), None)
    assert mine.completion_tokens == theirs.completion_tokens == once
