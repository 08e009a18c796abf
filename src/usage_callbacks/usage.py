"""The one normalized usage shape, and the normalizers that turn provider payloads into it.

Semantics (see DESIGN.md): ``prompt_tokens`` includes cache reads and writes,
``completion_tokens`` includes reasoning, ``total_tokens`` is prompt + completion +
embedding. Normalizers are lenient: a bad value is logged and skipped, never raised,
because they run inside the user's LLM call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

logger = logging.getLogger("usage_callbacks")

#: Larger than any real single call (10^12 tokens); anything above is a bug upstream.
MAX_TOKENS_PER_CALL = 10**12

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
    reasoning_tokens: TokenCount = 0
    total_tokens: TokenCount | None = None
    cost_estimate_usd: Annotated[Decimal, Field(ge=0, le=10**9, allow_inf_nan=False)] = Decimal(0)
    estimated: bool = False

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
        if self.cache_read_tokens + self.cache_write_tokens > self.prompt_tokens:
            raise ValueError(
                "cache_read_tokens + cache_write_tokens exceed prompt_tokens; prompt_tokens "
                "must include the cached parts (Anthropic's input_tokens does not: add them)"
            )
        if self.reasoning_tokens > self.completion_tokens:
            raise ValueError(
                "reasoning_tokens exceed completion_tokens; completion_tokens must include "
                "reasoning"
            )
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
        return trusted_instance(TokenUsage, fields)

    def __radd__(self, other: object) -> TokenUsage:
        if other == 0:  # sum() starts from 0
            return self
        return self.__add__(other)

    def with_cost(self, cost_usd: Decimal) -> TokenUsage:
        """The same counts at another price."""
        return self.model_copy(update={"cost_estimate_usd": cost_usd})


_ZERO_USD = Decimal(0)
_SUMMED_FIELDS = (
    "prompt_tokens",
    "completion_tokens",
    "embedding_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "cost_estimate_usd",
)


# --------------------------------------------------------------------------- normalizers


def _field(obj: Any, *path: str) -> Any:
    """Read ``obj[a][b]`` or ``obj.a.b``; None when any step is missing."""
    for key in path:
        if obj is None:
            return None
        # type() first: most payloads are plain dicts, and the ABC check is slower
        if type(obj) is dict or isinstance(obj, Mapping):
            obj = obj.get(key)
        else:
            obj = getattr(obj, key, None)
    return obj


def _count(obj: Any, *path: str) -> int:
    """A token count from a provider payload, or 0 (with a warning) when unusable."""
    value = _field(obj, *path)
    if type(value) is int and 0 <= value <= MAX_TOKENS_PER_CALL:
        return value  # the usual case, before the checks for every odd shape below
    if value is None:
        return 0
    if isinstance(value, bool):
        logger.warning("ignoring boolean token count %s=%r", ".".join(path), value)
        return 0
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            logger.warning("ignoring non-numeric token count %s=%r", ".".join(path), value)
            return 0
    if isinstance(value, float):
        if not value.is_integer():
            logger.warning("ignoring fractional token count %s=%r", ".".join(path), value)
            return 0
        value = int(value)
    if not isinstance(value, int):
        logger.warning("ignoring token count %s of type %s", ".".join(path), type(value).__name__)
        return 0
    if value < 0 or value > MAX_TOKENS_PER_CALL:
        logger.warning("ignoring out-of-range token count %s=%r", ".".join(path), value)
        return 0
    return value


def _has_any(obj: Any, keys: Iterable[str]) -> bool:
    return any(_field(obj, key) is not None for key in keys)


def build_usage(
    *,
    prompt: int = 0,
    completion: int = 0,
    embedding: int = 0,
    cache_read: int = 0,
    cache_write: int = 0,
    reasoning: int = 0,
    estimated: bool = False,
) -> TokenUsage:
    """A TokenUsage from possibly inconsistent provider parts, clamped to the semantics.

    Providers sometimes report parts larger than the whole (a cache count above the
    prompt); the whole is kept and the parts are clamped, with a warning.
    """
    if cache_read + cache_write > prompt:
        logger.warning(
            "cached tokens (%d read + %d write) exceed prompt tokens (%d); clamping",
            cache_read,
            cache_write,
            prompt,
        )
        cache_read = min(cache_read, prompt)
        cache_write = min(cache_write, prompt - cache_read)
    if reasoning > completion:
        logger.warning(
            "reasoning tokens (%d) exceed completion (%d); clamping", reasoning, completion
        )
        reasoning = completion
    return trusted_instance(
        TokenUsage,
        {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "embedding_tokens": embedding,
            "cache_read_tokens": cache_read,
            "cache_write_tokens": cache_write,
            "reasoning_tokens": reasoning,
            "total_tokens": prompt + completion + embedding,
            "cost_estimate_usd": _ZERO_USD,
            "estimated": estimated,
        },
    )


def usage_from_openai(usage: Any) -> TokenUsage:
    """OpenAI Chat Completions (and Responses API) ``usage``."""
    if _has_any(usage, ("input_tokens", "output_tokens")):  # Responses API
        return build_usage(
            prompt=_count(usage, "input_tokens"),
            completion=_count(usage, "output_tokens"),
            cache_read=_count(usage, "input_tokens_details", "cached_tokens"),
            reasoning=_count(usage, "output_tokens_details", "reasoning_tokens"),
        )
    return build_usage(
        prompt=_count(usage, "prompt_tokens"),
        completion=_count(usage, "completion_tokens"),
        cache_read=_count(usage, "prompt_tokens_details", "cached_tokens"),
        reasoning=_count(usage, "completion_tokens_details", "reasoning_tokens"),
    )


def usage_from_openai_embedding(usage: Any) -> TokenUsage:
    """OpenAI embeddings ``usage``: ``prompt_tokens`` are the embedded tokens."""
    return build_usage(embedding=_count(usage, "prompt_tokens") or _count(usage, "total_tokens"))


def usage_from_anthropic(usage: Any) -> TokenUsage:
    """Anthropic ``usage``: ``input_tokens`` excludes the cached parts, so add them in."""
    cache_read = _count(usage, "cache_read_input_tokens")
    cache_write = _count(usage, "cache_creation_input_tokens")
    return build_usage(
        prompt=_count(usage, "input_tokens") + cache_read + cache_write,
        completion=_count(usage, "output_tokens"),
        cache_read=cache_read,
        cache_write=cache_write,
    )


def usage_from_langchain(usage_metadata: Any) -> TokenUsage:
    """LangChain ``UsageMetadata`` (input includes cache parts; output includes reasoning)."""
    if type(usage_metadata) is dict and not (
        usage_metadata.get("input_token_details") or usage_metadata.get("output_token_details")
    ):  # the common shape, read without the per-field checks of _count for odd values
        prompt = usage_metadata.get("input_tokens")
        completion = usage_metadata.get("output_tokens")
        if (
            type(prompt) is int
            and type(completion) is int
            and 0 <= prompt <= MAX_TOKENS_PER_CALL
            and 0 <= completion <= MAX_TOKENS_PER_CALL
        ):
            return build_usage(prompt=prompt, completion=completion)
    return build_usage(
        prompt=_count(usage_metadata, "input_tokens"),
        completion=_count(usage_metadata, "output_tokens"),
        cache_read=_count(usage_metadata, "input_token_details", "cache_read"),
        cache_write=_count(usage_metadata, "input_token_details", "cache_creation"),
        reasoning=_count(usage_metadata, "output_token_details", "reasoning"),
    )


def _gemini(usage: Any, snake: str, camel: str) -> int:
    return _count(usage, snake) or _count(usage, camel)


def usage_from_gemini(usage: Any) -> TokenUsage:
    """Google Gemini ``usage_metadata``; thoughts are billed as output but reported apart."""
    thoughts = _gemini(usage, "thoughts_token_count", "thoughtsTokenCount")
    return build_usage(
        prompt=_gemini(usage, "prompt_token_count", "promptTokenCount"),
        completion=_gemini(usage, "candidates_token_count", "candidatesTokenCount") + thoughts,
        cache_read=_gemini(usage, "cached_content_token_count", "cachedContentTokenCount"),
        reasoning=thoughts,
    )


def usage_from_bedrock(usage: Any) -> TokenUsage:
    """Bedrock Converse ``usage`` (camelCase; input excludes the cached parts)."""
    cache_read = _count(usage, "cacheReadInputTokens")
    cache_write = _count(usage, "cacheWriteInputTokens")
    return build_usage(
        prompt=_count(usage, "inputTokens") + cache_read + cache_write,
        completion=_count(usage, "outputTokens"),
        cache_read=cache_read,
        cache_write=cache_write,
    )


def usage_from_ollama(response: Any) -> TokenUsage:
    """Ollama responses carry ``prompt_eval_count`` and ``eval_count`` at the top level."""
    return build_usage(
        prompt=_count(response, "prompt_eval_count"),
        completion=_count(response, "eval_count"),
    )


_Detector = tuple[tuple[str, ...], Callable[[Any], TokenUsage]]

#: Ordered: the first shape whose marker keys are present wins.
_SHAPES: tuple[_Detector, ...] = (
    (("cache_read_input_tokens", "cache_creation_input_tokens"), usage_from_anthropic),
    (("input_token_details", "output_token_details"), usage_from_langchain),
    (("prompt_tokens_details", "completion_tokens_details"), usage_from_openai),
    (("input_tokens_details", "output_tokens_details"), usage_from_openai),
    (("prompt_token_count", "promptTokenCount", "candidates_token_count"), usage_from_gemini),
    (("inputTokens", "outputTokens"), usage_from_bedrock),
    (("prompt_eval_count", "eval_count"), usage_from_ollama),
    (("prompt_tokens", "completion_tokens"), usage_from_openai),
    (("input_tokens", "output_tokens"), usage_from_langchain),
)

#: Where usage sits inside a response object, by provider.
_USAGE_CONTAINERS = ("usage", "usage_metadata", "token_usage", "usageMetadata")


def normalize_usage(payload: Any, *, call_type: CallType = "chat") -> TokenUsage | None:
    """Detect the provider shape of ``payload`` and normalize it; None when it has no usage.

    ``payload`` may be a usage block or a whole response that contains one under
    ``usage``/``usage_metadata``/``token_usage``. Embedding calls report their input as
    prompt tokens; they are moved to ``embedding_tokens``.
    """
    try:
        usage = _find_usage_block(payload)
        if usage is None:
            return None
        if call_type == "embedding":
            counted = _first_shape(usage)
            if counted is None:
                return None
            return build_usage(embedding=counted.prompt_tokens + counted.embedding_tokens)
        return _first_shape(usage)
    except Exception:  # a normalizer must never break the user's call
        logger.warning("could not read usage from %s", type(payload).__name__, exc_info=True)
        return None


def _first_shape(usage: Any) -> TokenUsage | None:
    for markers, normalizer in _SHAPES:
        if _has_any(usage, markers):
            return normalizer(usage)
    return None


def _find_usage_block(payload: Any, depth: int = 0) -> Any:
    if payload is None or depth > 2:
        return None
    if _first_marker_present(payload):
        return payload
    for key in _USAGE_CONTAINERS:
        inner = _field(payload, key)
        if inner is not None and not isinstance(inner, (str, bytes, int, float)):
            found = _find_usage_block(inner, depth + 1)
            if found is not None:
                return found
    return None


def _first_marker_present(obj: Any) -> bool:
    if isinstance(obj, (str, bytes, int, float, bool)):
        return False
    return any(_has_any(obj, markers) for markers, _ in _SHAPES)
