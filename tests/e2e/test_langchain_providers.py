"""Real langchain-openai and langchain-anthropic clients against the loopback provider.

What usage-callbacks records must equal what the server billed, token for token, and
cost what genai-prices says that usage costs.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from genai_prices import Usage, calc_price
from langchain_anthropic import ChatAnthropic
from langchain_core.callbacks import UsageMetadataCallbackHandler
from langchain_openai import ChatOpenAI, OpenAIEmbeddings

from tests.e2e.provider_server import Bill, ProviderServer
from usage_callbacks import Budget, BudgetExceededError, UsageTracker
from usage_callbacks.langchain import TrackedEmbeddings, UsageCallbackHandler
from usage_callbacks.store.models import UsageRecord

QUESTION = "What is the capital of France? Answer in one sentence, please."
WEB_SEARCH = {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}


def _openai(server: ProviderServer, model: str = "gpt-4o-mini", **kwargs: Any) -> ChatOpenAI:
    return ChatOpenAI(model=model, base_url=f"{server.base_url}/v1", api_key="test", **kwargs)


def _anthropic(server: ProviderServer) -> ChatAnthropic:
    return ChatAnthropic(
        model="claude-sonnet-4-6", base_url=server.base_url, api_key="test", max_tokens=200
    )


def _matches(record: UsageRecord, bill: Bill) -> None:
    assert record.estimated is False
    assert (
        record.prompt_tokens,
        record.completion_tokens,
        record.cache_read_tokens,
        record.cache_write_tokens,
        record.cache_write_1h_tokens,
        record.reasoning_tokens,
        record.web_search_requests,
        record.service_tier,
    ) == (
        bill.prompt,
        bill.completion,
        bill.cached,
        bill.cache_write,
        bill.cache_write_1h,
        bill.reasoning,
        bill.web_searches,
        bill.service_tier,
    )
    provider = "openai" if bill.endpoint.startswith("openai") else "anthropic"
    expected = calc_price(
        Usage(
            input_tokens=bill.prompt,
            output_tokens=bill.completion,
            cache_read_tokens=bill.cached,
            cache_write_tokens=bill.cache_write,
            cache_write_5m_tokens=bill.cache_write - bill.cache_write_1h,
            cache_write_1h_tokens=bill.cache_write_1h,
            output_reasoning_tokens=bill.reasoning,
            web_searches=bill.web_searches,
        ),
        model_ref=bill.model,
        provider_id=provider,
        genai_request_timestamp=record.ended_at,
        price_context={"service_tier": bill.service_tier} if bill.service_tier else None,
    ).total_price
    assert record.cost_estimate_usd == expected and record.cost_known


def test_openai_invoke_and_stream_sync_and_async(
    server: ProviderServer, memory_tracker: UsageTracker
) -> None:
    server.cached, server.reasoning = 16, 7
    model = _openai(server, stream_usage=True)
    config = {"callbacks": [UsageCallbackHandler(memory_tracker, user_id="alice")]}
    model.invoke(QUESTION, config=config)  # type: ignore[arg-type]
    assert "".join(str(c.content) for c in model.stream(QUESTION, config=config))  # type: ignore[arg-type]

    async def run_async() -> None:
        await model.ainvoke(QUESTION, config=config)  # type: ignore[arg-type]
        async for _ in model.astream(QUESTION, config=config):  # type: ignore[arg-type]
            pass

    asyncio.run(run_async())
    records = memory_tracker.records()
    assert len(records) == len(server.billed) == 4
    for record, bill in zip(records, server.billed, strict=True):
        _matches(record, bill)
        assert (record.model, record.provider, record.user_id) == ("gpt-4o-mini", "openai", "alice")


def test_anthropic_invoke_and_stream_with_cache_reads_and_writes(
    server: ProviderServer, memory_tracker: UsageTracker
) -> None:
    server.cached, server.cache_write = 8, 4
    model = _anthropic(server)
    config = {"callbacks": [UsageCallbackHandler(memory_tracker)]}
    model.invoke(QUESTION, config=config)  # type: ignore[arg-type]
    list(model.stream(QUESTION, config=config))  # type: ignore[arg-type]
    asyncio.run(model.ainvoke(QUESTION, config=config))  # type: ignore[arg-type]
    records = memory_tracker.records()
    assert len(records) == len(server.billed) == 3
    for record, bill in zip(records, server.billed, strict=True):
        _matches(record, bill)
        assert record.cache_write_tokens == 4 and record.prompt_tokens > 12


def test_openai_stream_without_usage_is_estimated_and_flagged(
    server: ProviderServer, memory_tracker: UsageTracker
) -> None:
    model = _openai(server)  # base_url set, no stream_usage: the stream carries no usage
    list(model.stream(QUESTION, config={"callbacks": [UsageCallbackHandler(memory_tracker)]}))
    [record] = memory_tracker.records()
    [bill] = server.billed
    assert record.estimated
    assert abs(record.completion_tokens - bill.completion) <= 3  # tiktoken vs the server's count


def test_embeddings_equal_what_the_server_billed(
    server: ProviderServer, memory_tracker: UsageTracker
) -> None:
    inner = OpenAIEmbeddings(
        model="text-embedding-3-small", base_url=f"{server.base_url}/v1", api_key="test"
    )
    tracked = TrackedEmbeddings(inner, memory_tracker)
    tracked.embed_documents(["Paris is in France.", "Berlin is in Germany.", "ok"])
    tracked.embed_query("Where is Paris?")
    records = memory_tracker.records()
    assert [r.embedding_tokens for r in records] == [b.embedding for b in server.billed]
    expected = calc_price(
        Usage(input_tokens=server.billed[0].embedding),
        model_ref="text-embedding-3-small",
        provider_id="openai",
    ).total_price
    assert records[0].cost_estimate_usd == expected


def test_budget_refusals_never_reach_the_server(
    server: ProviderServer,
) -> None:
    with UsageTracker("memory://", budgets=[Budget(limit_usd="0.0001")]) as tracker:
        handler = UsageCallbackHandler(tracker)
        model = _openai(server, max_tokens=50)
        with pytest.raises(BudgetExceededError):
            for _ in range(100):
                model.invoke(QUESTION, config={"callbacks": [handler]})
        reached = server.requests
        assert reached == len(tracker.records()) > 0
        with pytest.raises(BudgetExceededError):
            model.invoke(QUESTION, config={"callbacks": [handler]})
        anthropic = _anthropic(server)
        with pytest.raises(BudgetExceededError):
            anthropic.invoke(QUESTION, config={"callbacks": [handler]})
        embeddings = TrackedEmbeddings(
            OpenAIEmbeddings(
                model="text-embedding-3-small", base_url=f"{server.base_url}/v1", api_key="test"
            ),
            tracker,
        )
        embeddings.embed_query("tiny")  # embeddings are cheap: this one still fits
        assert server.requests == reached + 1
        assert sum(r.cost_estimate_usd for r in tracker.records()) <= tracker.budgets[0].limit_usd  # type: ignore[operator]


def test_same_chat_totals_as_langchain_cores_handler(
    server: ProviderServer, memory_tracker: UsageTracker
) -> None:
    server.cached = 16
    core = UsageMetadataCallbackHandler()
    config = {"callbacks": [UsageCallbackHandler(memory_tracker), core]}
    _openai(server, stream_usage=True).batch([QUESTION, "And of Italy?"], config=config)  # type: ignore[arg-type]
    ours = memory_tracker.summary().usage
    theirs = core.usage_metadata["gpt-4o-mini"]
    assert (ours.prompt_tokens, ours.completion_tokens, ours.cache_read_tokens) == (
        theirs["input_tokens"],
        theirs["output_tokens"],
        theirs["input_token_details"]["cache_read"],
    )


def test_anthropic_cache_writes_split_by_ttl_and_web_searches(
    server: ProviderServer, memory_tracker: UsageTracker
) -> None:
    """langchain-anthropic reports TTL-split writes with cache_creation 0; the 1h part
    costs 2x input, the 5m part 1.25x; web searches are billed per request, streamed too."""
    server.cached, server.cache_write, server.cache_write_1h, server.web_searches = 8, 6, 4, 2
    server.web_search_errors = 1  # a failed search bills nothing
    model = _anthropic(server).bind_tools([WEB_SEARCH])
    config = {"callbacks": [UsageCallbackHandler(memory_tracker)]}
    model.invoke(QUESTION, config=config)  # type: ignore[arg-type]
    list(model.stream(QUESTION, config=config))  # type: ignore[arg-type]

    async def stream_async() -> None:
        async for _ in model.astream(QUESTION, config=config):  # type: ignore[arg-type]
            pass

    asyncio.run(stream_async())
    records = memory_tracker.records()
    assert len(records) == len(server.billed) == 3
    # streamed: the searches are not in the stream's usage_metadata; its results are
    for record, bill in zip(records, server.billed, strict=True):
        _matches(record, bill)


@pytest.mark.parametrize("tier", ["flex", "priority"])
def test_openai_service_tiers_are_read_and_priced(
    tier: str, server: ProviderServer, memory_tracker: UsageTracker
) -> None:
    server.cached, server.reasoning = 16, 7
    model = _openai(server, model="o4-mini", service_tier=tier, stream_usage=True)
    config = {"callbacks": [UsageCallbackHandler(memory_tracker)]}
    model.invoke(QUESTION, config=config)  # type: ignore[arg-type]
    list(model.stream(QUESTION, config=config))  # type: ignore[arg-type]
    records = memory_tracker.records()
    assert len(records) == len(server.billed) == 2
    for record, bill in zip(records, server.billed, strict=True):
        assert bill.service_tier == tier
        _matches(record, bill)


def test_openai_responses_api_invoke_and_stream(
    server: ProviderServer, memory_tracker: UsageTracker
) -> None:
    server.cached, server.reasoning = 16, 7
    model = _openai(server, use_responses_api=True)
    config = {"callbacks": [UsageCallbackHandler(memory_tracker)]}
    model.invoke(QUESTION, config=config)  # type: ignore[arg-type]
    list(model.stream(QUESTION, config=config))  # type: ignore[arg-type]
    records = memory_tracker.records()
    assert len(records) == len(server.billed) == 2
    assert {bill.endpoint for bill in server.billed} == {"openai.responses"}
    for record, bill in zip(records, server.billed, strict=True):
        _matches(record, bill)


def test_openai_tool_calls_bill_schemas_arguments_and_results(
    server: ProviderServer, memory_tracker: UsageTracker
) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def weather(city: str, units: str = "metric") -> str:
        """The weather in a city."""
        return f"Sunny in {city}"

    server.tool_calls.append(("weather", {"city": "Paris", "units": "metric"}))
    model = _openai(server).bind_tools([weather])
    config = {"callbacks": [UsageCallbackHandler(memory_tracker)]}
    messages: list[Any] = [HumanMessage("What is the weather in Paris?")]
    call = model.invoke(messages, config=config)  # type: ignore[arg-type]
    assert call.tool_calls  # type: ignore[attr-defined]
    tool_call = call.tool_calls[0]  # type: ignore[attr-defined]
    messages += [call, ToolMessage(weather.invoke(tool_call["args"]), tool_call_id=tool_call["id"])]
    answer = model.invoke(messages, config=config)  # type: ignore[arg-type]
    assert answer.content
    records = memory_tracker.records()
    assert len(records) == len(server.billed) == 2
    for record, bill in zip(records, server.billed, strict=True):
        _matches(record, bill)
