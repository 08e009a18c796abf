"""Cost of a TokenUsage, from genai-prices, cached per model; user overrides win.

genai-prices resolves a model's price in ~70 µs. Most prices are linear per token kind,
so the per-token rates are asked of genai-prices once per (provider, model, day) and a
call is then priced by a dot product in microseconds. Tiered prices (a rate that depends
on the prompt length) are linear below their first tier too: calls with fewer tokens in
all than the first tier starts use the base rates; larger ones go through genai-prices'
full calculation.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import date, datetime, timezone
from decimal import Decimal
from typing import Any, NamedTuple

from genai_prices import Usage, data_snapshot
from genai_prices.types import TieredPrices
from pydantic import BaseModel, ConfigDict, Field

from usage_callbacks.usage import TokenUsage

logger = logging.getLogger("usage_callbacks")

_MTOK = Decimal(1_000_000)


class ModelPrice(BaseModel):
    """A user-supplied price in USD per 1M tokens; missing cache rates fall back to input."""

    model_config = ConfigDict(frozen=True)

    input_per_mtok: Decimal = Field(ge=0)
    output_per_mtok: Decimal = Field(default=Decimal(0), ge=0)
    cache_read_per_mtok: Decimal | None = Field(default=None, ge=0)
    cache_write_per_mtok: Decimal | None = Field(default=None, ge=0)
    embedding_per_mtok: Decimal | None = Field(default=None, ge=0)

    def rates(self) -> _Rates:
        return _Rates(
            input=self.input_per_mtok / _MTOK,
            output=self.output_per_mtok / _MTOK,
            cache_read=_or(self.cache_read_per_mtok, self.input_per_mtok) / _MTOK,
            cache_write=_or(self.cache_write_per_mtok, self.input_per_mtok) / _MTOK,
            embedding=_or(self.embedding_per_mtok, self.input_per_mtok) / _MTOK,
        )


def _or(value: Decimal | None, default: Decimal) -> Decimal:
    return default if value is None else value


class PriceTable(BaseModel):
    """User price overrides: ``{"my-model": ModelPrice(...)}`` or ``"provider:model"`` keys."""

    prices: dict[str, ModelPrice] = Field(default_factory=dict)

    def lookup(self, model: str, provider: str | None) -> ModelPrice | None:
        if provider and (price := self.prices.get(f"{provider}:{model}")) is not None:
            return price
        return self.prices.get(model)


@dataclass(frozen=True)
class _Rates:
    """USD per single token of each kind."""

    input: Decimal
    output: Decimal
    cache_read: Decimal
    cache_write: Decimal
    embedding: Decimal

    def cost(self, usage: TokenUsage) -> Decimal:
        counts: dict[str, int] = usage.__dict__
        cache_read, cache_write = counts["cache_read_tokens"], counts["cache_write_tokens"]
        cost: Decimal = (counts["prompt_tokens"] - cache_read - cache_write) * self.input
        # most calls have no cached or embedding part: skip those Decimal products
        if cache_read:
            cost += cache_read * self.cache_read
        if cache_write:
            cost += cache_write * self.cache_write
        if counts["completion_tokens"]:
            cost += counts["completion_tokens"] * self.output
        if counts["embedding_tokens"]:
            cost += counts["embedding_tokens"] * self.embedding
        return cost


class PricedUsage(NamedTuple):
    cost_usd: Decimal
    known: bool


@dataclass(frozen=True)
class _CatalogPrice:
    """genai-prices' price for one model on one day: linear rates, valid for calls whose
    every token count is below ``tiered_from`` (None: no tiers, valid always); beyond
    it, the tiered price goes through genai-prices' full calculation."""

    rates: _Rates
    model_price: Any
    tiered_from: int | None = None

    def cost(self, usage: TokenUsage) -> Decimal:
        if self.tiered_from is None or usage.total < self.tiered_from:
            return self.rates.cost(usage)
        return _tiered_cost(self.model_price, usage)


#: When a model is sold by several providers and none was named, price it at its maker's.
_MAKERS = ("openai", "anthropic", "google", "mistral", "cohere", "deepseek", "x-ai", "groq")


def _find_model(model: str, provider: str | None) -> Any | None:
    """genai-prices' model info: by provider, else by model alone, else by any provider
    listing it (embedding models have no provider-wide match rule)."""
    snapshot = data_snapshot.get_snapshot()
    for provider_id in dict.fromkeys((provider, None)):
        try:
            return snapshot.find_provider_model(model, None, provider_id, None)[1]
        except LookupError:
            continue
    sellers = {
        seller.id: info
        for seller in snapshot.providers
        for info in seller.models
        if info.is_match(model)
    }
    for maker in (*_MAKERS, *sellers):
        if maker in sellers:
            return sellers[maker]
    return None


def _catalog_price(model: str, provider: str | None, day: date) -> _CatalogPrice | None:
    info = _find_model(model, provider)
    if info is None:
        return None
    when = datetime(day.year, day.month, day.day, 12, tzinfo=timezone.utc)
    model_price = info.get_prices(when)
    tier_starts = [
        tier.start
        for value in vars(model_price).values()
        if isinstance(value, TieredPrices)
        for tier in value.tiers
    ]
    tiered_from = min(tier_starts) if tier_starts else None
    # rates probed below every tier: the base rate of a tiered price is linear there
    probe = min(1_000_000, tiered_from // 2) if tiered_from else 1_000_000

    def rate(**counts: int) -> Decimal:
        return Decimal(model_price.calc_price(Usage(**counts))["total_price"]) / probe

    base = rate(input_tokens=probe)
    rates = _Rates(
        input=base,
        output=rate(output_tokens=probe),
        cache_read=rate(input_tokens=probe, cache_read_tokens=probe),
        cache_write=rate(input_tokens=probe, cache_write_tokens=probe),
        embedding=base,
    )
    return _CatalogPrice(rates=rates, model_price=model_price, tiered_from=tiered_from)


def _tiered_cost(model_price: Any, usage: TokenUsage) -> Decimal:
    counts = Usage(
        input_tokens=usage.prompt_tokens + usage.embedding_tokens,
        output_tokens=usage.completion_tokens,
        cache_read_tokens=usage.cache_read_tokens,
        cache_write_tokens=usage.cache_write_tokens,
    )
    return Decimal(model_price.calc_price(counts)["total_price"])


class Pricer:
    """Prices usages; thread-safe; warns once per unknown model."""

    def __init__(self, overrides: PriceTable | dict[str, ModelPrice] | None = None) -> None:
        if isinstance(overrides, dict):
            overrides = PriceTable(prices=overrides)
        self._overrides = overrides or PriceTable()
        self._cache: dict[tuple[str, str | None, date], _CatalogPrice | None] = {}
        self._lock = threading.Lock()
        self._warned: set[tuple[str, str | None]] = set()

    def price(
        self,
        usage: TokenUsage,
        model: str | None,
        provider: str | None = None,
        at: datetime | None = None,
    ) -> PricedUsage:
        """Cost in USD at the prices of ``at`` (default now); unknown models cost 0 with
        ``known=False`` and never raise."""
        if not model:
            return _UNPRICED
        if self._overrides.prices:
            override = self._overrides.lookup(model, provider)
            if override is not None:
                return PricedUsage(override.rates().cost(usage), True)
        catalog = self._catalog(model, provider, (at or datetime.now(timezone.utc)).date())
        if catalog is None:
            return _UNPRICED
        return PricedUsage(catalog.cost(usage), True)

    def _catalog(self, model: str, provider: str | None, day: date) -> _CatalogPrice | None:
        key = (model, provider, day)
        try:
            return self._cache[key]
        except KeyError:
            pass
        try:
            catalog = _catalog_price(model, provider, day)
        except Exception:
            logger.warning("genai-prices failed for model %r", model, exc_info=True)
            catalog = None
        with self._lock:
            self._cache[key] = catalog
            if catalog is None and (model, provider) not in self._warned:
                self._warned.add((model, provider))
                logger.warning(
                    "no price known for model %r (provider %r); recording cost 0 with "
                    "cost_known=False. Pass prices={%r: ModelPrice(...)} to price it.",
                    model,
                    provider,
                    model,
                )
        return catalog


_UNPRICED = PricedUsage(Decimal(0), False)
_default_pricer = Pricer()


def price(usage: TokenUsage, model: str | None, provider: str | None = None) -> Decimal:
    """Cost of ``usage`` on ``model`` in USD by genai-prices (0 when the model is unknown)."""
    return _default_pricer.price(usage, model, provider).cost_usd


def calculate_cost(
    prompt_tokens: int,
    completion_tokens: int,
    cost_per_1k_input: Decimal | float | str,
    cost_per_1k_output: Decimal | float | str,
) -> Decimal:
    """Hand pricing: tokens times the per-1K rates, exact in Decimal."""
    if prompt_tokens < 0 or completion_tokens < 0:
        raise ValueError("token counts must be non-negative")
    return (
        prompt_tokens * Decimal(str(cost_per_1k_input))
        + completion_tokens * Decimal(str(cost_per_1k_output))
    ) / Decimal(1000)
