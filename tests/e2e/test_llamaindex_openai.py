"""Real llama-index-llms-openai and llama-index-embeddings-openai against the loopback
provider: recorded usage equals the bill; LlamaIndex's own counter re-estimates."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from genai_prices import Usage, calc_price
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.core.llms import ChatMessage
from llama_index.core.types import PydanticProgramMode
from llama_index.embeddings.openai import OpenAIEmbedding
from llama_index.llms.openai import OpenAI
from pydantic import BaseModel

from tests.e2e.provider_server import ProviderServer
from usage_callbacks import Budget, BudgetExceededError, UsageTracker
from usage_callbacks.llamaindex import UsageCallbackHandler, instrument

MESSAGES = [ChatMessage(role="user", content="What is the capital of France? One sentence.")]
INCLUDE_USAGE = {"stream_options": {"include_usage": True}}


def _llm(
    server: ProviderServer, manager: CallbackManager | None = None, **kwargs: object
) -> OpenAI:
    return OpenAI(
        model="gpt-4o-mini",
        api_base=f"{server.base_url}/v1",
        api_key="test",
        callback_manager=manager or CallbackManager([]),
        **kwargs,  # type: ignore[arg-type]
    )


def _parts(tracker: UsageTracker) -> list[tuple[int, int, int, int]]:
    return [
        (r.prompt_tokens, r.completion_tokens, r.cache_read_tokens, r.reasoning_tokens)
        for r in tracker.records()
    ]


def _billed(server: ProviderServer) -> list[tuple[int, int, int, int]]:
    return [(b.prompt, b.completion, b.cached, b.reasoning) for b in server.billed]


def test_chat_complete_and_streams_equal_the_bill(
    server: ProviderServer, memory_tracker: UsageTracker
) -> None:
    server.cached, server.reasoning = 16, 3
    manager = CallbackManager([UsageCallbackHandler(memory_tracker)])
    llm = _llm(server, manager, additional_kwargs=INCLUDE_USAGE)
    llm.chat(MESSAGES)
    llm.complete("What is the capital of France?")
    assert "".join(r.delta or "" for r in llm.stream_chat(MESSAGES))

    async def run_async() -> None:
        await llm.achat(MESSAGES)
        async for _ in await llm.astream_chat(MESSAGES):
            pass

    asyncio.run(run_async())
    assert len(server.billed) == 5
    assert _parts(memory_tracker) == _billed(server)
    assert all(
        not r.estimated and r.model.startswith("gpt-4o-mini") for r in memory_tracker.records()
    )


def test_a_stream_without_include_usage_is_estimated(
    server: ProviderServer, memory_tracker: UsageTracker
) -> None:
    llm = _llm(server, CallbackManager([UsageCallbackHandler(memory_tracker)]))
    list(llm.stream_chat(MESSAGES))
    [record] = memory_tracker.records()
    assert record.estimated and record.completion_tokens > 0


def test_embeddings_equal_the_bill(server: ProviderServer, memory_tracker: UsageTracker) -> None:
    embed = OpenAIEmbedding(
        model="text-embedding-3-small",
        api_base=f"{server.base_url}/v1",
        api_key="test",
        callback_manager=CallbackManager([UsageCallbackHandler(memory_tracker)]),
    )
    embed.get_text_embedding_batch(["Paris is in France.", "Berlin is in Germany."])
    embed.get_query_embedding("Where is Paris?")
    assert [r.embedding_tokens for r in memory_tracker.records()] == [
        b.embedding for b in server.billed
    ]


def test_instrumentation_alone_reads_the_same_usage(
    server: ProviderServer, memory_tracker: UsageTracker
) -> None:
    server.cached = 8
    handle = instrument(memory_tracker)
    try:
        _llm(server).chat(MESSAGES)
    finally:
        handle.detach()
    assert _parts(memory_tracker) == _billed(server)


def test_what_token_counting_handler_misses(
    server: ProviderServer, memory_tracker: UsageTracker
) -> None:
    """llama-index-core 0.14's TokenCountingHandler reads OpenAI's prompt and completion
    totals too; it has no cached or reasoning breakdown, so it cannot price a call."""
    server.cached, server.reasoning = 16, 5
    theirs = TokenCountingHandler()
    manager = CallbackManager([UsageCallbackHandler(memory_tracker), theirs])
    llm = _llm(server, manager)
    llm.chat(MESSAGES)
    llm.chat(MESSAGES)
    ours = memory_tracker.summary().usage
    assert ours.prompt_tokens == sum(b.prompt for b in server.billed)
    assert (ours.cache_read_tokens, ours.reasoning_tokens) == (32, 10)
    assert ours.cost_estimate_usd > 0
    assert theirs.prompt_llm_token_count == ours.prompt_tokens
    assert not any(hasattr(event, "cached_tokens") for event in theirs.llm_token_counts)


def test_budget_refusal_never_reaches_the_server(server: ProviderServer) -> None:
    with UsageTracker("memory://", budgets=[Budget(limit_tokens=100)]) as tracker:
        llm = _llm(server, CallbackManager([UsageCallbackHandler(tracker)]), max_tokens=40)
        with pytest.raises(BudgetExceededError):
            for _ in range(10):
                llm.chat(MESSAGES)
        assert server.requests == len(tracker.records()) == 2


@pytest.mark.parametrize("tier", [None, "flex"])
def test_responses_api_llm_equals_the_bill_at_its_tier(
    tier: str | None, server: ProviderServer, memory_tracker: UsageTracker
) -> None:
    """OpenAIResponses returns a Response in raw: read by the type it declares, with
    the service tier it was served at."""
    from llama_index.llms.openai import OpenAIResponses

    server.cached, server.reasoning = 16, 3
    llm = OpenAIResponses(
        model="o4-mini",
        api_base=f"{server.base_url}/v1",
        api_key="test",
        callback_manager=CallbackManager([UsageCallbackHandler(memory_tracker)]),
        **({"additional_kwargs": {"service_tier": tier}} if tier else {}),  # type: ignore[arg-type]
    )
    llm.chat(MESSAGES)
    assert [b.endpoint for b in server.billed] == ["openai.responses"]
    assert _parts(memory_tracker) == _billed(server)
    [record] = memory_tracker.records()
    assert record.service_tier == tier and not record.estimated and record.cost_known
    [bill] = server.billed
    expected = calc_price(
        Usage(
            input_tokens=bill.prompt,
            output_tokens=bill.completion,
            cache_read_tokens=bill.cached,
            output_reasoning_tokens=bill.reasoning,
        ),
        model_ref="o4-mini",
        provider_id="openai",
        genai_request_timestamp=record.ended_at,
        price_context={"service_tier": tier} if tier else None,
    ).total_price
    assert record.cost_estimate_usd == expected


# ---------------------------------------------------------------- event pairing


@pytest.fixture(params=["callback_manager", "instrument"])
def wired(
    request: pytest.FixtureRequest, server: ProviderServer, memory_tracker: UsageTracker
) -> Iterator[OpenAI]:
    """An LLM recorded by a CallbackManager handler, or by instrument() alone."""
    if request.param == "callback_manager":
        yield _llm(server, CallbackManager([UsageCallbackHandler(memory_tracker)]), **STREAM_USAGE)
        return
    handle = instrument(memory_tracker)
    try:
        yield _llm(server, **STREAM_USAGE)
    finally:
        handle.detach()


STREAM_USAGE: dict[str, object] = {"additional_kwargs": INCLUDE_USAGE}


def _ok_parts(tracker: UsageTracker) -> list[tuple[int, int, int, int]]:
    return sorted(
        (r.prompt_tokens, r.completion_tokens, r.cache_read_tokens, r.reasoning_tokens)
        for r in tracker.records()
        if r.status == "ok"
    )


def test_a_refused_call_bills_nothing_and_hides_no_later_call(
    server: ProviderServer, memory_tracker: UsageTracker, wired: OpenAI
) -> None:
    """LlamaIndex emits only a span drop for a failed non-streaming call: every later
    call of that class and model in the thread used to be dropped (instrument())."""
    server.failures = [400]
    with pytest.raises(Exception):  # noqa: B017 - the SDK's BadRequestError
        wired.chat(MESSAGES)
    wired.chat(MESSAGES)
    wired.chat(MESSAGES)
    assert _ok_parts(memory_tracker) == sorted(_billed(server))
    [failed] = [r for r in memory_tracker.records() if r.status == "error"]
    assert failed.total_tokens == 0 and failed.cost_estimate_usd == 0


def test_unread_and_open_streams_hide_no_other_call(
    server: ProviderServer, memory_tracker: UsageTracker, wired: OpenAI
) -> None:
    unread = wired.stream_chat(MESSAGES)  # created, never iterated: nothing is sent
    wired.chat(MESSAGES)
    stream = wired.stream_chat(MESSAGES)
    next(stream)
    wired.chat(MESSAGES)  # a guardrail call while the stream is open
    other = wired.stream_chat(MESSAGES)  # interleaved with the first
    next(other)
    for _ in stream:
        pass
    for _ in other:
        pass
    del unread
    assert len(server.billed) == 4
    assert _ok_parts(memory_tracker) == sorted(_billed(server))
    assert len(memory_tracker.runs) == 0


def test_achat_inside_an_async_stream_is_recorded(
    server: ProviderServer, memory_tracker: UsageTracker, wired: OpenAI
) -> None:
    async def run() -> None:
        async for _ in await wired.astream_chat(MESSAGES):
            await wired.achat(MESSAGES)
            break

    asyncio.run(run())
    assert len(server.billed) == 2
    assert [r.status for r in memory_tracker.records()].count("ok") == 1  # the achat
    assert _ok_parts(memory_tracker) == [_billed(server)[1]]


def test_a_structured_llm_records_its_one_provider_call_once(
    server: ProviderServer, memory_tracker: UsageTracker, wired: OpenAI
) -> None:
    server.reply = '{"city": "Paris"}'
    wired.pydantic_program_mode = PydanticProgramMode.LLM
    reply = wired.as_structured_llm(City).chat(MESSAGES)
    assert reply.raw == City(city="Paris")
    assert len(server.billed) == 1
    assert _ok_parts(memory_tracker) == _billed(server)


class City(BaseModel):
    city: str


def test_concurrent_embedding_batches_are_each_recorded_by_instrument_alone(
    server: ProviderServer, memory_tracker: UsageTracker, caplog: pytest.LogCaptureFixture
) -> None:
    embed = OpenAIEmbedding(
        model="text-embedding-3-small",
        api_base=f"{server.base_url}/v1",
        api_key="test",
        embed_batch_size=1,
    )
    handle = instrument(memory_tracker)
    try:
        texts = ["Paris is in France.", "Berlin is in Germany.", "Rome is in Italy, famously."]
        asyncio.run(embed.aget_text_embedding_batch(texts))
        _llm(server).chat(MESSAGES)
    finally:
        handle.detach()
    embedded = [b.embedding for b in server.billed if b.endpoint == "openai.embeddings"]
    assert len(embedded) == 3
    recorded = [r.embedding_tokens for r in memory_tracker.records() if r.call_type == "embedding"]
    assert sorted(recorded) == sorted(embedded)
    assert "run_id is" not in caplog.text  # ids that fit their column, without a warning
