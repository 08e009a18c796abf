"""Pricing: genai-prices' numbers, computed from cached rates; overrides; unknown models."""

from __future__ import annotations

import logging
import threading
from decimal import Decimal

import pytest
from genai_prices import Usage, calc_price

from usage_callbacks import ModelPrice, PriceTable, TokenUsage, calculate_cost, price
from usage_callbacks.pricing import Pricer


@pytest.mark.parametrize(
    ("model", "provider", "usage", "reference"),
    [
        (
            "gpt-4o-mini",
            "openai",
            TokenUsage(prompt_tokens=12_000, completion_tokens=800, cache_read_tokens=8_192),
            Usage(input_tokens=12_000, output_tokens=800, cache_read_tokens=8_192),
        ),
        (
            "o3-mini",
            "openai",
            TokenUsage(prompt_tokens=500, completion_tokens=3_000, reasoning_tokens=2_500),
            Usage(input_tokens=500, output_tokens=3_000),
        ),
        (
            "claude-sonnet-4-5",
            "anthropic",
            TokenUsage(
                prompt_tokens=10_000,
                completion_tokens=300,
                cache_read_tokens=6_000,
                cache_write_tokens=2_000,
            ),
            Usage(
                input_tokens=10_000,
                output_tokens=300,
                cache_read_tokens=6_000,
                cache_write_tokens=2_000,
            ),
        ),
        (
            "text-embedding-3-small",
            "openai",
            TokenUsage(embedding_tokens=40_000),
            Usage(input_tokens=40_000),
        ),
        (
            "gemini-2.5-pro",
            "google",
            TokenUsage(prompt_tokens=250_000, completion_tokens=1_000),  # tiered: above 200k
            Usage(input_tokens=250_000, output_tokens=1_000),
        ),
    ],
)
def test_costs_equal_genai_prices(
    model: str, provider: str, usage: TokenUsage, reference: Usage
) -> None:
    expected = calc_price(reference, model_ref=model, provider_id=provider).total_price
    priced = Pricer().price(usage, model, provider)
    assert priced.known and priced.cost_usd == expected


def test_unknown_models_cost_zero_and_warn_once(caplog: pytest.LogCaptureFixture) -> None:
    pricer = Pricer()
    with caplog.at_level(logging.WARNING, logger="usage_callbacks"):
        results = [pricer.price(TokenUsage(prompt_tokens=9), "my-finetune", None) for _ in range(5)]
    assert all(r.cost_usd == 0 and not r.known for r in results)
    assert sum("my-finetune" in m for m in caplog.messages) == 1
    assert pricer.price(TokenUsage(prompt_tokens=9), None).known is False


def test_unknown_provider_names_fall_back_to_the_model() -> None:
    usage = TokenUsage(prompt_tokens=1000)
    assert Pricer().price(usage, "gpt-4o", "langchain-fake").cost_usd == price(
        usage, "gpt-4o", "openai"
    )


def test_overrides_take_precedence() -> None:
    table = PriceTable(
        prices={
            "gpt-4o": ModelPrice(input_per_mtok=Decimal(1), output_per_mtok=Decimal(2)),
            "azure:gpt-4o": ModelPrice(
                input_per_mtok=Decimal(3),
                cache_read_per_mtok=Decimal("0.5"),
                output_per_mtok=Decimal(4),
            ),
        }
    )
    pricer = Pricer(table)
    usage = TokenUsage(
        prompt_tokens=2_000_000, completion_tokens=1_000_000, cache_read_tokens=1_000_000
    )
    assert pricer.price(usage, "gpt-4o", "openai").cost_usd == Decimal(4)
    assert pricer.price(usage, "gpt-4o", "azure").cost_usd == Decimal("7.5")
    embedding = Pricer(
        {"e": ModelPrice(input_per_mtok=Decimal(1), embedding_per_mtok=Decimal("0.1"))}
    )
    assert embedding.price(TokenUsage(embedding_tokens=10_000_000), "e").cost_usd == Decimal(1)


def test_calculate_cost_is_exact() -> None:
    assert calculate_cost(1500, 500, "0.0005", "0.0015") == Decimal("0.0015")
    assert calculate_cost(1, 1, 0.1, 0.2) == Decimal("0.0003")
    with pytest.raises(ValueError, match="non-negative"):
        calculate_cost(-1, 0, 1, 1)


def test_threads_price_consistently() -> None:
    pricer = Pricer()
    usage = TokenUsage(prompt_tokens=1234, completion_tokens=567, cache_read_tokens=200)
    results: set[Decimal] = set()
    lock = threading.Lock()

    def work() -> None:
        for model in ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5") * 50:
            cost = pricer.price(usage, model).cost_usd
            with lock:
                results.add(cost)

    threads = [threading.Thread(target=work) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3


@pytest.mark.parametrize(
    ("prompt", "completion", "cache_read"),
    [
        (199_000, 999, 0),  # just below the 200k tier: the base rate, computed linearly
        (150_000, 60_000, 100_000),  # tokens in all past 200k: genai-prices' own calculation
        (200_001, 10, 0),  # the prompt crosses the tier: every token at the higher rate
        (12_345, 678, 9_000),
    ],
)
def test_tiered_prices_are_exact_on_both_sides_of_the_tier(
    prompt: int, completion: int, cache_read: int
) -> None:
    reference = Usage(input_tokens=prompt, output_tokens=completion, cache_read_tokens=cache_read)
    expected = calc_price(reference, model_ref="claude-sonnet-4-5", provider_id="anthropic")
    usage = TokenUsage(
        prompt_tokens=prompt, completion_tokens=completion, cache_read_tokens=cache_read
    )
    pricer = Pricer()
    for _ in range(2):  # the first call fills the cache; the second uses it
        assert pricer.price(usage, "claude-sonnet-4-5", "anthropic").cost_usd == (
            expected.total_price
        )
