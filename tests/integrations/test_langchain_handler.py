"""The LangChain handler on fake models: every place usage hides, streams, errors, traps."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.callbacks import BaseCallbackHandler, UsageMetadataCallbackHandler
from langchain_core.globals import set_llm_cache
from langchain_core.messages import HumanMessage
from langchain_core.runnables import RunnableLambda

from tests.integrations.lc_models import CountingChatModel
from usage_callbacks import Budget, BudgetExceededError, ModelPrice, TokenUsage, UsageTracker
from usage_callbacks.langchain import UsageCallbackHandler

PRICES = {"gpt-4o-mini": ModelPrice(input_per_mtok=Decimal(1), output_per_mtok=Decimal(1))}


@pytest.fixture
def handler(memory_tracker: UsageTracker) -> UsageCallbackHandler:
    return UsageCallbackHandler(memory_tracker, user_id="alice", tags=["t1"])


def _only(tracker: UsageTracker) -> Any:
    [record] = tracker.records()
    return record


@pytest.mark.parametrize(
    "where", ["usage_metadata", "llm_output", "generation_info", "response_metadata"]
)
def test_provider_usage_is_read_wherever_langchain_puts_it(
    where: str, memory_tracker: UsageTracker, handler: UsageCallbackHandler
) -> None:
    model = CountingChatModel(where=where)
    model.invoke("What is the answer?", config={"callbacks": [handler]})
    record = _only(memory_tracker)
    assert (record.prompt_tokens, record.completion_tokens, record.estimated) == (21, 7, False)
    assert (record.model, record.framework, record.call_type) == (
        "gpt-4o-mini",
        "langchain",
        "chat",
    )
    assert (record.user_id, record.tags, record.status) == ("alice", ["t1"], "ok")
    assert record.cost_known and record.cost_estimate_usd > 0
    assert record.latency_ms is not None and record.latency_ms >= 0


def test_missing_usage_is_estimated_with_tiktoken(
    memory_tracker: UsageTracker, handler: UsageCallbackHandler
) -> None:
    model = CountingChatModel(where="none", reply="one two three four")
    model.invoke("count these words please", config={"callbacks": [handler]})
    record = _only(memory_tracker)
    assert record.estimated
    # cookbook framing: 3 per message + role + content, + 3 reply primer
    assert record.prompt_tokens == 3 + 1 + 4 + 3
    assert record.completion_tokens == 4


def test_n_generations_share_one_request_usage(
    memory_tracker: UsageTracker, handler: UsageCallbackHandler
) -> None:
    CountingChatModel(n=3).invoke("hi", config={"callbacks": [handler]})
    assert _only(memory_tracker).total_tokens == 28  # counted once, not three times


def test_missing_model_name_falls_back_and_keeps_the_tokens(
    memory_tracker: UsageTracker, handler: UsageCallbackHandler
) -> None:
    core = UsageMetadataCallbackHandler()
    model = CountingChatModel(report_model=False, model="gpt-4o")
    model.invoke("hi", config={"callbacks": [handler, core]})
    assert core.usage_metadata == {}  # langchain-core's handler drops the usage
    record = _only(memory_tracker)
    assert (record.model, record.total_tokens) == ("gpt-4o", 28)  # from invocation params


def test_sync_async_batch_and_streams_record_each_call_once(
    memory_tracker: UsageTracker, handler: UsageCallbackHandler
) -> None:
    model = CountingChatModel()
    config = {"callbacks": [handler]}
    model.invoke("a", config=config)  # type: ignore[arg-type]
    model.batch(["b", "c"], config=config)  # type: ignore[arg-type]
    assert "".join(str(c.content) for c in model.stream("d", config=config)) == model.reply  # type: ignore[arg-type]

    async def run_async() -> None:
        await model.ainvoke("e", config=config)  # type: ignore[arg-type]
        await model.abatch(["f", "g"], config=config)  # type: ignore[arg-type]
        async for _ in model.astream("h", config=config):  # type: ignore[arg-type]
            pass

    asyncio.run(run_async())
    records = memory_tracker.records()
    assert len(records) == model.calls == 8
    assert all(
        (r.prompt_tokens, r.completion_tokens, r.estimated) == (21, 7, False) for r in records
    )
    assert len({r.run_id for r in records}) == 8


def test_a_stream_without_usage_is_counted_from_its_tokens(
    memory_tracker: UsageTracker, handler: UsageCallbackHandler
) -> None:
    model = CountingChatModel(where="none", reply="alpha beta gamma delta")
    list(model.stream("hi", config={"callbacks": [handler]}))
    record = _only(memory_tracker)
    assert record.estimated and record.completion_tokens == 4


def test_an_abandoned_stream_records_what_was_streamed(
    memory_tracker: UsageTracker, handler: UsageCallbackHandler
) -> None:
    model = CountingChatModel(where="none", reply="one two three four five six")
    stream = model.stream("hi", config={"callbacks": [handler]})
    next(stream)
    next(stream)
    stream.close()  # the consumer walks away: GeneratorExit inside the model
    record = _only(memory_tracker)
    assert record.status == "error" and record.error_type == "GeneratorExit"
    assert record.estimated and record.completion_tokens == 2  # "one", " two"
    assert record.prompt_tokens > 0


def test_errors_are_recorded_and_release_the_reservation() -> None:
    budget = Budget(limit_tokens=10_000)
    with UsageTracker("memory://", budgets=[budget], prices=PRICES) as tracker:
        model = CountingChatModel(fail_with="provider is down", max_tokens=100)
        with pytest.raises(RuntimeError, match="provider is down"):
            model.invoke("hi", config={"callbacks": [UsageCallbackHandler(tracker)]})
        record = _only(tracker)
        assert (record.status, record.error_type, record.total_tokens) == (
            "error",
            "RuntimeError",
            0,
        )
        [status] = tracker.budget_status()
        assert status.reserved_tokens == 0 and status.spent_tokens == 0


def test_budget_refuses_before_the_provider_is_called() -> None:
    budget = Budget(limit_tokens=100, per="user", period="day")
    with UsageTracker("memory://", budgets=[budget], prices=PRICES) as tracker:
        model = CountingChatModel(max_tokens=20)  # each call reserves ~11 + 20 tokens
        handler = UsageCallbackHandler(tracker, user_id="alice")
        with pytest.raises(BudgetExceededError, match="user alice"):
            for _ in range(10):
                model.invoke("What is the answer?", config={"callbacks": [handler]})
        assert model.calls == 3  # 3 x 28 tokens spent; the fourth call could need 32 more
        assert len(tracker.records()) == 3
        other = UsageCallbackHandler(tracker, user_id="bob")
        model.invoke("hi", config={"callbacks": [other]})  # bob has his own budget
        assert model.calls == 4


async def test_budget_refuses_async_calls_too() -> None:
    with UsageTracker("memory://", budgets=[Budget(limit_tokens=10)], prices=PRICES) as tracker:
        model = CountingChatModel(max_tokens=20)
        with pytest.raises(BudgetExceededError):
            await model.ainvoke("hi", config={"callbacks": [UsageCallbackHandler(tracker)]})
        with pytest.raises(BudgetExceededError):
            async for _ in model.astream(
                "hi", config={"callbacks": [UsageCallbackHandler(tracker)]}
            ):
                pass
        assert model.calls == 0


def test_cache_hits_bill_nothing_unlike_the_frameworks_handlers(
    memory_tracker: UsageTracker, handler: UsageCallbackHandler
) -> None:
    core = UsageMetadataCallbackHandler()
    set_llm_cache(InMemoryCache())
    try:
        model = CountingChatModel(cache=True)
        for _ in range(3):
            model.invoke("same question", config={"callbacks": [handler, core]})
    finally:
        set_llm_cache(None)
    assert model.calls == 1
    first, *hits = memory_tracker.records()
    assert (first.total_tokens, first.cache_hit) == (28, False)
    assert [(r.cache_hit, r.total_tokens, r.cost_estimate_usd) for r in hits] == [(True, 0, 0)] * 2
    assert core.usage_metadata["gpt-4o-mini"]["total_tokens"] == 84  # counted three times


def test_cache_replays_are_reserved_like_calls_and_book_nothing() -> None:
    """LangChain looks its LLM cache up after the start callback: the handler cannot know a
    call will be a replay, so a replay is reserved like a call (and refused, before the
    fake provider, when one call's worst case does not fit), then books 0 tokens and $0."""
    set_llm_cache(InMemoryCache())
    try:
        for limit, replays_allowed in ((200, True), (40, False)):
            budget = Budget(limit_tokens=limit)
            with UsageTracker("memory://", budgets=[budget]) as tracker:
                model = CountingChatModel(max_tokens=20, cache=True, model=f"m-{limit}")
                config: Any = {"callbacks": [UsageCallbackHandler(tracker)]}
                # bills 28 tokens; reserves 20 + the prompt
                model.invoke("same question", config=config)
                for _ in range(3):
                    if replays_allowed:
                        model.invoke("same question", config=config)
                    else:
                        with pytest.raises(BudgetExceededError):
                            model.invoke("same question", config=config)
                assert model.calls == 1
                [status] = tracker.budget_status()
                assert (status.spent_tokens, status.reserved_tokens) == (28, 0)
                replays = [r for r in tracker.records() if r.cache_hit]
                assert [(r.total_tokens, r.cost_estimate_usd) for r in replays] == (
                    [(0, 0)] * 3 if replays_allowed else []
                )
    finally:
        set_llm_cache(None)


def test_nested_chains_keep_parent_run_ids(
    memory_tracker: UsageTracker, handler: UsageCallbackHandler
) -> None:
    model = CountingChatModel()
    chain = RunnableLambda(lambda q: f"Question: {q}") | model | RunnableLambda(lambda m: m.content)
    assert chain.invoke("why?", config={"callbacks": [handler]}) == model.reply
    record = _only(memory_tracker)
    assert record.parent_run_id is not None and record.parent_run_id != record.run_id


def test_an_agent_loop_with_tool_calls_counts_every_model_turn(
    memory_tracker: UsageTracker, handler: UsageCallbackHandler
) -> None:
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    model = CountingChatModel()
    messages: list[Any] = [HumanMessage("what is 2 + 3?")]
    for turn in range(3):  # the model "asks" for the tool twice, then answers
        reply = model.invoke(messages, config={"callbacks": [handler]})
        messages.append(AIMessage(content=reply.content))
        if turn < 2:
            result = add.invoke({"a": 2, "b": 3}, config={"callbacks": [handler]})
            messages.append(ToolMessage(content=str(result), tool_call_id=f"call-{turn}"))
    records = memory_tracker.records()
    assert len(records) == 3 and sum(r.total_tokens for r in records) == 84


def test_end_hooks_never_raise_and_later_handlers_still_see_the_event(
    memory_tracker: UsageTracker,
    handler: UsageCallbackHandler,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[str] = []

    class Later(BaseCallbackHandler):
        def on_llm_end(self, response: Any, **kwargs: Any) -> None:
            seen.append("end")

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(memory_tracker, "record", disk_full)
    with caplog.at_level(logging.WARNING, logger="usage_callbacks"):
        reply = CountingChatModel().invoke("hi", config={"callbacks": [handler, Later()]})
    assert reply.content and seen == ["end"]
    assert "usage tracking failed at the end" in caplog.text


def test_one_handler_shared_by_32_threads_records_every_call_once(
    memory_tracker: UsageTracker, handler: UsageCallbackHandler
) -> None:
    model = CountingChatModel()
    barrier = threading.Barrier(32)

    def work() -> None:
        barrier.wait()
        for _ in range(10):
            model.invoke("hi", config={"callbacks": [handler]})

    threads = [threading.Thread(target=work) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    records = memory_tracker.records()
    assert len(records) == len({r.run_id for r in records}) == 320
    assert sum(r.total_tokens for r in records) == 320 * 28
    assert len(memory_tracker.runs) == 0  # nothing left in flight


async def test_one_handler_shared_by_1000_tasks_records_every_call_once(
    memory_tracker: UsageTracker, handler: UsageCallbackHandler
) -> None:
    model = CountingChatModel()
    await asyncio.gather(
        *(model.ainvoke(f"q{i}", config={"callbacks": [handler]}) for i in range(1000))
    )
    records = memory_tracker.records()
    assert len(records) == len({r.run_id for r in records}) == 1000
    assert sum(r.total_tokens for r in records) == 28_000


def test_same_chat_totals_as_langchain_cores_handler(
    memory_tracker: UsageTracker, handler: UsageCallbackHandler
) -> None:
    core = UsageMetadataCallbackHandler()
    models = [
        CountingChatModel(prompt_tokens=p, completion_tokens=c) for p, c in [(5, 1), (90, 33)]
    ]
    for model in models:
        model.batch(["a", "b", "c"], config={"callbacks": [handler, core]})
    ours = sum((r.usage for r in memory_tracker.records()), TokenUsage())
    theirs = core.usage_metadata["gpt-4o-mini"]
    assert (ours.prompt_tokens, ours.completion_tokens, ours.total_tokens) == (
        theirs["input_tokens"],
        theirs["output_tokens"],
        theirs["total_tokens"],
    )


def test_bad_usage_payloads_never_break_the_call(
    memory_tracker: UsageTracker, handler: UsageCallbackHandler
) -> None:
    class Garbage(CountingChatModel):
        def _generate(self, *args: Any, **kwargs: Any) -> Any:
            result = super()._generate(*args, **kwargs)
            result.llm_output = {"token_usage": {"prompt_tokens": "lots", "completion_tokens": -4}}
            result.generations[0].generation_info = {"eval_count": 10**30}
            return result

    reply = Garbage(where="llm_output").invoke("hi", config={"callbacks": [handler]})
    assert reply.content
    record = _only(memory_tracker)
    # nothing usable reported: an estimate, flagged, rather than an exact-looking zero
    assert record.estimated and record.total_tokens > 0 and record.status == "ok"


def test_a_reported_zero_prompt_is_estimated_and_flagged_once_per_model(
    memory_tracker: UsageTracker, handler: UsageCallbackHandler, caplog: pytest.LogCaptureFixture
) -> None:
    """Some Anthropic-compatible proxies report a stream's input only in message_start:
    input 0 for a non-empty prompt must not be stored as an exact zero."""
    model = CountingChatModel(prompt_tokens=0, completion_tokens=7, model="proxy-model-0in")
    with caplog.at_level(logging.WARNING, logger="usage_callbacks"):
        model.invoke("What is the answer to everything?", config={"callbacks": [handler]})
        model.invoke("And the question?", config={"callbacks": [handler]})
    records = memory_tracker.records()
    assert [r.completion_tokens for r in records] == [7, 7]
    assert all(r.estimated and r.prompt_tokens > 5 for r in records)
    assert sum("reported 0 input tokens" in m for m in caplog.messages) == 1


def test_calls_whose_end_never_comes_are_forgotten_after_the_ttl(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A start event without its end used to stay for good (7 MB per 10,000 calls, and a
    budget's hold with it until the TTL)."""
    tracker = UsageTracker(
        "memory://",
        budgets=[Budget(limit_tokens=10**9)],
        reservation_ttl=timedelta(milliseconds=20),
    )
    handler = UsageCallbackHandler(tracker)
    with tracker:
        for index in range(3000):
            if index % 500 == 0:
                time.sleep(0.05)  # older than the TTL: those before are abandoned
            handler.on_chat_model_start({}, [[HumanMessage("hi")]], run_id=uuid.uuid4())
        assert len(tracker.runs) < 2000
        assert "calls started over 0:00:00.020000 ago and never ended" in caplog.text
