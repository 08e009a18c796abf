"""Cost of a TokenUsage, from genai-prices at the call's time and tier; overrides win.

genai-prices finds a model in ~70 µs and prices a usage in ~30 µs. The model is found
once per (model, provider); each of its price objects (one per date range, time of day
and request variant such as a service tier, as genai-prices chooses them for the call's
time) is read once into per-part rates and a per-request fee by genai-prices' own
calculation of one unit of each part; a call is then priced by a dot product in about
a microsecond. A price is linear in the counts except for tiers (a rate chosen by the
input size): calls below the first tier use the base rates, larger ones genai-prices'
full calculation.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any, NamedTuple

from genai_prices import Usage, data_snapshot
from genai_prices.types import StartDateConstraint, TieredPrices, TimeOfDateConstraint
from genai_prices.units import _get_registry
from pydantic import BaseModel, ConfigDict, Field

from usage_callbacks.usage import COUNT_FIELDS, TokenUsage

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
        """Audio, image and tool-use prompt parts at the input rate, reasoning and the
        audio and image output at the output rate; both cache writes at one rate."""
        input_rate = self.input_per_mtok / _MTOK
        output_rate = self.output_per_mtok / _MTOK
        cache_write = _or(self.cache_write_per_mtok, self.input_per_mtok) / _MTOK
        return _Rates(
            input=input_rate,
            output=output_rate,
            cache_read=_or(self.cache_read_per_mtok, self.input_per_mtok) / _MTOK,
            cache_write_5m=cache_write,
            cache_write_1h=cache_write,
            input_audio=input_rate,
            input_image=input_rate,
            tool_prompt=input_rate,
            reasoning=output_rate,
            output_audio=output_rate,
            output_image=output_rate,
            web_search=Decimal(0),
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
    """USD per unit of each disjoint part of a usage, and per request.

    Linear in the counts, as genai-prices' calculation is for a price without tiers: the
    parts a price does not name are charged at the rate of the kind they belong to (a
    5-minute cache write without its own rate at the cache-write rate, else at input).
    """

    input: Decimal
    output: Decimal
    cache_read: Decimal
    cache_write_5m: Decimal
    cache_write_1h: Decimal
    input_audio: Decimal
    input_image: Decimal
    tool_prompt: Decimal
    reasoning: Decimal
    output_audio: Decimal
    output_image: Decimal
    web_search: Decimal
    embedding: Decimal
    request: Decimal = Decimal(0)
    #: Each part (a TokenUsage field) whose rate differs from the plain rate of its
    #: whole, with the difference (a part's tokens are priced with the whole, then moved
    #: by it); parts at their whole's rate cost nothing more and are not looked at.
    parts: tuple[tuple[str, Decimal], ...] = field(init=False)
    #: Cost of ``counts`` (a TokenUsage's ``__dict__``): the variant for this price
    #: (measured 0.49 -> 0.31 us against testing all nine parts and the fee each call).
    cost: Callable[[dict[str, Any]], Decimal] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        over = {
            "cache_read_tokens": self.cache_read - self.input,
            "cache_write_tokens": self.cache_write_5m - self.input,
            "cache_write_1h_tokens": self.cache_write_1h - self.cache_write_5m,
            "input_audio_tokens": self.input_audio - self.input,
            "input_image_tokens": self.input_image - self.input,
            "tool_prompt_tokens": self.tool_prompt - self.input,
            "reasoning_tokens": self.reasoning - self.output,
            "output_audio_tokens": self.output_audio - self.output,
            "output_image_tokens": self.output_image - self.output,
            "embedding_tokens": self.embedding,
            "web_search_requests": self.web_search,
        }
        parts = tuple((name, rate) for name, rate in over.items() if rate)
        object.__setattr__(self, "parts", parts)
        object.__setattr__(self, "cost", self._cost_and_fee if self.request else self._cost)

    def _cost(self, counts: dict[str, Any]) -> Decimal:
        cost: Decimal = counts["prompt_tokens"] * self.input
        if completion := counts["completion_tokens"]:
            cost += completion * self.output
        for name, rate in self.parts:
            if count := counts[name]:
                cost += count * rate
        return cost

    def _cost_and_fee(self, counts: dict[str, Any]) -> Decimal:
        return self._cost(counts) + self.request


class PricedUsage(NamedTuple):
    cost_usd: Decimal
    known: bool


#: Builds a PricedUsage without NamedTuple's Python-level ``__new__`` (0.24 -> 0.14 us).
_tuple = tuple.__new__


#: Registry usage keys genai-prices could infer from ours and refuse as ambiguous
#: (cached audio: the join of a cache read and audio); ours are disjoint parts, so 0.
_DISJOINT_ZEROS = {key: 0 for key in _get_registry().units if key != "requests"}


def genai_usage(counts: dict[str, Any]) -> Usage:
    """genai-prices' Usage for a TokenUsage's ``__dict__``: the same parts, disjoint."""
    write_1h = counts["cache_write_1h_tokens"]
    return Usage(
        **{
            **_DISJOINT_ZEROS,
            "input_tokens": counts["prompt_tokens"] + counts["embedding_tokens"],
            "output_tokens": counts["completion_tokens"],
            "cache_read_tokens": counts["cache_read_tokens"],
            "cache_write_tokens": counts["cache_write_tokens"],
            "cache_write_5m_tokens": counts["cache_write_tokens"] - write_1h,
            "cache_write_1h_tokens": write_1h,
            "input_audio_tokens": counts["input_audio_tokens"],
            "input_image_tokens": counts["input_image_tokens"],
            "input_tool_tokens": counts["tool_prompt_tokens"],
            "output_reasoning_tokens": counts["reasoning_tokens"],
            "output_audio_tokens": counts["output_audio_tokens"],
            "output_image_tokens": counts["output_image_tokens"],
            "web_searches": counts["web_search_requests"],
        }
    )


#: One unit of each part, with the whole it belongs to: the probes that read a price's
#: rates out of genai-prices' own calculation.
_PROBES: dict[str, dict[str, int]] = {
    "input": {"prompt_tokens": 1},
    "output": {"completion_tokens": 1},
    "cache_read": {"prompt_tokens": 1, "cache_read_tokens": 1},
    "cache_write_5m": {"prompt_tokens": 1, "cache_write_tokens": 1},
    "cache_write_1h": {"prompt_tokens": 1, "cache_write_tokens": 1, "cache_write_1h_tokens": 1},
    "input_audio": {"prompt_tokens": 1, "input_audio_tokens": 1},
    "input_image": {"prompt_tokens": 1, "input_image_tokens": 1},
    "tool_prompt": {"prompt_tokens": 1, "tool_prompt_tokens": 1},
    "reasoning": {"completion_tokens": 1, "reasoning_tokens": 1},
    "output_audio": {"completion_tokens": 1, "output_audio_tokens": 1},
    "output_image": {"completion_tokens": 1, "output_image_tokens": 1},
    "web_search": {"web_search_requests": 1},
    "embedding": {"embedding_tokens": 1},
}
_NO_COUNTS = dict.fromkeys(COUNT_FIELDS, 0)


@dataclass(frozen=True)
class _CatalogPrice:
    """One genai-prices price object made fast: its linear rates, valid while the input
    stays at or below ``tiered_from`` (None: no tiers); above, the full calculation."""

    rates: _Rates
    model_price: Any
    tiered_from: int | None
    #: ``cost`` of the usage's ``__dict__``, without a call layer for untiered prices.
    cost_of: Callable[[dict[str, Any]], Decimal] = field(init=False)

    def __post_init__(self) -> None:
        plain = self.tiered_from is None
        object.__setattr__(self, "cost_of", self.rates.cost if plain else self.cost)

    @classmethod
    def of(cls, model_price: Any) -> _CatalogPrice:
        tier_starts = [
            tier.start
            for value in vars(model_price).values()
            if isinstance(value, TieredPrices)
            for tier in value.tiers
        ]
        tiered_from = min(tier_starts) if tier_starts else None
        if tiered_from is not None and tiered_from < 1:  # the probes would be in a tier
            tiered_from = -1

        def total(counts: dict[str, int]) -> Decimal:
            usage = genai_usage({**_NO_COUNTS, **counts})
            return Decimal(model_price.calc_price(usage)["total_price"])

        request = total({})
        rates = {name: total(probe) - request for name, probe in _PROBES.items()}
        return cls(_Rates(**rates, request=request), model_price, tiered_from)

    def cost(self, counts: dict[str, Any]) -> Decimal:
        if self.tiered_from is not None and (
            counts["prompt_tokens"] + counts["embedding_tokens"] > self.tiered_from
        ):
            return Decimal(self.model_price.calc_price(genai_usage(counts))["total_price"])
        return self.rates.cost(counts)


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


def _names_fine_tunes(match: Any, model: str) -> bool:
    """Whether a model's match rule has a clause of its own for fine-tunes (``ft:``)
    that ``model`` meets: a published fine-tune price, not the base model's."""
    children = getattr(match, "or_", None) or getattr(match, "and_", None)
    if children is not None:
        return any(_names_fine_tunes(child, model) for child in children)
    text = next((v for v in vars(match).values() if isinstance(v, str)), "")
    return "ft:" in text.lower() and bool(match.is_match(model.lower()))


_EVER = (
    datetime.min.replace(tzinfo=timezone.utc),
    datetime.max.replace(tzinfo=timezone.utc),
)


@dataclass
class _CatalogModel:
    """A model's genai-prices entry, and per service tier the price last chosen for a call
    with the span of time it stays chosen (from one price change to the next)."""

    info: Any
    #: (since, until, price); (None, None, price) for a price that never changes.
    chosen: dict[str | None, tuple[Any, Any, _CatalogPrice]] = field(default_factory=dict)
    #: The cost function of the untiered-request price, when it never changes.
    fixed: Callable[[dict[str, Any]], Decimal] | None = None

    def unchanged_around(self, when: datetime, tier: str | None) -> tuple[datetime, datetime]:
        """The span around ``when`` in which no dated or time-of-day price (of ``tier``,
        when it has one) changes; an empty span for a constraint of a kind not known here."""
        prices = self.info.prices if isinstance(self.info.prices, list) else ()
        variants = (self.info.price_variants or ()) if tier else ()
        constraints = [
            *(price.constraint for price in prices),
            *(variant.constraint for variant in variants),
        ]
        changes: list[datetime] = []
        for constraint in constraints:
            if constraint is None:
                continue
            if isinstance(constraint, StartDateConstraint):
                changes.append(datetime.combine(constraint.start_date, time(), timezone.utc))
            elif isinstance(constraint, TimeOfDateConstraint):
                for day in (-1, 0, 1):
                    date = when.date() + timedelta(days=day)
                    for moment in (constraint.start_time, constraint.end_time):
                        at = datetime.combine(date, moment)
                        changes.append(at if at.tzinfo else at.replace(tzinfo=timezone.utc))
            else:
                return when, when
        return (
            max((at for at in changes if at <= when), default=_EVER[0]),
            min((at for at in changes if at > when), default=_EVER[1]),
        )


class Pricer:
    """Prices usages; thread-safe; warns once per unknown model."""

    def __init__(self, overrides: PriceTable | dict[str, ModelPrice] | None = None) -> None:
        if isinstance(overrides, dict):
            overrides = PriceTable(prices=overrides)
        self._overrides = overrides or PriceTable()
        self._models: dict[tuple[str, str | None], _CatalogModel | None] = {}
        #: By (id of the price object of the time, the request's price variants).
        self._prices: dict[tuple[int, tuple[int, ...]], tuple[Any, _CatalogPrice]] = {}
        self._failed: set[str] = set()
        self._lock = threading.Lock()

    def price(
        self,
        usage: TokenUsage,
        model: str | None,
        provider: str | None = None,
        at: datetime | None = None,
    ) -> PricedUsage:
        """Cost in USD at the prices of ``at`` (default now; naive is UTC) and of the
        usage's service tier; unknown models cost 0 with ``known=False``, never raise."""
        if not model:
            return _UNPRICED
        if self._overrides.prices:
            override = self._overrides.lookup(model, provider)
            if override is not None:
                return PricedUsage(override.rates().cost(usage.__dict__), True)
        try:
            entry = self._models[model, provider]
        except KeyError:
            entry = self._find(model, provider)
        if entry is None:
            return _UNPRICED
        tier = usage.service_tier
        if tier is None and entry.fixed is not None:  # the usual case, kept short
            return _tuple(PricedUsage, (entry.fixed(usage.__dict__), True))
        chosen = entry.chosen.get(tier)
        if chosen is not None and chosen[0] is None:  # a price that never changes
            catalog = chosen[2]
        else:
            when = datetime.now(timezone.utc) if at is None else at
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            if chosen is not None and chosen[0] <= when < chosen[1]:
                catalog = chosen[2]
            else:
                found = self._choose(entry, when, tier)
                if found is None:
                    return _UNPRICED
                catalog = found
        return _tuple(PricedUsage, (catalog.cost_of(usage.__dict__), True))

    def _choose(
        self, entry: _CatalogModel, when: datetime, tier: str | None
    ) -> _CatalogPrice | None:
        """The price of ``entry`` at ``when`` for ``tier``, chosen as genai-prices chooses
        it (dated, time-of-day and request-variant prices), made fast once per price."""
        try:
            return self._chosen(entry, when, tier)
        except Exception:  # genai-prices' data is outside our control; never fail the call
            with self._lock:
                first = entry.info.id not in self._failed
                self._failed.add(entry.info.id)
            if first:
                logger.warning("genai-prices failed for model %r", entry.info.id, exc_info=True)
            return None

    def _chosen(self, entry: _CatalogModel, when: datetime, tier: str | None) -> _CatalogPrice:
        info = entry.info
        standard = info.get_prices(when)
        context = {"service_tier": tier} if tier else {}
        variants = tuple(
            index
            for index, variant in enumerate((context and info.price_variants) or ())
            if (variant.constraint is None or variant.constraint.active(when))
            and all(context.get(key) == value for key, value in variant.when.items())
        )
        key = (id(standard), variants)
        cached = self._prices.get(key)
        if cached is None:
            resolved = info.get_prices(when, context) if variants else standard
            cached = (standard, _CatalogPrice.of(resolved))  # standard kept: its id stays
            with self._lock:
                self._prices[key] = cached
        span = entry.unchanged_around(when, tier)
        if span == _EVER:
            entry.chosen[tier] = (None, None, cached[1])
            if tier is None:
                entry.fixed = cached[1].cost_of
        else:
            entry.chosen[tier] = (*span, cached[1])
        return cached[1]

    def _find(self, model: str, provider: str | None) -> _CatalogModel | None:
        entry: _CatalogModel | None = None
        reason = "no price known"
        try:
            info = _find_model(model, provider)
            fine_tune = model.lower().startswith("ft:")
            if info is not None and fine_tune and not _names_fine_tunes(info.match, model):
                info, reason = None, "no published fine-tune price (the base model's "
                reason += "price is not used for a fine-tuned model)"
            entry = None if info is None else _CatalogModel(info)
        except Exception:  # genai-prices' data is outside our control; never fail the call
            logger.warning("genai-prices failed for model %r", model, exc_info=True)
        with self._lock:
            first = (model, provider) not in self._models
            self._models[model, provider] = entry
        if entry is None and first:
            logger.warning(
                "%s for model %r (provider %r); recording cost 0 with cost_known=False. "
                "Pass prices={%r: ModelPrice(...)} to price it.",
                reason,
                model,
                provider,
                model,
            )
        return entry


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
