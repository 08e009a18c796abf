"""LlamaIndex: both event systems, nesting, provider usage, budgets, sessions, RAG."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.base.llms.types import (
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import ChatMessage, CustomLLM, MockLLM
from llama_index.core.llms.callbacks import llm_completion_callback

from usage_callbacks import Budget, BudgetExceededError, UsageTracker
from usage_callbacks.llamaindex import UsageCallbackHandler, UsageEventHandler, instrument
from usage_callbacks.runs import CALLS
from usage_callbacks.tokens import count_message_tokens, get_encoding

MESSAGES = [ChatMessage(role="user", content="What does the quarterly report say?")]


class BilledLLM(CustomLLM):
    """A provider-like LLM: reports OpenAI-style usage in ``raw``; counts its calls."""

    calls: int = 0
    prompt_tokens: int = 40
    completion_tokens: int = 9

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name="gpt-4o-mini", num_output=64)

    def _raw(self) -> dict[str, Any]:
        return {
            "model": "gpt-4o-mini-2024-07-18",
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": 32},
            },
        }

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        self.calls += 1
        return CompletionResponse(text="Revenue grew.", raw=self._raw())

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        self.calls += 1

        def gen() -> Iterator[CompletionResponse]:
            text = ""
            for word in ["Revenue", " grew", " a", " lot", "."]:
                text += word
                yield CompletionResponse(text=text, delta=word)

        return gen()


class CountingEmbedding(MockEmbedding):
    calls: int = 0

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        self.calls += 1
        return super()._get_text_embeddings(texts)


def _manager(tracker: UsageTracker, **kwargs: Any) -> CallbackManager:
    return CallbackManager([UsageCallbackHandler(tracker, **kwargs)])


def test_provider_usage_from_raw_wins(memory_tracker: UsageTracker) -> None:
    llm = BilledLLM(callback_manager=_manager(memory_tracker, user_id="alice"))
    llm.chat(MESSAGES)  # CustomLLM: chat -> complete, two nested events, one call
    llm.complete("hello")
    records = memory_tracker.records()
    assert len(records) == 2 and llm.calls == 2
    for record in records:
        assert (record.prompt_tokens, record.completion_tokens, record.cache_read_tokens) == (
            40,
            9,
            32,
        )
        assert (record.model, record.provider, record.estimated) == (
            "gpt-4o-mini-2024-07-18",
            None,
            False,
        )
        assert record.user_id == "alice" and record.framework == "llamaindex"
        assert record.cost_known and record.cost_estimate_usd > 0
    assert [r.call_type for r in records] == ["chat", "completion"]


def test_mock_llm_calls_are_estimated_once_each(memory_tracker: UsageTracker) -> None:
    llm = MockLLM(max_tokens=8, callback_manager=_manager(memory_tracker))
    llm.chat(MESSAGES)
    llm.complete("hello world")
    list(llm.stream_chat(MESSAGES))
    list(llm.stream_complete("hello world"))
    asyncio.run(llm.achat(MESSAGES))  # achat -> chat -> complete: three events, one call
    records = memory_tracker.records()
    assert len(records) == 5 and all(r.estimated for r in records)
    assert records[0].prompt_tokens == count_message_tokens(MESSAGES, None)
    assert all(r.completion_tokens > 0 for r in records)


def test_both_event_systems_wired_count_each_call_once(memory_tracker: UsageTracker) -> None:
    handle = instrument(memory_tracker)
    assert instrument(memory_tracker) is handle  # idempotent
    try:
        llm = MockLLM(max_tokens=8, callback_manager=_manager(memory_tracker))
        embed = MockEmbedding(embed_dim=4, callback_manager=llm.callback_manager)
        llm.chat(MESSAGES)
        list(llm.stream_complete("hi there"))
        embed.get_text_embedding_batch(["one", "two", "three"])
        bare = MockLLM(max_tokens=8)  # no CallbackManager handler: only the dispatcher sees it
        bare.complete("hello")
    finally:
        handle.detach()
    assert [r.call_type for r in memory_tracker.records()] == [
        "chat",
        "completion",
        "embedding",
        "completion",
    ]
    MockLLM(max_tokens=8).complete("after detach")
    assert len(memory_tracker.records()) == 4


def test_the_event_handler_alone_reads_provider_usage(memory_tracker: UsageTracker) -> None:
    from llama_index.core.instrumentation import get_dispatcher

    handler = UsageEventHandler(tracker=memory_tracker, user_id="bob")
    get_dispatcher().add_event_handler(handler)
    try:
        BilledLLM().chat(MESSAGES)
    finally:
        root = get_dispatcher()
        root.event_handlers = [h for h in root.event_handlers if h is not handler]
    [record] = memory_tracker.records()
    assert (record.total_tokens, record.user_id, record.estimated) == (49, "bob", False)


def test_embeddings_are_counted_with_the_models_encoding(memory_tracker: UsageTracker) -> None:
    embed = MockEmbedding(embed_dim=4, callback_manager=_manager(memory_tracker))
    texts = ["The quarterly report shows growth.", "Costs fell in the third quarter."]
    embed.get_text_embedding_batch(texts)
    embed.get_query_embedding("growth?")
    encoding = get_encoding("cl100k_base")
    assert [r.embedding_tokens for r in memory_tracker.records()] == [
        sum(len(encoding.encode(t)) for t in texts),
        len(encoding.encode("growth?")),
    ]


def test_an_abandoned_stream_records_what_was_streamed(memory_tracker: UsageTracker) -> None:
    llm = BilledLLM(callback_manager=_manager(memory_tracker))
    stream = llm.stream_complete("tell me")
    next(stream)
    next(stream)
    stream.close()
    [record] = memory_tracker.records()
    assert record.status == "error" and record.error_type == "GeneratorExit"
    assert record.estimated and record.completion_tokens == 2  # "Revenue grew"


def test_budget_refuses_before_the_llm_is_called() -> None:
    with UsageTracker("memory://", budgets=[Budget(limit_tokens=100)]) as tracker:
        llm = BilledLLM(callback_manager=_manager(tracker))
        with pytest.raises(BudgetExceededError):
            for _ in range(5):
                llm.complete("hello")  # bills 49; the next needs up to 1 + 64 more
        assert llm.calls == 1
        assert len(tracker.records()) == 1


def test_budget_refuses_an_embedding_call_once_exhausted() -> None:
    with UsageTracker("memory://", budgets=[Budget(limit_tokens=5)]) as tracker:
        embed = CountingEmbedding(embed_dim=4, callback_manager=_manager(tracker))
        embed.get_text_embedding_batch(["one two three four five"])
        with pytest.raises(BudgetExceededError):
            embed.get_text_embedding_batch(["six"])
        assert embed.calls == 1


def test_token_counting_handler_raises_only_after_paying_ours_before() -> None:
    theirs = TokenCountingHandler(token_budget=50)
    llm = BilledLLM(callback_manager=CallbackManager([theirs]))
    llm.complete("hello")
    with pytest.raises(ValueError, match="Token budget exceeded"):
        llm.complete("hello")
    assert llm.calls == 2  # the over-budget call was made (and paid) before the error
    with UsageTracker("memory://", budgets=[Budget(limit_tokens=50)]) as tracker:
        ours = BilledLLM(callback_manager=_manager(tracker))
        with pytest.raises(BudgetExceededError):
            ours.complete("hello")
            ours.complete("hello")
        assert ours.calls == 0  # 1 + 64 reserved > 50: refused before the first call


def test_sessions_capture_settings_components_and_enforce_budgets() -> None:
    Settings.llm = BilledLLM()
    try:
        with UsageTracker("memory://") as tracker:
            llm = Settings.llm  # resolved now: shares Settings.callback_manager
            with tracker.session("conv", user_id="carol") as session:
                llm.complete("a")
                llm.chat(MESSAGES)
            assert session.calls == 2 and session.usage.total_tokens == 98
            assert {r.session_id for r in tracker.records()} == {"conv"}
            with tracker.session("tight", max_tokens=100), pytest.raises(BudgetExceededError):
                llm.complete("b")
                llm.complete("c")
            assert llm.calls == 3  # the second call in the tight session never ran
            llm.complete("outside")  # no session: nobody records it
            assert len(tracker.records()) == 3
    finally:
        Settings.llm = None  # type: ignore[assignment]


def test_sessions_capture_components_with_their_own_manager(memory_tracker: UsageTracker) -> None:
    llm = MockLLM(max_tokens=8)  # its own CallbackManager: the dispatcher still sees it
    with memory_tracker.session() as session:
        llm.chat(MESSAGES)
        asyncio.run(llm.acomplete("x"))
    assert session.calls == 2


def test_rag_query_counts_embedding_and_llm_tokens(memory_tracker: UsageTracker) -> None:
    embed = MockEmbedding(embed_dim=8)
    llm = MockLLM(max_tokens=16)
    documents = [
        Document(text="Revenue grew twelve percent in the third quarter."),
        Document(text="Costs fell because of cheaper cloud contracts."),
    ]
    with memory_tracker.session("rag") as session:
        index = VectorStoreIndex.from_documents(documents, embed_model=embed)
        engine = index.as_query_engine(llm=llm, similarity_top_k=1)
        engine.query("How did revenue change?")
        chat = index.as_chat_engine(chat_mode="context", llm=llm)
        chat.chat("And costs?")
    usage = session.usage
    assert usage.embedding_tokens > 0 and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    kinds = [r.call_type for r in memory_tracker.records()]
    assert kinds.count("embedding") >= 3 and len(kinds) == session.calls


def test_threads_share_one_handler(memory_tracker: UsageTracker) -> None:
    llm = BilledLLM(callback_manager=_manager(memory_tracker))
    barrier = threading.Barrier(16)

    def work() -> None:
        barrier.wait()
        for _ in range(10):
            llm.chat(MESSAGES)

    threads = [threading.Thread(target=work) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    records = memory_tracker.records()
    assert len(records) == 160 and sum(r.total_tokens for r in records) == 160 * 49


async def test_asyncio_tasks_share_one_handler(memory_tracker: UsageTracker) -> None:
    llm = MockLLM(max_tokens=4, callback_manager=_manager(memory_tracker))
    await asyncio.gather(*(llm.acomplete(f"q{i}") for i in range(200)))
    assert len(memory_tracker.records()) == 200


def test_tracking_failures_never_break_the_call(
    memory_tracker: UsageTracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("database on fire")

    monkeypatch.setattr(memory_tracker, "record", broken)
    llm = BilledLLM(callback_manager=_manager(memory_tracker))
    assert llm.complete("hi").text == "Revenue grew."


def test_a_call_that_never_ended_does_not_hide_later_ones(memory_tracker: UsageTracker) -> None:
    from llama_index.core.callbacks import CBEventType, EventPayload

    handler = UsageCallbackHandler(memory_tracker)
    llm = BilledLLM(callback_manager=CallbackManager([handler]))
    payload = {EventPayload.SERIALIZED: llm.to_payload(), EventPayload.PROMPT: "lost"}
    handler.on_event_start(CBEventType.LLM, payload, event_id="orphan")  # its end never comes
    llm.complete("hello")
    assert [r.total_tokens for r in memory_tracker.records()] == [49]
    CALLS.refuse("orphan")


def test_an_explicit_handler_and_a_session_on_one_manager(memory_tracker: UsageTracker) -> None:
    Settings.llm = BilledLLM()
    try:
        llm = Settings.llm
        with memory_tracker.session("s") as session:
            Settings.callback_manager.add_handler(
                UsageCallbackHandler(memory_tracker, user_id="dee")
            )
            llm.complete("hello")
        assert session.calls == 1
        [record] = memory_tracker.records()
        assert (record.user_id, record.session_id, record.total_tokens) == ("dee", "s", 49)
    finally:
        Settings.callback_manager.handlers = [
            h for h in Settings.callback_manager.handlers if type(h) is not UsageCallbackHandler
        ]
        Settings.llm = None  # type: ignore[assignment]


def _corpus_case(name: str) -> Any:
    from tests.usage_corpus import CASES

    return next(case for case in CASES if case.name == name)


@pytest.mark.parametrize(
    ("class_name", "case"),
    [
        ("Anthropic_LLM", "anthropic cache read and writes split by TTL"),
        ("litellm_llm", "litellm usage for anthropic with cache"),
        ("litellm_llm", "litellm usage without cache (still carries cache_* = 0)"),
        ("GoogleGenAI", "google-genai SDK object with modalities, thoughts and tool use"),
        ("Bedrock_Converse_LLM", "bedrock converse with cache TTLs"),
        ("Ollama_llm", "ollama chat"),
        ("openai_responses_llm", "openai responses with cache and reasoning"),
        ("openai_llm", "openai chat served at the flex tier"),
    ],
)
def test_raw_is_read_by_the_llm_class_that_returned_it(
    class_name: str, case: str, memory_tracker: UsageTracker
) -> None:
    """Each LLM class's response.raw is read by its provider's reader, never guessed
    (LiteLLM usage always carries cache_*_input_tokens and was read as Anthropic's)."""
    payload = _corpus_case(case)

    class ProviderLLM(BilledLLM):
        @classmethod
        def class_name(cls) -> str:
            return class_name

        def _raw(self) -> Any:
            return payload.response

    ProviderLLM(callback_manager=_manager(memory_tracker)).complete("hello")
    [record] = memory_tracker.records()
    fields = {name: getattr(record, name) for name in payload.bills}
    assert fields == payload.bills and not record.estimated


# ---------------------------------------------------------------- one call, one entry


class FailingEmbedding(MockEmbedding):
    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        raise RuntimeError("provider down")


def test_a_failed_async_embedding_batch_ends_its_calls() -> None:
    """``aget_text_embedding_batch`` starts every batch, then gathers them: when one fails
    no CallbackManager end comes at all, only the span's drop. Each call ends there (it
    stayed in flight, holding its budget, and in the handler for good)."""
    with UsageTracker("memory://", budgets=[Budget(limit_tokens=10**6)]) as tracker:
        embed = FailingEmbedding(
            embed_dim=4, embed_batch_size=1, callback_manager=_manager(tracker)
        )
        with pytest.raises(RuntimeError):
            asyncio.run(embed.aget_text_embedding_batch(["one", "two", "three"]))
        records = tracker.records()
        assert [(r.status, r.total_tokens) for r in records] == [("error", 0)] * 3
        assert len(tracker.runs) == 0 and tracker.budget_status()[0].reserved_tokens == 0


def test_a_stream_read_after_50000_other_calls_is_counted_once(
    memory_tracker: UsageTracker,
) -> None:
    """Both event systems wired: the instrumentation's end found the CallbackManager's count
    of the call in a module-level set of the last 50,000 spans; a stream read after more
    calls than that was counted twice."""
    from llama_index.core.callbacks import CBEventType, EventPayload
    from llama_index.core.instrumentation.span import active_span_id

    handle = instrument(memory_tracker)
    try:
        llm = MockLLM(max_tokens=8)
        stream = llm.stream_chat(MESSAGES)
        with UsageTracker("memory://") as elsewhere:
            other = UsageCallbackHandler(elsewhere)
            payload = {EventPayload.SERIALIZED: llm.to_payload(), EventPayload.PROMPT: "x"}
            for index in range(50_001):  # calls in other spans while the stream is open
                token = active_span_id.set(f"span-{index}")
                other.on_event_start(CBEventType.LLM, payload, event_id=f"call-{index}")
                other.on_event_end(CBEventType.LLM, {}, event_id=f"call-{index}")
                active_span_id.reset(token)
        list(stream)
    finally:
        handle.detach()
    assert len(memory_tracker.records()) == 1


class HalfStreamLLM(BilledLLM):
    """Streams one word, then fails."""

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        def gen() -> Iterator[CompletionResponse]:
            yield CompletionResponse(text="Revenue grew", delta="Revenue grew")
            raise RuntimeError("connection reset")

        return gen()


def test_a_stream_failing_after_10000_other_streams_keeps_what_it_streamed(
    memory_tracker: UsageTracker,
) -> None:
    """What each stream handed out was kept in a module-level map of the last 10,000
    streams (any stream's, tracked or not): one read more slowly lost its text."""
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.events.llm import LLMCompletionInProgressEvent

    stream = HalfStreamLLM(callback_manager=_manager(memory_tracker)).stream_complete("hi")
    next(stream)
    chunk = CompletionResponse(text="x", delta="x")
    for index in range(10_001):  # other streams, tracked by no one, hand out a chunk
        get_dispatcher().event(
            LLMCompletionInProgressEvent(prompt="x", response=chunk, span_id=f"other-{index}")
        )
    with pytest.raises(RuntimeError):
        next(stream)
    [record] = memory_tracker.records()
    assert (record.status, record.completion_tokens, record.estimated) == ("error", 2, True)
