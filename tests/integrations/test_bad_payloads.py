"""Arbitrary payloads through both frameworks' handlers: the call always survives, the
record is always kept with what could be read, and totals stay consistent."""

from __future__ import annotations

import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration, Generation, LLMResult
from llama_index.core.base.llms.types import ChatMessage, ChatResponse, CompletionResponse
from llama_index.core.callbacks import CBEventType, EventPayload

from usage_callbacks import TokenUsage, UsageTracker
from usage_callbacks.langchain import UsageCallbackHandler as LangChainHandler
from usage_callbacks.llamaindex import UsageCallbackHandler as LlamaIndexHandler

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
KEYS = st.sampled_from(
    [
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "prompt_tokens_details",
        "cached_tokens",
        "input_token_details",
        "cache_read",
        "usage",
        "token_usage",
        "eval_count",
        "model_name",
        "model",
        "x",
    ]
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.dictionaries(KEYS, inner, max_size=5) | st.lists(inner, max_size=3),
    max_leaves=15,
)
TEXT = st.text(max_size=40)
IDS = st.text(min_size=0, max_size=30)  # unicode user ids and tags included


def _consistent(tracker: UsageTracker, expected_calls: int) -> None:
    records = tracker.records()
    assert len(records) == expected_calls
    total = sum((r.usage for r in records), TokenUsage())
    summary = tracker.summary()
    assert summary.calls == expected_calls
    assert summary.usage.total_tokens == total.total_tokens
    for record in records:
        assert record.total_tokens == (
            record.prompt_tokens + record.completion_tokens + record.embedding_tokens
        )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    llm_output=st.none() | st.dictionaries(KEYS, JSON, max_size=4),
    usage_metadata=st.none() | st.dictionaries(KEYS, JSON, max_size=4),
    generation_info=st.none() | st.dictionaries(KEYS, JSON, max_size=4),
    response_metadata=st.dictionaries(KEYS, JSON, max_size=4),
    text=TEXT,
    user_id=IDS,
    tags=st.lists(IDS, max_size=3),
    params=st.dictionaries(KEYS, JSON, max_size=4),
)
def test_langchain_handler_survives_any_response(
    llm_output: Any,
    usage_metadata: Any,
    generation_info: Any,
    response_metadata: Any,
    text: str,
    user_id: str,
    tags: list[str],
    params: dict[str, Any],
) -> None:
    with UsageTracker("memory://") as tracker:
        handler = LangChainHandler(tracker, user_id=user_id, tags=tags)
        run_id = uuid.uuid4()
        handler.on_chat_model_start(
            {"kwargs": params}, [[]], run_id=run_id, invocation_params=params, metadata=params
        )
        message = AIMessage(content=text, response_metadata=response_metadata)
        object.__setattr__(message, "usage_metadata", usage_metadata)  # bypass validation
        generations: list[Generation] = [
            ChatGeneration(message=message, generation_info=generation_info)
        ]
        handler.on_llm_end(
            LLMResult(generations=[generations], llm_output=llm_output), run_id=run_id
        )
        _consistent(tracker, 1)
        [record] = tracker.records()
        assert record.user_id == user_id and record.tags == list(dict.fromkeys(tags))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=st.none() | JSON,
    additional=st.dictionaries(KEYS, JSON, max_size=4),
    serialized=st.dictionaries(KEYS, JSON, max_size=4),
    text=TEXT,
    chunks=st.lists(st.one_of(TEXT, st.integers(), st.none()), max_size=4),
    chat=st.booleans(),
    user_id=IDS,
)
def test_llamaindex_handler_survives_any_response(
    raw: Any,
    additional: dict[str, Any],
    serialized: dict[str, Any],
    text: str,
    chunks: list[Any],
    chat: bool,
    user_id: str,
) -> None:
    with UsageTracker("memory://") as tracker:
        handler = LlamaIndexHandler(tracker, user_id=user_id)
        messages = [ChatMessage(role="user", content=text)]
        start = {EventPayload.SERIALIZED: serialized}
        start[EventPayload.MESSAGES if chat else EventPayload.PROMPT] = messages if chat else text
        handler.on_event_start(CBEventType.LLM, start, event_id="llm")
        if chat:
            response: Any = ChatResponse(
                message=ChatMessage(role="assistant", content=text), additional_kwargs=additional
            )
            object.__setattr__(response, "raw", raw)
            end = {EventPayload.RESPONSE: response}
        else:
            response = CompletionResponse(text=text, additional_kwargs=additional)
            object.__setattr__(response, "raw", raw)
            end = {EventPayload.COMPLETION: response}
        handler.on_event_end(CBEventType.LLM, end, event_id="llm")
        handler.on_event_start(
            CBEventType.EMBEDDING, {EventPayload.SERIALIZED: serialized}, event_id="e"
        )
        handler.on_event_end(CBEventType.EMBEDDING, {EventPayload.CHUNKS: chunks}, event_id="e")
        _consistent(tracker, 2)
        assert {r.user_id for r in tracker.records()} == {user_id}
