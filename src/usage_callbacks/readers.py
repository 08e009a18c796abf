"""One reader per usage source: provider payloads into TokenUsage, read explicitly.

The integration that received a payload knows which source produced it (LangChain's
``usage_metadata``, a LlamaIndex LLM class's ``response.raw``, ...) and names it; no
reader guesses a shape from the keys that happen to be present. Readers are lenient: a
bad value is logged and skipped, never raised, because they run inside the user's call.

genai-prices' ``extract_usage`` reads several of these bodies too, but at 25-60 µs a
body against 3-6 µs here (dicts only, no SDK objects); tests/usage_corpus checks that
both read the same numbers wherever genai-prices has an extractor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal

from usage_callbacks.usage import MAX_TOKENS_PER_CALL, CallType, TokenUsage, build_usage

logger = logging.getLogger("usage_callbacks")

UsageSource = Literal[
    "langchain",
    "openai",
    "openai-chat",
    "openai-responses",
    "openai-realtime",
    "openai-embedding",
    "anthropic",
    "gemini",
    "bedrock-converse",
    "bedrock-invoke",
    "ollama",
    "litellm",
    "cohere",
    "xai",
    "perplexity",
]


def _field(obj: Any, *path: str) -> Any:
    """Read ``obj[a][b]`` or ``obj.a.b``; None when any step is missing."""
    for key in path:
        if obj is None:
            return None
        # type() first: most payloads are plain dicts, and the ABC check is slower
        if type(obj) is dict or isinstance(obj, Mapping):
            obj = obj.get(key)
        elif isinstance(obj, (str, bytes, int, float, list, tuple)):
            return None
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


def _text(obj: Any, *path: str) -> str | None:
    value = _field(obj, *path)
    value = getattr(value, "value", value)  # an SDK enum
    return value if isinstance(value, str) and value else None


# --------------------------------------------------------------------------- LangChain

#: langchain-openai prefixes the cache and reasoning details of these tiers
#: (``flex_cache_read``) and adds the tier's uncached count under the tier's name.
_LANGCHAIN_TIERS = ("flex", "priority")


def usage_from_langchain(usage_metadata: Any, reasoning_additive: bool = False) -> TokenUsage:
    """LangChain ``UsageMetadata``: input includes the cached parts, output the reasoning.

    Details as langchain-openai and langchain-anthropic write them: ``cache_read``,
    ``cache_creation`` (0 when the TTL split ``ephemeral_5m/1h_input_tokens`` is given),
    ``audio``, ``reasoning``, and for OpenAI's flex/priority tiers the same keys
    prefixed with the tier. ``reasoning_additive``: the integration copied a provider's
    completion count that excludes reasoning (xAI through langchain-openai's code).
    """
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
    details_in = _field(usage_metadata, "input_token_details")
    details_out = _field(usage_metadata, "output_token_details")
    tier = next(
        (name for name in _LANGCHAIN_TIERS if _field(details_in, name) is not None), None
    ) or next((name for name in _LANGCHAIN_TIERS if _field(details_out, name) is not None), None)
    prefix = f"{tier}_" if tier else ""
    write_5m = _count(details_in, "ephemeral_5m_input_tokens")
    write_1h = _count(details_in, "ephemeral_1h_input_tokens")
    cache_write = write_5m + write_1h or _count(details_in, f"{prefix}cache_creation")
    reasoning = _count(details_out, f"{prefix}reasoning")
    completion = _count(usage_metadata, "output_tokens")
    return build_usage(
        prompt=_count(usage_metadata, "input_tokens"),
        completion=completion + reasoning if reasoning_additive else completion,
        cache_read=_count(details_in, f"{prefix}cache_read"),
        cache_write=cache_write,
        cache_write_1h=write_1h,
        reasoning=reasoning,
        input_audio=_count(details_in, "audio"),
        output_audio=_count(details_out, "audio"),
        service_tier=tier,
    )


# --------------------------------------------------------------------------- OpenAI


def usage_from_openai_chat(usage: Any) -> TokenUsage:
    """Chat Completions ``usage`` (also OpenRouter's, whose ``cache_write_tokens`` are part
    of the prompt like the cached ones, and every other OpenAI-compatible API)."""
    details_in = _field(usage, "prompt_tokens_details")
    details_out = _field(usage, "completion_tokens_details")
    return build_usage(
        prompt=_count(usage, "prompt_tokens"),
        completion=_count(usage, "completion_tokens"),
        cache_read=_count(details_in, "cached_tokens"),
        cache_write=_count(details_in, "cache_write_tokens"),
        reasoning=_count(details_out, "reasoning_tokens"),
        input_audio=_count(details_in, "audio_tokens"),
        output_audio=_count(details_out, "audio_tokens"),
        input_image=_count(details_in, "image_tokens"),
        output_image=_count(details_out, "image_tokens"),
    )


def usage_from_openai_responses(usage: Any) -> TokenUsage:
    """Responses API ``usage``."""
    details_in = _field(usage, "input_tokens_details")
    return build_usage(
        prompt=_count(usage, "input_tokens"),
        completion=_count(usage, "output_tokens"),
        cache_read=_count(details_in, "cached_tokens"),
        cache_write=_count(details_in, "cache_write_tokens"),
        reasoning=_count(usage, "output_tokens_details", "reasoning_tokens"),
    )


def usage_from_openai_realtime(usage: Any) -> TokenUsage:
    """Realtime ``response.done`` usage: modality counts include the cached tokens,
    which ``cached_tokens_details`` splits by modality."""
    details_in = _field(usage, "input_token_details")
    cached = _field(details_in, "cached_tokens_details")
    return build_usage(
        prompt=_count(usage, "input_tokens"),
        completion=_count(usage, "output_tokens"),
        cache_read=_count(details_in, "cached_tokens"),
        input_audio=max(0, _count(details_in, "audio_tokens") - _count(cached, "audio_tokens")),
        input_image=max(0, _count(details_in, "image_tokens") - _count(cached, "image_tokens")),
        output_audio=_count(usage, "output_token_details", "audio_tokens"),
    )


def usage_from_openai_embedding(usage: Any) -> TokenUsage:
    """Embeddings ``usage``: ``prompt_tokens`` are the embedded tokens."""
    return build_usage(embedding=_count(usage, "prompt_tokens") or _count(usage, "total_tokens"))


_OPENAI_OBJECTS: dict[str, Callable[[Any], TokenUsage]] = {
    "chat.completion": usage_from_openai_chat,
    "chat.completion.chunk": usage_from_openai_chat,
    "text_completion": usage_from_openai_chat,
    "response": usage_from_openai_responses,
    "realtime.response": usage_from_openai_realtime,
    "list": usage_from_openai_embedding,
}


def usage_from_openai_response(response: Any) -> TokenUsage | None:
    """A whole OpenAI response (SDK object or body), read by the type it declares in
    ``object``; the ``service_tier`` it was served at is kept for pricing."""
    usage = _field(response, "usage")
    if usage is None:
        return None
    kind = _text(response, "object") or "chat.completion"
    reader = _OPENAI_OBJECTS.get(kind)
    if reader is None:
        logger.warning("unknown OpenAI response object %r; usage not read", kind)
        return None
    found = reader(usage)
    tier = _text(response, "service_tier")
    if tier in _LANGCHAIN_TIERS:
        found = found.model_copy(update={"service_tier": tier})
    return found


# --------------------------------------------------------------------------- Anthropic


def usage_from_anthropic(usage: Any) -> TokenUsage:
    """Messages API ``usage``: ``input_tokens`` excludes the cached parts (added in here);
    cache writes split by TTL under ``cache_creation``; thinking is reasoning."""
    cache_read = _count(usage, "cache_read_input_tokens")
    cache_write = _count(usage, "cache_creation_input_tokens")
    split = _field(usage, "cache_creation")
    write_1h = _count(split, "ephemeral_1h_input_tokens")
    if split is not None:  # the split, when given, is the whole of the writes
        cache_write = _count(split, "ephemeral_5m_input_tokens") + write_1h or cache_write
    return build_usage(
        prompt=_count(usage, "input_tokens") + cache_read + cache_write,
        completion=_count(usage, "output_tokens"),
        cache_read=cache_read,
        cache_write=cache_write,
        cache_write_1h=write_1h,
        reasoning=_count(usage, "output_tokens_details", "thinking_tokens"),
        web_searches=_count(usage, "server_tool_use", "web_search_requests"),
    )


#: Sources whose provider bills a stream's input once the stream started, whatever
#: follows (a mid-stream ``error`` event, a dropped connection): Anthropic's first event,
#: ``message_start``, reports the input as billed.
BILLED_ONCE_STARTED: frozenset[str] = frozenset(("anthropic",))


# --------------------------------------------------------------------------- Google


def _gemini(usage: Any, snake: str, camel: str) -> Any:
    """google-genai SDK objects spell fields in snake_case, the REST body in camelCase."""
    value = _field(usage, snake)
    return _field(usage, camel) if value is None else value


def _modality(details: Any, *modalities: str) -> int:
    """Tokens of ``modalities`` in a list of ``{modality, token_count}``."""
    if not isinstance(details, (list, tuple)):
        return 0
    return sum(
        _count(item, "token_count") or _count(item, "tokenCount")
        for item in details
        if _text(item, "modality") in modalities
    )


def usage_from_gemini(usage: Any) -> TokenUsage:
    """Gemini ``usage_metadata``: thoughts and tool-use prompts are billed but reported
    beside ``candidates_token_count``/``prompt_token_count``; modality lists include the
    cached tokens, which ``cache_tokens_details`` splits by modality."""
    thoughts = _count(_gemini(usage, "thoughts_token_count", "thoughtsTokenCount"))
    tool_prompt = _count(_gemini(usage, "tool_use_prompt_token_count", "toolUsePromptTokenCount"))
    prompt_details = _gemini(usage, "prompt_tokens_details", "promptTokensDetails")
    cache_details = _gemini(usage, "cache_tokens_details", "cacheTokensDetails")
    output_details = _gemini(usage, "candidates_tokens_details", "candidatesTokensDetails")
    # genai-prices prices DOCUMENT (PDF page) tokens as image tokens
    images = ("IMAGE", "DOCUMENT")
    return build_usage(
        prompt=_count(_gemini(usage, "prompt_token_count", "promptTokenCount")) + tool_prompt,
        completion=_count(_gemini(usage, "candidates_token_count", "candidatesTokenCount"))
        + thoughts,
        cache_read=_count(_gemini(usage, "cached_content_token_count", "cachedContentTokenCount")),
        reasoning=thoughts,
        tool_prompt=tool_prompt,
        input_audio=max(0, _modality(prompt_details, "AUDIO") - _modality(cache_details, "AUDIO")),
        input_image=max(0, _modality(prompt_details, *images) - _modality(cache_details, *images)),
        output_audio=_modality(output_details, "AUDIO"),
        output_image=_modality(output_details, *images),
    )


# --------------------------------------------------------------------------- AWS Bedrock


def usage_from_bedrock_converse(usage: Any) -> TokenUsage:
    """Converse ``usage`` (input excludes the cached parts; ``cacheDetails`` lists the
    writes by TTL)."""
    cache_read = _count(usage, "cacheReadInputTokens")
    cache_write = _count(usage, "cacheWriteInputTokens")
    details = _field(usage, "cacheDetails")
    write_1h = 0
    if isinstance(details, (list, tuple)):
        write_1h = sum(_count(d, "inputTokens") for d in details if _text(d, "ttl") == "1h")
    return build_usage(
        prompt=_count(usage, "inputTokens") + cache_read + cache_write,
        completion=_count(usage, "outputTokens"),
        cache_read=cache_read,
        cache_write=cache_write,
        cache_write_1h=write_1h,
    )


def usage_from_bedrock_invoke(metrics: Any) -> TokenUsage:
    """InvokeModel's ``amazon-bedrock-invocationMetrics`` (input excludes the cached parts)."""
    cache_read = _count(metrics, "cacheReadInputTokenCount")
    cache_write = _count(metrics, "cacheWriteInputTokenCount")
    return build_usage(
        prompt=_count(metrics, "inputTokenCount") + cache_read + cache_write,
        completion=_count(metrics, "outputTokenCount"),
        cache_read=cache_read,
        cache_write=cache_write,
    )


# --------------------------------------------------------------------------- others


def usage_from_ollama(response: Any) -> TokenUsage:
    """Ollama responses carry ``prompt_eval_count`` and ``eval_count`` at the top level."""
    return build_usage(
        prompt=_count(response, "prompt_eval_count"),
        completion=_count(response, "eval_count"),
    )


def usage_from_litellm(usage: Any) -> TokenUsage:
    """LiteLLM's OpenAI-shaped ``Usage``: ``prompt_tokens`` includes cache reads and writes
    for every provider; it always carries ``cache_*_input_tokens`` (0 when none)."""
    details_in = _field(usage, "prompt_tokens_details")
    details_out = _field(usage, "completion_tokens_details")
    return build_usage(
        prompt=_count(usage, "prompt_tokens"),
        completion=_count(usage, "completion_tokens"),
        cache_read=_count(details_in, "cached_tokens") or _count(usage, "cache_read_input_tokens"),
        cache_write=_count(usage, "cache_creation_input_tokens")
        or _count(details_in, "cache_creation_tokens"),
        reasoning=_count(details_out, "reasoning_tokens"),
        input_audio=_count(details_in, "audio_tokens"),
        output_audio=_count(details_out, "audio_tokens"),
        input_image=_count(details_in, "image_tokens"),
        output_image=_count(details_out, "image_tokens"),
        web_searches=_count(usage, "server_tool_use", "web_search_requests"),
    )


def usage_from_cohere(usage: Any) -> TokenUsage:
    """Cohere ``usage`` (v2) or ``meta`` (v1): ``billed_units`` is what is billed."""
    billed = _field(usage, "billed_units")
    return build_usage(
        prompt=_count(billed, "input_tokens"), completion=_count(billed, "output_tokens")
    )


def usage_from_xai(usage: Any) -> TokenUsage:
    """xAI chat ``usage``: reasoning is billed as output but not in ``completion_tokens``."""
    reasoning = _count(usage, "completion_tokens_details", "reasoning_tokens")
    return build_usage(
        prompt=_count(usage, "prompt_tokens"),
        completion=_count(usage, "completion_tokens") + reasoning,
        cache_read=_count(usage, "prompt_tokens_details", "cached_tokens"),
        reasoning=reasoning,
        input_image=_count(usage, "prompt_tokens_details", "image_tokens"),
    )


def usage_from_perplexity(usage: Any) -> TokenUsage:
    """Perplexity ``usage``: citation and reasoning tokens are billed as output beside
    ``completion_tokens``; each search query is billed per request."""
    reasoning = _count(usage, "reasoning_tokens")
    return build_usage(
        prompt=_count(usage, "prompt_tokens"),
        completion=_count(usage, "completion_tokens")
        + reasoning
        + _count(usage, "citation_tokens"),
        reasoning=reasoning,
        web_searches=_count(usage, "num_search_queries"),
    )


# --------------------------------------------------------------------------- dispatch

_Reader = Callable[[Any], TokenUsage | None]

#: Each source: its reader, and where the usage sits in a whole response ("" = on top).
_SOURCES: dict[str, tuple[_Reader, tuple[str, ...]]] = {
    "langchain": (usage_from_langchain, ("usage_metadata",)),
    "openai": (usage_from_openai_response, ("",)),
    "openai-chat": (usage_from_openai_chat, ("usage",)),
    "openai-responses": (usage_from_openai_responses, ("usage",)),
    "openai-realtime": (usage_from_openai_realtime, ("usage",)),
    "openai-embedding": (usage_from_openai_embedding, ("usage",)),
    "anthropic": (usage_from_anthropic, ("usage",)),
    "gemini": (usage_from_gemini, ("usage_metadata", "usageMetadata")),
    "bedrock-converse": (usage_from_bedrock_converse, ("usage",)),
    "bedrock-invoke": (usage_from_bedrock_invoke, ("amazon-bedrock-invocationMetrics",)),
    "ollama": (usage_from_ollama, ("",)),
    "litellm": (usage_from_litellm, ("usage",)),
    "cohere": (usage_from_cohere, ("usage", "meta")),
    "xai": (usage_from_xai, ("usage",)),
    "perplexity": (usage_from_perplexity, ("usage",)),
}
SOURCES: frozenset[str] = frozenset(_SOURCES)


def normalize_usage(
    payload: Any, *, source: UsageSource, call_type: CallType = "chat", whole: bool = True
) -> TokenUsage | None:
    """The usage in ``payload`` as ``source`` reports it; None when it reports none.

    ``payload`` is a whole response (``whole=True``: the usage is looked up where
    ``source`` puts it) or the usage block itself. Embedding calls report their input as
    prompt tokens; they are moved to ``embedding_tokens``.
    """
    try:
        reader, places = _SOURCES[source]
    except KeyError:
        raise ValueError(f"unknown usage source {source!r}; one of {sorted(SOURCES)}") from None
    try:
        usage = payload
        if whole:
            usage = next(
                (found for place in places if (found := _at(payload, place)) is not None), None
            )
        if usage is None or isinstance(usage, (str, bytes, int, float, list, tuple)):
            return None
        found = reader(usage)
    except Exception:  # a reader must never break the user's call
        logger.warning(
            "could not read %s usage from %s", source, type(payload).__name__, exc_info=True
        )
        return None
    if found is None or (not found.total and not found.web_search_requests):
        return None
    if call_type == "embedding" and found.prompt_tokens:
        return build_usage(embedding=found.prompt_tokens + found.embedding_tokens)
    return found


def _at(payload: Any, place: str) -> Any:
    return payload if not place else _field(payload, place)
