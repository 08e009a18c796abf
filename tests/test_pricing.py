"""Pricing: genai-prices' numbers, computed from cached rates; overrides; unknown models."""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone
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


NOON = datetime(2026, 1, 5, 12, 0, tzinfo=timezone.utc)
TIERED = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)  # tier prices since 2026-10-12


def _rate(model: str, provider: str, key: str, at: datetime = NOON) -> Decimal:
    """genai-prices' published USD per 1M of ``key`` (or per 1K requests)."""
    from genai_prices import data_snapshot

    info = data_snapshot.get_snapshot().find_provider_model(model, None, provider, None)[1]
    value = getattr(info.get_prices(at), key)
    assert isinstance(value, Decimal), (model, key, value)
    return value


def test_a_fine_tune_is_never_priced_as_its_base_model(caplog: pytest.LogCaptureFixture) -> None:
    pricer = Pricer()
    usage = TokenUsage(prompt_tokens=1_000_000)
    with caplog.at_level(logging.WARNING, logger="usage_callbacks"):
        results = [pricer.price(usage, "ft:o4-mini-2025-04-16:acme::abc123", "openai", NOON)]
        results += [pricer.price(usage, "ft:o4-mini-2025-04-16:acme::abc123", "openai", NOON)]
    assert all(not r.known and r.cost_usd == 0 for r in results)
    assert sum("fine-tune" in message for message in caplog.messages) == 1
    # a fine-tune the price database publishes is priced at that price
    published = pricer.price(usage, "ft:gpt-4o-mini-2024-07-18:acme::x", "openai", NOON)
    assert published.known
    assert published.cost_usd == _rate("ft:gpt-4o-mini-2024-07-18:acme::x", "openai", "input_mtok")
    assert published.cost_usd != pricer.price(usage, "gpt-4o-mini", "openai", NOON).cost_usd


def test_per_request_fees_are_charged_once_per_call() -> None:
    usage = TokenUsage(prompt_tokens=100, completion_tokens=100)
    tokens = (
        100 * _rate("sonar", "perplexity", "input_mtok")
        + 100 * _rate("sonar", "perplexity", "output_mtok")
    ) / 1_000_000
    fee = _rate("sonar", "perplexity", "requests_kcount") / 1_000
    assert Pricer().price(usage, "sonar", "perplexity", NOON).cost_usd == tokens + fee


def test_time_of_day_prices_follow_each_call() -> None:
    pricer = Pricer()
    usage = TokenUsage(prompt_tokens=1_000_000)
    peak = datetime(2026, 1, 5, 3, 0, tzinfo=timezone.utc)
    off_peak = datetime(2026, 1, 5, 17, 0, tzinfo=timezone.utc)  # 16:30-00:30 UTC
    costs = [
        pricer.price(usage, "deepseek-chat", "deepseek", at).cost_usd
        for at in (peak, off_peak, peak)
    ]
    assert costs[0] == costs[2] == _rate("deepseek-chat", "deepseek", "input_mtok", peak)
    assert costs[1] == _rate("deepseek-chat", "deepseek", "input_mtok", off_peak) < costs[0]


def test_anthropic_cache_writes_are_priced_by_ttl() -> None:
    def cost(write_1h: int) -> Decimal:
        usage = TokenUsage(
            prompt_tokens=1_000_000,
            cache_write_tokens=1_000_000,
            cache_write_1h_tokens=write_1h,
        )
        return Pricer().price(usage, "claude-opus-4-1", "anthropic", NOON).cost_usd

    base = _rate("claude-opus-4-1", "anthropic", "input_mtok")
    assert cost(0) == base * Decimal("1.25")
    assert cost(1_000_000) == base * 2


def test_the_service_tier_is_priced() -> None:
    def cost(tier: str | None) -> Decimal:
        usage = TokenUsage(prompt_tokens=1_000_000, service_tier=tier)
        return Pricer().price(usage, "o3", "openai", TIERED).cost_usd

    assert cost("flex") == _rate("o3", "openai", "input_mtok", TIERED) / 2 == cost(None) / 2
    assert cost("priority") > cost(None)


@pytest.mark.parametrize(
    ("model", "provider", "usage", "key"),
    [
        ("gpt-audio", "openai", {"input_audio_tokens": 1_000_000}, "input_audio_mtok"),
        ("gpt-audio", "openai", {"output_audio_tokens": 1_000_000}, "output_audio_mtok"),
        (
            "gemini-2.5-flash-image",
            "google",
            {"output_image_tokens": 1_000_000},
            "output_image_mtok",
        ),
    ],
)
def test_audio_and_image_tokens_at_their_own_rates(
    model: str, provider: str, usage: dict[str, int], key: str
) -> None:
    whole = "prompt_tokens" if key.startswith("input") else "completion_tokens"
    priced = Pricer().price(TokenUsage(**{whole: 1_000_000}, **usage), model, provider, NOON)
    assert priced.cost_usd == _rate(model, provider, key)


def test_web_searches_are_priced_per_request() -> None:
    usage = TokenUsage(prompt_tokens=1_000, web_search_requests=3)
    plain = TokenUsage(prompt_tokens=1_000)
    pricer = Pricer()
    extra = (
        pricer.price(usage, "claude-sonnet-4-5", "anthropic", NOON).cost_usd
        - pricer.price(plain, "claude-sonnet-4-5", "anthropic", NOON).cost_usd
    )
    assert extra == 3 * _rate("claude-sonnet-4-5", "anthropic", "web_searches_kcount") / 1_000
