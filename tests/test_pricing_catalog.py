"""Pricing agrees with genai-prices' full calculation for every model in its catalog, on
a grid of usages, call times (dated and time-of-day prices) and service tiers."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import pytest
from genai_prices import data_snapshot

from usage_callbacks.pricing import Pricer, _CatalogModel, genai_usage
from usage_callbacks.usage import TokenUsage

USAGES = [
    TokenUsage(prompt_tokens=1_234, completion_tokens=567),
    TokenUsage(prompt_tokens=9_000, completion_tokens=10, cache_read_tokens=6_000),
    TokenUsage(
        prompt_tokens=20_000,
        completion_tokens=800,
        cache_read_tokens=5_000,
        cache_write_tokens=7_000,
        cache_write_1h_tokens=3_000,
        reasoning_tokens=500,
        web_search_requests=2,
    ),
    TokenUsage(
        prompt_tokens=3_000,
        completion_tokens=2_000,
        input_audio_tokens=1_000,
        input_image_tokens=700,
        tool_prompt_tokens=300,
        output_audio_tokens=900,
        output_image_tokens=600,
    ),
    TokenUsage(embedding_tokens=4_321),
    TokenUsage(prompt_tokens=250_000, completion_tokens=1_000, cache_read_tokens=100_000),
]
#: Out of order, so a price chosen for one time is not reused for another.
TIMES = [
    datetime(2026, 1, 5, 12, 0, tzinfo=timezone.utc),
    datetime(2023, 6, 1, 3, 0, tzinfo=timezone.utc),
    datetime(2026, 1, 5, 17, 30, tzinfo=timezone.utc),
    datetime(2024, 11, 20, 23, 59, tzinfo=timezone.utc),
    datetime(2025, 6, 1, 0, 15, tzinfo=timezone.utc),
    datetime(2026, 11, 20, 17, 30, tzinfo=timezone.utc),
    datetime(2026, 1, 5, 12, 30, tzinfo=timezone.utc),
    datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc),
]
TIERS = ("flex", "priority", "default")

MODELS = [
    (provider, info)
    for provider in data_snapshot.get_snapshot().providers
    for info in provider.models
]


@pytest.mark.parametrize("start", range(0, len(MODELS), 250))
def test_every_catalog_model_prices_as_genai_prices_does(start: int) -> None:
    pricer = Pricer()
    mismatches = []
    for provider, info in MODELS[start : start + 250]:
        pricer._models[info.id, provider.id] = _CatalogModel(info)
        tiers = (None, *TIERS) if info.price_variants else (None,)
        for when in TIMES:
            for tier in tiers:
                context = {"service_tier": tier} if tier else None
                for usage in USAGES:
                    usage = usage.model_copy(update={"service_tier": tier})
                    try:
                        expected = info.calc_price(
                            genai_usage(usage.__dict__),
                            provider,
                            genai_request_timestamp=when,
                            price_context=context,
                        ).total_price
                    except ValueError:  # genai-prices refuses this usage for this model
                        continue
                    priced = pricer.price(usage, info.id, provider.id, when)
                    if not priced.known or priced.cost_usd != Decimal(expected):
                        mismatches.append((provider.id, info.id, when, tier, usage, priced))
    assert not mismatches, mismatches[:5]
