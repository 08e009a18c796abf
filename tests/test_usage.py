"""TokenUsage semantics and validation; every provider shape through the normalizers."""

from __future__ import annotations

from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest
from anthropic.types import Usage as AnthropicUsage
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types import CompletionUsage
from pydantic import ValidationError

from usage_callbacks import TokenUsage, normalize_usage
from usage_callbacks.readers import (
    SOURCES,
    usage_from_anthropic,
    usage_from_bedrock_converse,
    usage_from_gemini,
    usage_from_langchain,
    usage_from_ollama,
    usage_from_openai_chat,
    usage_from_openai_embedding,
    usage_from_openai_responses,
)


def test_total_is_computed_and_checked() -> None:
    usage = TokenUsage(prompt_tokens=10, completion_tokens=5, embedding_tokens=2)
    assert usage.total_tokens == 17
    with pytest.raises(ValidationError, match="leave total_tokens out"):
        TokenUsage(prompt_tokens=10, completion_tokens=5, total_tokens=99)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt_tokens": -1}, "greater than or equal to 0"),
        ({"prompt_tokens": 1.5}, "valid integer"),
        ({"prompt_tokens": "12"}, "valid integer"),
        ({"completion_tokens": True}, "must be an integer"),
        ({"prompt_tokens": 10**13}, "less than or equal to"),
        ({"prompt_tokens": 5, "cache_read_tokens": 6}, "must include the cached parts"),
        ({"completion_tokens": 1, "reasoning_tokens": 2}, "must include reasoning"),
        ({"cost_estimate_usd": Decimal("-0.1")}, "greater than or equal to 0"),
        ({"cost_estimate_usd": Decimal("NaN")}, "finite"),
        ({"prompt": 5}, "Extra inputs"),
    ],
)
def test_bad_hand_built_usage_is_rejected_clearly(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TokenUsage(**fields)


def test_usages_add_and_sum_exactly() -> None:
    a = TokenUsage(
        prompt_tokens=10, completion_tokens=4, reasoning_tokens=1, cost_estimate_usd=Decimal("0.1")
    )
    b = TokenUsage(embedding_tokens=7, cost_estimate_usd=Decimal("0.2"), estimated=True)
    total = sum([a, b, a])
    assert isinstance(total, TokenUsage)
    assert (total.prompt_tokens, total.embedding_tokens, total.total_tokens) == (20, 7, 35)
    assert total.cost_estimate_usd == Decimal("0.4") and total.estimated
    assert (a + a).estimated is False
    with pytest.raises(TypeError):
        _ = a + 1  # type: ignore[operator]


def test_usage_is_frozen() -> None:
    with pytest.raises(ValidationError):
        TokenUsage().prompt_tokens = 3  # type: ignore[misc]


def _parts(usage: TokenUsage | None) -> tuple[int, ...] | None:
    if usage is None:
        return None
    return (
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.cache_read_tokens,
        usage.cache_write_tokens,
        usage.reasoning_tokens,
        usage.embedding_tokens,
    )


# (prompt, completion, cache_read, cache_write, reasoning, embedding)
CASES = [
    (
        "openai-chat",
        usage_from_openai_chat,
        {
            "prompt_tokens": 100,
            "completion_tokens": 40,
            "total_tokens": 140,
            "prompt_tokens_details": {"cached_tokens": 64},
            "completion_tokens_details": {"reasoning_tokens": 30},
        },
        (100, 40, 64, 0, 30, 0),
    ),
    ("openai-missing-details", usage_from_openai_chat, {"prompt_tokens": 9}, (9, 0, 0, 0, 0, 0)),
    (
        "openai-none-details",
        usage_from_openai_chat,
        {"prompt_tokens": 9, "completion_tokens": None, "prompt_tokens_details": None},
        (9, 0, 0, 0, 0, 0),
    ),
    (
        "openai-strings-and-negatives",
        usage_from_openai_chat,
        {
            "prompt_tokens": "12",
            "completion_tokens": -3,
            "prompt_tokens_details": {"cached_tokens": "x"},
        },
        (12, 0, 0, 0, 0, 0),
    ),
    (
        "openai-responses",
        usage_from_openai_responses,
        {
            "input_tokens": 50,
            "output_tokens": 20,
            "input_tokens_details": {"cached_tokens": 10},
            "output_tokens_details": {"reasoning_tokens": 5},
        },
        (50, 20, 10, 0, 5, 0),
    ),
    (
        "openai-cached-above-prompt",
        usage_from_openai_chat,
        {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 50}},
        (10, 0, 10, 0, 0, 0),
    ),
    (
        "openai-embedding",
        usage_from_openai_embedding,
        {"prompt_tokens": 8, "total_tokens": 8},
        (0, 0, 0, 0, 0, 8),
    ),
    (
        "anthropic",
        usage_from_anthropic,
        {
            "input_tokens": 20,
            "output_tokens": 7,
            "cache_read_input_tokens": 1000,
            "cache_creation_input_tokens": 200,
        },
        (1220, 7, 1000, 200, 0, 0),
    ),
    (
        "anthropic-no-cache",
        usage_from_anthropic,
        {"input_tokens": 20, "output_tokens": 7},
        (20, 7, 0, 0, 0, 0),
    ),
    (
        "anthropic-none-cache",
        usage_from_anthropic,
        {"input_tokens": 3, "output_tokens": 1, "cache_read_input_tokens": None},
        (3, 1, 0, 0, 0, 0),
    ),
    (
        "langchain",
        usage_from_langchain,
        {
            "input_tokens": 300,
            "output_tokens": 90,
            "total_tokens": 390,
            "input_token_details": {"cache_read": 100, "cache_creation": 50},
            "output_token_details": {"reasoning": 60},
        },
        (300, 90, 100, 50, 60, 0),
    ),
    (
        "langchain-bare",
        usage_from_langchain,
        {"input_tokens": 3, "output_tokens": 2},
        (3, 2, 0, 0, 0, 0),
    ),
    (
        "gemini",
        usage_from_gemini,
        {
            "prompt_token_count": 400,
            "candidates_token_count": 30,
            "cached_content_token_count": 256,
            "thoughts_token_count": 70,
        },
        (400, 100, 256, 0, 70, 0),
    ),
    (
        "gemini-camel",
        usage_from_gemini,
        {"promptTokenCount": 4, "candidatesTokenCount": 2, "thoughtsTokenCount": 1},
        (4, 3, 0, 0, 1, 0),
    ),
    (
        "bedrock",
        usage_from_bedrock_converse,
        {
            "inputTokens": 11,
            "outputTokens": 5,
            "cacheReadInputTokens": 4,
            "cacheWriteInputTokens": 2,
        },
        (17, 5, 4, 2, 0, 0),
    ),
    (
        "bedrock-float",
        usage_from_bedrock_converse,
        {"inputTokens": 11.0, "outputTokens": 5.5},
        (11, 0, 0, 0, 0, 0),
    ),
    (
        "ollama",
        usage_from_ollama,
        {"prompt_eval_count": 26, "eval_count": 290},
        (26, 290, 0, 0, 0, 0),
    ),
    (
        "ollama-huge",
        usage_from_ollama,
        {"prompt_eval_count": 10**30, "eval_count": 1},
        (0, 1, 0, 0, 0, 0),
    ),
    ("empty", usage_from_openai_chat, {}, (0, 0, 0, 0, 0, 0)),
]


@pytest.mark.parametrize(
    ("normalizer", "payload", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_each_provider_shape(
    normalizer: Any, payload: dict[str, Any], expected: tuple[int, ...]
) -> None:
    assert _parts(normalizer(payload)) == expected
    as_object = SimpleNamespace(
        **{k: SimpleNamespace(**v) if isinstance(v, dict) else v for k, v in payload.items()}
    )
    assert _parts(normalizer(as_object)) == expected


def test_sdk_objects() -> None:
    openai_usage = CompletionUsage(
        prompt_tokens=30,
        completion_tokens=12,
        total_tokens=42,
        prompt_tokens_details={"cached_tokens": 16},  # type: ignore[arg-type]
        completion_tokens_details={"reasoning_tokens": 8},  # type: ignore[arg-type]
    )
    found = normalize_usage(SimpleNamespace(usage=openai_usage), source="openai-chat")
    assert _parts(found) == (30, 12, 16, 0, 8, 0)
    anthropic_usage = AnthropicUsage(
        input_tokens=5, output_tokens=3, cache_read_input_tokens=100, cache_creation_input_tokens=0
    )
    found = normalize_usage(anthropic_usage, source="anthropic", whole=False)
    assert _parts(found) == (105, 3, 100, 0, 0, 0)


def test_embedding_calls_move_prompt_tokens_to_embedding() -> None:
    usage = normalize_usage(
        {"usage": {"prompt_tokens": 8, "total_tokens": 8}},
        source="openai-chat",
        call_type="embedding",
    )
    assert _parts(usage) == (0, 0, 0, 0, 0, 8)


def test_an_unknown_source_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown usage source 'openia'"):
        normalize_usage({}, source="openia")  # type: ignore[arg-type]


def test_a_litellm_usage_is_not_read_as_anthropic() -> None:
    """LiteLLM always carries cache_*_input_tokens; key sniffing read it as Anthropic's
    shape (completion 0, uncached input dropped)."""
    payload = {
        "usage": {
            "prompt_tokens": 900,
            "completion_tokens": 60,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }
    }
    assert _parts(normalize_usage(payload, source="litellm")) == (900, 60, 0, 0, 0, 0)


class Exploding:
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError("boom")


@pytest.mark.parametrize("source", sorted(SOURCES))
@pytest.mark.parametrize("payload", [None, 3, "usage", [1, 2], {"usage": "n/a"}, {}, Exploding()])
def test_payloads_without_usage_give_none_and_never_raise(payload: Any, source: Any) -> None:
    assert normalize_usage(payload, source=source) is None


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "usage",
                    "prompt_tokens",
                    "completion_tokens",
                    "input_tokens",
                    "output_tokens",
                    "cache_read_input_tokens",
                    "cache_creation_input_tokens",
                    "prompt_tokens_details",
                    "cached_tokens",
                    "input_token_details",
                    "cache_read",
                    "prompt_token_count",
                    "candidates_token_count",
                    "thoughts_token_count",
                    "inputTokens",
                    "outputTokens",
                    "prompt_eval_count",
                    "eval_count",
                    "usage_metadata",
                    "cache_creation",
                    "ephemeral_1h_input_tokens",
                    "ephemeral_5m_input_tokens",
                    "server_tool_use",
                    "web_search_requests",
                    "modality",
                    "token_count",
                    "tool_use_prompt_token_count",
                    "billed_units",
                    "object",
                    "other",
                ]
            ),
            children,
            max_size=6,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=2000, deadline=None)
@given(
    payload=JSON,
    embedding=st.booleans(),
    source=st.sampled_from(sorted(SOURCES)),
    whole=st.booleans(),
)
def test_any_payload_normalizes_to_a_valid_usage_or_none(
    payload: Any, embedding: bool, source: Any, whole: bool
) -> None:
    usage = normalize_usage(
        payload, source=source, call_type="embedding" if embedding else "chat", whole=whole
    )
    if usage is None:
        return
    again = TokenUsage.model_validate(usage.model_dump())  # the invariants hold
    assert (
        again.total_tokens == usage.prompt_tokens + usage.completion_tokens + usage.embedding_tokens
    )
