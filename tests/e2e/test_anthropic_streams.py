"""Anthropic streams off the happy path, with the real llama-index-llms-anthropic and
langchain-anthropic clients against the loopback provider: a stream that fails after
``message_start`` (Anthropic's ``error`` event mid-stream) was billed its input and the
words sent; what is recorded keeps that, flagged estimated where it was estimated.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from typing import Any

import pytest
from anthropic import APIStatusError
from langchain_anthropic import ChatAnthropic
from llama_index.core.callbacks import CallbackManager
from llama_index.core.llms import ChatMessage
from llama_index.llms.anthropic import Anthropic

from tests.e2e.provider_server import ProviderServer
from usage_callbacks import UsageTracker
from usage_callbacks.langchain import UsageCallbackHandler as LangChainHandler
from usage_callbacks.llamaindex import UsageCallbackHandler, instrument
from usage_callbacks.store.models import UsageRecord

QUESTION = "What is the capital of France? Answer in one sentence, please."
MESSAGES = [ChatMessage(role="user", content=QUESTION)]
#: llama-index-llms-anthropic sends no temperature for this model (the SDK has none)
LLAMAINDEX_MODEL = "claude-opus-4-7"


@pytest.fixture(params=["callback manager", "instrument"])
def llamaindex_llm(
    request: pytest.FixtureRequest, server: ProviderServer, memory_tracker: UsageTracker
) -> Iterator[Anthropic]:
    """The real LlamaIndex Anthropic class, wired either way usage-callbacks offers."""
    kwargs: dict[str, Any] = dict(
        model=LLAMAINDEX_MODEL, base_url=server.base_url, api_key="test", max_tokens=200
    )
    if request.param == "callback manager":
        yield Anthropic(
            **kwargs, callback_manager=CallbackManager([UsageCallbackHandler(memory_tracker)])
        )
        return
    handle = instrument(memory_tracker)
    yield Anthropic(**kwargs)
    handle.detach()


def _read(llm: Anthropic, streaming: str) -> None:
    if streaming == "sync":
        for _ in llm.stream_chat(MESSAGES):
            pass
        return

    async def read() -> None:
        async for _ in await llm.astream_chat(MESSAGES):
            pass

    asyncio.run(read())


def _one_failed(tracker: UsageTracker) -> UsageRecord:
    [record] = tracker.records()
    assert (record.status, record.error_type) == ("error", "APIStatusError")
    return record


@pytest.mark.parametrize("streaming", ["sync", "async"])
def test_llamaindex_stream_reads_exactly_with_cache_and_web_searches(
    llamaindex_llm: Anthropic, server: ProviderServer, memory_tracker: UsageTracker, streaming: str
) -> None:
    server.cached, server.cache_write, server.web_searches, server.web_search_errors = 8, 4, 2, 1
    _read(llamaindex_llm, streaming)
    [record] = memory_tracker.records()
    [bill] = server.billed
    assert not record.estimated and record.cost_known and record.cost_estimate_usd > 0
    assert (
        record.prompt_tokens,
        record.completion_tokens,
        record.cache_read_tokens,
        record.cache_write_tokens,
        record.web_search_requests,
    ) == (bill.prompt, bill.completion, bill.cached, bill.cache_write, bill.web_searches)


@pytest.mark.parametrize("words", [0, 3])
@pytest.mark.parametrize("streaming", ["sync", "async"])
def test_llamaindex_stream_failing_after_message_start_keeps_the_billed_input(
    llamaindex_llm: Anthropic,
    server: ProviderServer,
    memory_tracker: UsageTracker,
    streaming: str,
    words: int,
) -> None:
    """The chunks carry message_start's input: recorded as billed; without a chunk
    (message_start yields none) it is estimated. The words sent are counted with tiktoken,
    so the record is flagged either way."""
    server.stream_error_after = words
    with pytest.raises(APIStatusError, match="overloaded"):
        _read(llamaindex_llm, streaming)
    record = _one_failed(memory_tracker)
    [bill] = server.billed
    assert record.estimated and record.cost_estimate_usd > 0
    assert record.completion_tokens == bill.completion == words
    if words:
        assert record.prompt_tokens == bill.prompt
    else:
        assert abs(record.prompt_tokens - bill.prompt) <= bill.prompt // 3  # tiktoken vs Claude


@pytest.mark.parametrize("streaming", ["sync", "async"])
def test_llamaindex_stream_never_read_bills_the_input_it_sent(
    llamaindex_llm: Anthropic, server: ProviderServer, memory_tracker: UsageTracker, streaming: str
) -> None:
    """llama-index-llms-anthropic sends the request as it hands the stream out: dropped
    unread, it was billed its input all the same."""
    if streaming == "sync":
        stream: Any = llamaindex_llm.stream_chat(MESSAGES)
    else:
        stream = asyncio.run(llamaindex_llm.astream_chat(MESSAGES))
    del stream
    gc.collect()
    memory_tracker.flush()  # ended on a thread of its own
    [record] = memory_tracker.records()
    [bill] = server.billed
    assert (record.status, record.error_type) == ("error", "GeneratorExit")
    assert record.estimated and record.completion_tokens == 0 and record.cost_estimate_usd > 0
    assert abs(record.prompt_tokens - bill.prompt) <= bill.prompt // 3  # tiktoken vs Claude


def test_llamaindex_refused_stream_bills_nothing(
    llamaindex_llm: Anthropic, server: ProviderServer, memory_tracker: UsageTracker
) -> None:
    server.failures = [400]  # refused before the stream opened
    with pytest.raises(APIStatusError):
        _read(llamaindex_llm, "sync")
    [record] = memory_tracker.records()
    assert (record.total_tokens, record.cost_estimate_usd, server.billed) == (0, 0, [])


@pytest.mark.parametrize("words", [0, 3])
@pytest.mark.parametrize("streaming", ["sync", "async"])
def test_langchain_stream_failing_after_message_start_bills_the_input(
    server: ProviderServer, memory_tracker: UsageTracker, streaming: str, words: int
) -> None:
    """langchain-anthropic withholds message_start's usage: the input is estimated, from
    the moment its first chunk (message_start's) came."""
    model = ChatAnthropic(
        model="claude-sonnet-4-6",
        base_url=server.base_url,
        api_key="test",
        max_tokens=200,
        max_retries=0,
        callbacks=[LangChainHandler(memory_tracker)],
    )
    server.stream_error_after = words
    with pytest.raises(APIStatusError, match="overloaded"):
        if streaming == "sync":
            list(model.stream(QUESTION))
        else:

            async def read() -> None:
                async for _ in model.astream(QUESTION):
                    pass

            asyncio.run(read())
    record = _one_failed(memory_tracker)
    [bill] = server.billed
    assert record.estimated and record.cost_estimate_usd > 0
    assert record.completion_tokens == bill.completion == words
    assert abs(record.prompt_tokens - bill.prompt) <= bill.prompt // 3  # tiktoken vs Claude
