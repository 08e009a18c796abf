"""The payload corpus through the readers, checked against what each payload bills and
against genai-prices' own extractor for the same body where it has one."""

from __future__ import annotations

from typing import Any

import pytest
from genai_prices import extract_usage
from pydantic import BaseModel

from tests.usage_corpus import CASES, Case
from usage_callbacks.readers import normalize_usage
from usage_callbacks.usage import COUNT_FIELDS, TokenUsage


def _read(case: Case) -> TokenUsage:
    usage = normalize_usage(case.response, source=case.source, call_type=case.call_type)  # type: ignore[arg-type]
    assert usage is not None
    return usage


def _billed(usage: TokenUsage) -> dict[str, Any]:
    fields = {name: getattr(usage, name) for name in COUNT_FIELDS if getattr(usage, name)}
    if usage.service_tier:
        fields["service_tier"] = usage.service_tier
    return fields


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_each_payload_reads_as_billed(case: Case) -> None:
    assert _billed(_read(case)) == case.bills
    TokenUsage.model_validate(_read(case).model_dump())  # the invariants hold


#: genai-prices' usage keys and the TokenUsage fields that hold the same count.
_SAME_COUNT = {
    "input_tokens": ("prompt_tokens", "embedding_tokens"),
    "output_tokens": ("completion_tokens",),
    "cache_read_tokens": ("cache_read_tokens",),
    "cache_write_tokens": ("cache_write_tokens",),
    "cache_write_1h_tokens": ("cache_write_1h_tokens",),
    "output_reasoning_tokens": ("reasoning_tokens",),
    "output_audio_tokens": ("output_audio_tokens",),
    "output_image_tokens": ("output_image_tokens",),
    "input_tool_tokens": ("tool_prompt_tokens",),
    "web_searches": ("web_search_requests",),
}

_CHAT_OR_RESPONSE = ("chat.completion", "response")
WITH_EXTRACTOR = [case for case in CASES if case.extractor]


@pytest.mark.parametrize("case", WITH_EXTRACTOR, ids=[case.name for case in WITH_EXTRACTOR])
def test_readers_agree_with_genai_prices_extractors(case: Case) -> None:
    assert case.extractor is not None
    provider_id, flavor = case.extractor
    body = case.response
    if isinstance(body, BaseModel):
        body = body.model_dump(mode="json")
    extracted = extract_usage(body, provider_id=provider_id, api_flavor=flavor).usage
    ours = _read(case)
    reported = extracted.__dict__
    compared = {key: reported[key] for key in _SAME_COUNT if key in reported}
    assert compared, "the extractor read nothing"
    assert compared == {
        key: sum(getattr(ours, name) for name in _SAME_COUNT[key]) for key in compared
    }


def _langchain_metadata(case: Case) -> Any:
    """The usage_metadata langchain-openai / langchain-anthropic make of the body."""
    from langchain_anthropic.chat_models import _create_usage_metadata as from_anthropic
    from langchain_openai.chat_models.base import (
        _create_usage_metadata as from_openai_chat,
    )
    from langchain_openai.chat_models.base import (
        _create_usage_metadata_responses as from_openai_responses,
    )

    response = case.response
    if case.source == "anthropic":
        return from_anthropic(response.usage)
    usage = response.usage.model_dump()
    tier = getattr(response, "service_tier", None)
    if response.object == "response":
        return from_openai_responses(usage, tier)
    return from_openai_chat(usage, tier)


#: What LangChain's usage_metadata does not carry: server-tool counts (read from the
#: raw usage beside it), OpenAI's image counts.
_NOT_IN_LANGCHAIN = ("web_search_requests", "input_image_tokens", "output_image_tokens")
THROUGH_LANGCHAIN = [
    case
    for case in CASES
    if case.source == "anthropic"
    or (case.source == "openai" and getattr(case.response, "object", "") in _CHAT_OR_RESPONSE)
]


@pytest.mark.parametrize("case", THROUGH_LANGCHAIN, ids=[c.name for c in THROUGH_LANGCHAIN])
def test_langchain_usage_metadata_reads_as_billed(case: Case) -> None:
    from usage_callbacks.readers import usage_from_langchain

    expected = {k: v for k, v in case.bills.items() if k not in _NOT_IN_LANGCHAIN}
    assert _billed(usage_from_langchain(_langchain_metadata(case))) == expected


def test_xai_through_langchain_counts_reasoning_beside_the_completion() -> None:
    """langchain-xai builds usage_metadata with langchain-openai's code, which copies
    xAI's completion_tokens (reasoning excluded) as output_tokens."""
    from langchain_openai.chat_models.base import _create_usage_metadata

    from usage_callbacks.readers import usage_from_langchain

    case = next(case for case in CASES if case.source == "xai")
    metadata = _create_usage_metadata(case.response["usage"])
    assert _billed(usage_from_langchain(metadata, reasoning_additive=True)) == case.bills
