"""TrackedEmbeddings: embedding tokens counted, budgets honoured, still an Embeddings."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.embeddings import DeterministicFakeEmbedding, Embeddings
from langchain_core.vectorstores import InMemoryVectorStore

from usage_callbacks import Budget, BudgetExceededError, UsageTracker
from usage_callbacks.langchain import TrackedEmbeddings
from usage_callbacks.tokens import get_encoding

TEXTS = ["The quarterly report shows growth.", "Costs fell in the third quarter."]


class CountingEmbeddings(DeterministicFakeEmbedding):
    model: str = "text-embedding-3-small"
    calls: int = 0

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        object.__setattr__(self, "calls", self.calls + 1)
        return super().embed_documents(texts)


def _tokens(texts: list[str]) -> int:
    encoding = get_encoding("cl100k_base")
    return sum(len(encoding.encode(text)) for text in texts)


def test_embedding_tokens_are_counted_with_the_models_encoding(
    memory_tracker: UsageTracker,
) -> None:
    inner = CountingEmbeddings(size=8)
    tracked = TrackedEmbeddings(inner, memory_tracker, user_id="alice")
    assert tracked.embed_documents(TEXTS) == inner.embed_documents(TEXTS)
    tracked.embed_query("growth?")
    first, second = memory_tracker.records()
    assert (first.call_type, first.embedding_tokens, first.prompt_tokens) == (
        "embedding",
        _tokens(TEXTS),
        0,
    )
    assert second.embedding_tokens == _tokens(["growth?"])
    assert first.model == "text-embedding-3-small" and first.cost_known
    assert first.cost_estimate_usd > 0 and first.user_id == "alice"


async def test_async_embeddings_are_tracked(memory_tracker: UsageTracker) -> None:
    tracked = TrackedEmbeddings(CountingEmbeddings(size=8), memory_tracker)
    await tracked.aembed_documents(TEXTS)
    await tracked.aembed_query("q")
    assert [r.embedding_tokens for r in memory_tracker.records()] == [_tokens(TEXTS), 1]


def test_vector_stores_accept_it_and_sessions_see_it(memory_tracker: UsageTracker) -> None:
    tracked = TrackedEmbeddings(CountingEmbeddings(size=8), memory_tracker)
    with memory_tracker.session("rag") as session:
        store = InMemoryVectorStore(embedding=tracked)
        store.add_texts(TEXTS)
        store.similarity_search("growth", k=1)
    assert session.calls == 2
    assert session.usage.embedding_tokens == _tokens(TEXTS) + _tokens(["growth"])


def test_budget_refuses_before_the_embedding_provider_is_called() -> None:
    with UsageTracker("memory://", budgets=[Budget(limit_tokens=19)]) as tracker:  # 6 + 14 > 19
        inner = CountingEmbeddings(size=8)
        tracked = TrackedEmbeddings(inner, tracker)
        tracked.embed_documents(TEXTS[:1])
        with pytest.raises(BudgetExceededError):
            tracked.embed_documents(TEXTS)
        assert inner.calls == 1


def test_provider_errors_propagate_and_are_recorded(memory_tracker: UsageTracker) -> None:
    class Broken(Embeddings):
        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            raise ConnectionError("no route")

        def embed_query(self, text: str) -> list[float]:
            raise ConnectionError("no route")

    tracked = TrackedEmbeddings(Broken(), memory_tracker, model="text-embedding-3-small")
    with pytest.raises(ConnectionError):
        tracked.embed_documents(TEXTS)
    [record] = memory_tracker.records()
    assert (record.status, record.error_type, record.embedding_tokens) == (
        "error",
        "ConnectionError",
        0,
    )


def test_tracking_failures_do_not_break_embedding(
    memory_tracker: UsageTracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("tracker broke")

    monkeypatch.setattr(memory_tracker, "record", broken)
    tracked = TrackedEmbeddings(CountingEmbeddings(size=8), memory_tracker)
    assert len(tracked.embed_documents(TEXTS)) == 2
