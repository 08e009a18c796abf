"""Real langchain-ollama and llama-index-llms-ollama clients against the loopback Ollama.

Ollama reports ``prompt_eval_count`` and ``eval_count`` in the last object of a reply;
what usage-callbacks records must equal them, token for token, streamed or not, sync or
async. A local model has no price: the record says so (``cost_known=False``).
"""

from __future__ import annotations

import asyncio

from langchain_ollama import ChatOllama
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.callbacks import CallbackManager
from llama_index.llms.ollama import Ollama

from tests.e2e.provider_server import Bill, ProviderServer
from usage_callbacks import Budget, BudgetExceededError, UsageTracker
from usage_callbacks.langchain import UsageCallbackHandler
from usage_callbacks.llamaindex import UsageCallbackHandler as LlamaIndexHandler
from usage_callbacks.store.models import UsageRecord

QUESTION = "What is the capital of France? Answer in one sentence, please."
MODEL = "llama3.2"


def _equal(records: list[UsageRecord], bills: list[Bill]) -> None:
    assert len(records) == len(bills) > 0
    for record, bill in zip(records, bills, strict=True):
        assert (record.model, record.prompt_tokens, record.completion_tokens) == (
            bill.model,
            bill.prompt,
            bill.completion,
        )
        assert record.estimated is False and record.status == "ok"
        assert record.cost_known is False and record.cost_estimate_usd == 0  # no price


def test_chat_ollama_invoke_stream_sync_and_async(
    server: ProviderServer, memory_tracker: UsageTracker
) -> None:
    model = ChatOllama(model=MODEL, base_url=server.base_url)
    config = {"callbacks": [UsageCallbackHandler(memory_tracker)]}
    model.invoke(QUESTION, config=config)
    "".join(str(chunk.content) for chunk in model.stream(QUESTION, config=config))

    async def both() -> None:
        await model.ainvoke(QUESTION, config=config)
        async for _ in model.astream(QUESTION, config=config):
            pass

    asyncio.run(both())
    memory_tracker.flush()
    _equal(memory_tracker.records(), server.billed)
    assert {record.framework for record in memory_tracker.records()} == {"langchain"}


def test_llamaindex_ollama_chat_and_streams(
    server: ProviderServer, memory_tracker: UsageTracker
) -> None:
    llm = Ollama(
        model=MODEL,
        base_url=server.base_url,
        request_timeout=30,
        callback_manager=CallbackManager([LlamaIndexHandler(memory_tracker)]),
    )
    messages = [ChatMessage(role="user", content=QUESTION)]
    llm.chat(messages)
    for _ in llm.stream_chat(messages):
        pass
    llm.complete(QUESTION)

    async def streamed() -> None:
        async for _ in await llm.astream_chat(messages):
            pass

    asyncio.run(streamed())
    memory_tracker.flush()
    _equal(memory_tracker.records(), server.billed)
    assert {record.framework for record in memory_tracker.records()} == {"llamaindex"}


def test_a_token_budget_refuses_an_ollama_call_before_it_is_sent(server: ProviderServer) -> None:
    with UsageTracker("memory://", budgets=[Budget(limit_tokens=30, per="user")]) as tracker:
        model = ChatOllama(model=MODEL, base_url=server.base_url, num_predict=200)
        config = {"callbacks": [UsageCallbackHandler(tracker, user_id="alice")]}
        try:
            model.invoke(QUESTION, config=config)
        except BudgetExceededError:
            pass
        else:
            raise AssertionError("a 200-token call fit a 30-token budget")
        assert server.requests == 0 and tracker.records() == []
