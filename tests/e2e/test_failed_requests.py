"""A request the provider refused bills nothing: retries, fallbacks and SDK retry
exhaustion are recorded as errors with 0 tokens and $0, and budgets book only what the
provider billed (real langchain-openai / langchain-anthropic clients, loopback server)."""

from __future__ import annotations

import pytest
from langchain_anthropic import ChatAnthropic
from langchain_openai import ChatOpenAI

from tests.e2e.provider_server import ProviderServer
from usage_callbacks import Budget, UsageTracker
from usage_callbacks.langchain import UsageCallbackHandler

QUESTION = "What is the capital of France? Answer in one sentence, please."


def _openai(server: ProviderServer, model: str = "gpt-4o-mini", **kwargs: object) -> ChatOpenAI:
    return ChatOpenAI(model=model, base_url=f"{server.base_url}/v1", api_key="test", **kwargs)


def _billed_tokens(server: ProviderServer) -> int:
    return sum(bill.prompt + bill.completion for bill in server.billed)


def _check(tracker: UsageTracker, server: ProviderServer, *, errors: int, ok: int) -> None:
    records = tracker.records()
    failed = [record for record in records if record.status == "error"]
    assert len(failed) == errors and len(records) == errors + ok
    assert all(r.total_tokens == 0 and r.cost_estimate_usd == 0 for r in failed)
    assert sum(r.total_tokens for r in records) == _billed_tokens(server)
    [status] = tracker.budget_status()
    assert status.spent_tokens == _billed_tokens(server)


@pytest.mark.parametrize("status", [400, 429, 500])
def test_sdk_retries_bill_only_the_request_that_succeeded(
    server: ProviderServer, status: int
) -> None:
    with UsageTracker("memory://", budgets=[Budget(limit_tokens=100_000)]) as tracker:
        server.failures = [status] * (1 if status == 400 else 2)
        model = _openai(server, max_retries=2, callbacks=[UsageCallbackHandler(tracker)])
        if status == 400:  # not retried by the SDK
            with pytest.raises(Exception, match="400"):
                model.invoke(QUESTION)
            model.invoke(QUESTION)
        else:
            model.invoke(QUESTION)  # the SDK retries inside one LangChain run
        _check(tracker, server, errors=1 if status == 400 else 0, ok=1)


def test_with_retry_and_with_fallbacks_record_failures_as_free_errors(
    server: ProviderServer,
) -> None:
    with UsageTracker("memory://", budgets=[Budget(limit_tokens=100_000)]) as tracker:
        handler = UsageCallbackHandler(tracker)
        server.failures = [500] * 3
        retried = _openai(server, max_retries=0).with_retry(
            stop_after_attempt=4, wait_exponential_jitter=False
        )
        retried.invoke(QUESTION, config={"callbacks": [handler]})
        server.failures = [429]
        fallback = _openai(server, max_retries=0).with_fallbacks(
            [_openai(server, model="gpt-4.1-mini", max_retries=0)]
        )
        fallback.invoke(QUESTION, config={"callbacks": [handler]})
        _check(tracker, server, errors=4, ok=2)


def test_anthropic_sdk_retry_exhaustion_bills_nothing(server: ProviderServer) -> None:
    with UsageTracker("memory://", budgets=[Budget(limit_tokens=100_000)]) as tracker:
        server.failures = [529] * 3
        model = ChatAnthropic(
            model="claude-sonnet-4-6",
            base_url=server.base_url,
            api_key="test",
            max_tokens=200,
            max_retries=2,
            callbacks=[UsageCallbackHandler(tracker)],
        )
        with pytest.raises(Exception, match="529"):
            model.invoke(QUESTION)
        for streamed in (False, True):
            server.failures = [500] * 3
            with pytest.raises(Exception, match="500"):
                if streamed:
                    list(model.stream(QUESTION))
                else:
                    model.invoke(QUESTION)
        _check(tracker, server, errors=3, ok=0)
