"""The one normalized usage shape (readers.py turns provider payloads into it).

Semantics (see DESIGN.md): ``prompt_tokens`` includes cache reads and writes and the
uncached audio, image and tool-use prompt tokens; ``completion_tokens`` includes reasoning
and the audio and image output; ``total_tokens`` is prompt + completion + embedding.
Per-request units (web searches) are counted beside the tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from decimal import Decimal
from functools import lru_cache
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

logger = logging.getLogger("usage_callbacks")

#: Far beyond any real call (the largest context windows hold ~10^7 tokens); anything
#: above is a bug upstream. Small enough that every column and every sum fits a BIGINT:
#: 3 x 10^9 calls at the maximum still sum below 2^63.
MAX_TOKENS_PER_CALL = 10**9
#: The most one call can cost (10^17 pico-USD; real calls cost under $10^4), so that one
#: absurd report cannot overflow the ledger's and the summaries' BIGINT sums.
MAX_COST_PER_CALL_USD = Decimal(10**5)

TokenCount = Annotated[int, Field(ge=0, le=MAX_TOKENS_PER_CALL, strict=True)]
CallType = Literal["chat", "completion", "embedding"]


M = TypeVar("M", bound=BaseModel)


def trusted_instance(cls: type[M], fields: dict[str, Any]) -> M:
    """A model instance whose ``__dict__`` is ``fields``, complete and already valid.

    For the hot path only: pydantic's ``model_construct`` still walks every field
    (~3.4 µs for a TokenUsage); this costs ~1.5 µs and validates nothing.
    """
    instance = object.__new__(cls)
    object.__setattr__(instance, "__dict__", fields)
    object.__setattr__(instance, "__pydantic_fields_set__", set(fields))
    object.__setattr__(instance, "__pydantic_extra__", None)
    object.__setattr__(instance, "__pydantic_private__", None)
    return instance


class TokenUsage(BaseModel):
    """Token counts and cost of one call, or a sum of calls."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt_tokens: TokenCount = 0
    completion_tokens: TokenCount = 0
    embedding_tokens: TokenCount = 0
    cache_read_tokens: TokenCount = 0
    cache_write_tokens: TokenCount = 0
    #: The part of ``cache_write_tokens`` cached for an hour (the rest: 5 minutes).
    cache_write_1h_tokens: TokenCount = 0
    reasoning_tokens: TokenCount = 0
    #: Uncached audio/image prompt parts (cached tokens count as cache reads whatever
    #: their modality), and the audio/image parts of the completion.
    input_audio_tokens: TokenCount = 0
    output_audio_tokens: TokenCount = 0
    input_image_tokens: TokenCount = 0
    output_image_tokens: TokenCount = 0
    #: Prompt tokens a provider-run tool added (Gemini's ``tool_use_prompt_token_count``).
    tool_prompt_tokens: TokenCount = 0
    #: Server-side web searches, billed per request beside the tokens.
    web_search_requests: TokenCount = 0
    total_tokens: TokenCount | None = None
    cost_estimate_usd: Annotated[
        Decimal, Field(ge=0, le=MAX_COST_PER_CALL_USD, allow_inf_nan=False)
    ] = Decimal(0)
    estimated: bool = False
    #: The provider's service tier when it prices differently ("flex", "priority").
    service_tier: str | None = Field(default=None, max_length=32)

    @model_validator(mode="before")
    @classmethod
    def _reject_bools(cls, data: Any) -> Any:
        # bool is an int subclass; a True token count is always a caller's mistake.
        if isinstance(data, Mapping):
            for key, value in data.items():
                if key != "estimated" and isinstance(value, bool):
                    raise ValueError(f"{key} must be an integer, not {value!r}")
        return data

    @model_validator(mode="after")
    def _check_parts(self) -> TokenUsage:
        problem = _parts_problem(self.__dict__)
        if problem:
            raise ValueError(problem)
        total = self.prompt_tokens + self.completion_tokens + self.embedding_tokens
        if self.total_tokens is None:
            object.__setattr__(self, "total_tokens", total)
        elif self.total_tokens != total:
            raise ValueError(
                f"total_tokens={self.total_tokens} but prompt + completion + embedding = {total}; "
                "leave total_tokens out to have it computed"
            )
        return self

    @property
    def total(self) -> int:
        """``total_tokens`` as a plain int (it is always set after validation)."""
        return self.total_tokens or 0

    def __add__(self, other: object) -> TokenUsage:
        if not isinstance(other, TokenUsage):
            return NotImplemented
        mine, theirs = self.__dict__, other.__dict__
        fields = {name: mine[name] + theirs[name] for name in _SUMMED_FIELDS}
        fields["total_tokens"] = self.total + other.total
        fields["estimated"] = mine["estimated"] or theirs["estimated"]
        tier = mine["service_tier"]
        fields["service_tier"] = tier if tier == theirs["service_tier"] else None
        return trusted_instance(TokenUsage, fields)

    def __radd__(self, other: object) -> TokenUsage:
        if other == 0:  # sum() starts from 0
            return self
        return self.__add__(other)

    def with_cost(self, cost_usd: Decimal) -> TokenUsage:
        """The same counts at another price."""
        return self.model_copy(update={"cost_estimate_usd": cost_usd})


_ZERO_USD = Decimal(0)
#: The counts, in the order they are stored and shown.
COUNT_FIELDS = (
    "prompt_tokens",
    "completion_tokens",
    "embedding_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cache_write_1h_tokens",
    "reasoning_tokens",
    "input_audio_tokens",
    "output_audio_tokens",
    "input_image_tokens",
    "output_image_tokens",
    "tool_prompt_tokens",
    "web_search_requests",
)
_SUMMED_FIELDS = (*COUNT_FIELDS, "cost_estimate_usd")


def _parts_problem(counts: dict[str, Any]) -> str | None:
    """What is wrong with the parts of ``counts``, or None."""
    prompt_parts = (
        counts["cache_read_tokens"]
        + counts["cache_write_tokens"]
        + counts["input_audio_tokens"]
        + counts["input_image_tokens"]
        + counts["tool_prompt_tokens"]
    )
    if prompt_parts > counts["prompt_tokens"]:
        return (
            "cache_read_tokens + cache_write_tokens + input_audio_tokens + input_image_tokens "
            "+ tool_prompt_tokens exceed prompt_tokens; prompt_tokens must include the cached "
            "parts (Anthropic's input_tokens does not: add them) and the other parts"
        )
    if counts["cache_write_1h_tokens"] > counts["cache_write_tokens"]:
        return "cache_write_1h_tokens exceed cache_write_tokens, which must include them"
    completion_parts = (
        counts["reasoning_tokens"] + counts["output_audio_tokens"] + counts["output_image_tokens"]
    )
    if completion_parts > counts["completion_tokens"]:
        return (
            "reasoning_tokens + output_audio_tokens + output_image_tokens exceed "
            "completion_tokens; completion_tokens must include reasoning and the other parts"
        )
    return None


def build_usage(
    *,
    prompt: int = 0,
    completion: int = 0,
    embedding: int = 0,
    cache_read: int = 0,
    cache_write: int = 0,
    cache_write_1h: int = 0,
    reasoning: int = 0,
    input_audio: int = 0,
    output_audio: int = 0,
    input_image: int = 0,
    output_image: int = 0,
    tool_prompt: int = 0,
    web_searches: int = 0,
    service_tier: str | None = None,
    estimated: bool = False,
) -> TokenUsage:
    """A TokenUsage from possibly inconsistent provider parts, clamped to the semantics.

    Providers sometimes report parts larger than the whole (a cache count above the
    prompt); the whole is kept and the parts are clamped in order, with a warning.
    """
    counts = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "embedding_tokens": embedding,
        "cache_read_tokens": cache_read,
        "cache_write_tokens": cache_write,
        "cache_write_1h_tokens": cache_write_1h,
        "reasoning_tokens": reasoning,
        "input_audio_tokens": input_audio,
        "output_audio_tokens": output_audio,
        "input_image_tokens": input_image,
        "output_image_tokens": output_image,
        "tool_prompt_tokens": tool_prompt,
        "web_search_requests": web_searches,
    }
    if _parts_problem(counts):
        logger.warning("usage parts exceed their whole, clamping: %s", counts)
        _clamp(counts, "prompt_tokens", _PROMPT_PARTS)
        _clamp(counts, "completion_tokens", _COMPLETION_PARTS)
        counts["cache_write_1h_tokens"] = min(cache_write_1h, counts["cache_write_tokens"])
    fields: dict[str, Any] = counts
    fields["total_tokens"] = prompt + completion + embedding
    fields["cost_estimate_usd"] = _ZERO_USD
    fields["estimated"] = estimated
    fields["service_tier"] = service_tier
    return trusted_instance(TokenUsage, fields)


_PROMPT_PARTS = (
    "cache_read_tokens",
    "cache_write_tokens",
    "tool_prompt_tokens",
    "input_audio_tokens",
    "input_image_tokens",
)
_COMPLETION_PARTS = ("reasoning_tokens", "output_audio_tokens", "output_image_tokens")


def _clamp(counts: dict[str, int], whole: str, parts: tuple[str, ...]) -> None:
    left = counts[whole]
    for part in parts:
        counts[part] = min(counts[part], left)
        left -= counts[part]


def with_estimated_prompt(usage: TokenUsage, prompt: int, model: str | None) -> TokenUsage:
    """``usage`` whose provider reported no input for a non-empty prompt (some
    Anthropic-compatible proxies report it only in a stream's ``message_start``), with
    the estimate ``prompt`` in its place and flagged; warns once per model."""
    if prompt <= 0:
        return usage
    _warn_missing_prompt(model)
    fields = dict(usage.__dict__)
    fields.update(prompt_tokens=prompt, total_tokens=usage.total + prompt, estimated=True)
    return trusted_instance(TokenUsage, fields)


@lru_cache(maxsize=1024)  # the cache is the "once": bounded, whatever the model names
def _warn_missing_prompt(model: str | None) -> None:
    logger.warning(
        "model %r reported 0 input tokens for a non-empty prompt; recording a tiktoken "
        "estimate of the prompt, flagged estimated",
        model,
    )
