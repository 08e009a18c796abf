"""OpenTelemetry metrics for every tracked call: GenAI semantic conventions plus the
``llm.request.*`` counters existing dashboards use.

Token kinds follow the GenAI token metrics: ``gen_ai.client.token.usage`` (a histogram
per call, ``gen_ai.token.type`` input/output) and the ``gen_ai.client.inference.usage.*``
counters: input and output tokens by ``gen_ai.token.modality`` (audio and image as
reported, the rest ``unknown``: no provider splits it reliably, and cached tokens of any
modality are in it), and their parts cache read, cache write (with
``usage_callbacks.cache.ttl`` 5m/1h) and reasoning. Kinds the conventions have no name
for are ``usage_callbacks.*`` counters: tool-use prompt tokens (a part of the input) and
web search requests (billed per request).

    from opentelemetry.sdk.metrics import MeterProvider
    tracker = UsageTracker(exporters=[OTelExporter(MeterProvider(metric_readers=[...]))])

User ids never become metric attributes unless ``include_user_id=True``: they are
unbounded (cardinality) and personal (privacy). Attribution is opt-in for the same
reasons: ``include_attribution=["node", "agent", "dimension:tenant"]`` (also ``thread``,
``run_name``, ``root_run_name``) adds ``gen_ai.agent.name``, ``gen_ai.conversation.id``,
``gen_ai.workflow.name`` (the root run) and ``usage_callbacks.node``/``.run_name``/
``.dimension.<key>``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from usage_callbacks.extras import missing_extra

try:
    from opentelemetry import metrics
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.semconv._incubating.attributes.gen_ai_attributes import (
        GEN_AI_AGENT_NAME,
        GEN_AI_CONVERSATION_ID,
        GEN_AI_OPERATION_NAME,
        GEN_AI_PROVIDER_NAME,
        GEN_AI_REQUEST_MODEL,
        GEN_AI_TOKEN_TYPE,
        GEN_AI_WORKFLOW_NAME,
        GenAiOperationNameValues,
        GenAiTokenTypeValues,
    )
    from opentelemetry.semconv._incubating.metrics.gen_ai_metrics import (
        create_gen_ai_client_operation_duration,
        create_gen_ai_client_token_usage,
    )
    from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
    from opentelemetry.util.types import AttributeValue
except ModuleNotFoundError as error:  # say which extra installs it
    raise missing_extra(error, "otel") from error

from usage_callbacks.store.base import DIMENSION_PREFIX, group_levels
from usage_callbacks.store.models import UsageRecord
from usage_callbacks.usage import COUNT_FIELDS

logger = logging.getLogger("usage_callbacks")

_OPERATIONS = {
    "chat": GenAiOperationNameValues.CHAT.value,
    "completion": GenAiOperationNameValues.TEXT_COMPLETION.value,
    "embedding": GenAiOperationNameValues.EMBEDDINGS.value,
}
#: Attribution a metric may carry: (attribute name, the record's column).
_ATTRIBUTION = {
    "node": ("usage_callbacks.node", "node"),
    "agent": (GEN_AI_AGENT_NAME, "agent"),
    "thread": (GEN_AI_CONVERSATION_ID, "thread_id"),
    "run_name": ("usage_callbacks.run_name", "run_name"),
    "root_run_name": (GEN_AI_WORKFLOW_NAME, "root_run_name"),
}

#: (metric attribute, record column, key in the column's dict or None)
_Source = tuple[str, str, str | None]

_MODALITY = "gen_ai.token.modality"
_TTL = "usage_callbacks.cache.ttl"
_UNKNOWN = {_MODALITY: "unknown"}
#: (name, unit, description, [(count, attributes)]): the counts are the record's columns,
#: and the rest of the input and output beside their audio and image parts
_USAGE_COUNTERS: list[tuple[str, str, str, list[tuple[str, dict[str, str]]]]] = [
    (
        "gen_ai.client.inference.usage.input_tokens",
        "{token}",
        "input (prompt) tokens, including cached tokens",
        [
            ("input_audio_tokens", {_MODALITY: "audio"}),
            ("input_image_tokens", {_MODALITY: "image"}),
            ("input_rest", _UNKNOWN),
        ],
    ),
    (
        "gen_ai.client.inference.usage.output_tokens",
        "{token}",
        "output (completion) tokens, including reasoning tokens",
        [
            ("output_audio_tokens", {_MODALITY: "audio"}),
            ("output_image_tokens", {_MODALITY: "image"}),
            ("output_rest", _UNKNOWN),
        ],
    ),
    (
        "gen_ai.client.inference.usage.cache_read.input_tokens",
        "{token}",
        "input tokens served from a provider-managed cache",
        [("cache_read_tokens", _UNKNOWN)],
    ),
    (
        "gen_ai.client.inference.usage.cache_write.input_tokens",
        "{token}",
        "input tokens written to a provider-managed cache, by how long they are kept",
        [
            ("cache_write_5m", {**_UNKNOWN, _TTL: "5m"}),
            ("cache_write_1h_tokens", {**_UNKNOWN, _TTL: "1h"}),
        ],
    ),
    (
        "gen_ai.client.inference.usage.reasoning.output_tokens",
        "{token}",
        "output tokens used for reasoning",
        [("reasoning_tokens", _UNKNOWN)],
    ),
    (
        "usage_callbacks.usage.tool_prompt.input_tokens",
        "{token}",
        "input tokens a provider-run tool added to the prompt",
        [("tool_prompt_tokens", _UNKNOWN)],
    ),
    (
        "usage_callbacks.usage.web_search.requests",
        "{request}",
        "server-side web searches, billed per request",
        [("web_search_requests", {})],
    ),
]


_ALWAYS_COUNTED = frozenset(("input_rest", "output_rest"))


def _kind_counts(record: UsageRecord) -> dict[str, int]:
    """The record's counts, and the parts of them the counters need."""
    counts: dict[str, int] = {name: getattr(record, name) for name in COUNT_FIELDS}
    counts["input_rest"] = (
        counts["prompt_tokens"]
        + counts["embedding_tokens"]
        - counts["input_audio_tokens"]
        - counts["input_image_tokens"]
    )
    counts["output_rest"] = (
        counts["completion_tokens"] - counts["output_audio_tokens"] - counts["output_image_tokens"]
    )
    counts["cache_write_5m"] = counts["cache_write_tokens"] - counts["cache_write_1h_tokens"]
    return counts


def _attribution_sources(names: Sequence[str]) -> list[_Source]:
    """Where each attribution asked for is read from; unknown names are refused."""
    sources: list[_Source] = []
    for name in names:
        if name.startswith(DIMENSION_PREFIX):
            key = group_levels([name])[0].removeprefix(DIMENSION_PREFIX)
            sources.append((f"usage_callbacks.dimension.{key}", "dimensions", key))
        elif name in _ATTRIBUTION:
            sources.append((*_ATTRIBUTION[name], None))
        else:
            raise ValueError(
                f"include_attribution: {name!r} is not one of {', '.join(_ATTRIBUTION)} "
                "or dimension:<key>"
            )
    return sources


class OTelExporter:
    """Records metrics through the OpenTelemetry metrics API; never raises."""

    def __init__(
        self,
        meter_provider: MeterProvider | None = None,
        *,
        include_user_id: bool = False,
        include_attribution: Sequence[str] = (),
    ) -> None:
        provider = meter_provider or metrics.get_meter_provider()
        meter = provider.get_meter("usage_callbacks")
        self.include_user_id = include_user_id
        self._attribution = _attribution_sources(
            [include_attribution] if isinstance(include_attribution, str) else include_attribution
        )
        self._token_usage = create_gen_ai_client_token_usage(meter)
        self._duration = create_gen_ai_client_operation_duration(meter)
        self._counters = {
            kind: meter.create_counter(
                f"llm.request.tokens.{kind}", unit="{token}", description=f"{kind} tokens"
            )
            for kind in ("prompt", "completion", "total", "embedding")
        }
        self._cost = meter.create_counter(
            "llm.request.cost", unit="USD", description="estimated cost of LLM calls"
        )
        #: the usage counters: (counter, [(record column, extra attributes)])
        self._kinds = [
            (meter.create_counter(name, unit=unit, description=description), parts)
            for name, unit, description, parts in _USAGE_COUNTERS
        ]

    def export(self, record: UsageRecord) -> None:
        try:
            self._export(record)
        except Exception:
            logger.warning("OpenTelemetry export failed", exc_info=True)

    def _export(self, record: UsageRecord) -> None:
        genai: dict[str, AttributeValue] = {
            GEN_AI_OPERATION_NAME: _OPERATIONS.get(record.call_type, record.call_type),
            GEN_AI_PROVIDER_NAME: record.provider or "unknown",
            GEN_AI_REQUEST_MODEL: record.model or "unknown",
        }
        legacy: dict[str, AttributeValue] = {
            "llm.provider.id": record.provider or "unknown",
            "llm.model.name": record.model or "unknown",
            "llm.call_type": record.call_type,
        }
        if self.include_user_id and record.user_id:
            genai["user.id"] = legacy["user.id"] = record.user_id
        for attribute, column, key in self._attribution:
            found = getattr(record, column)
            if key is not None:
                found = (found or {}).get(key)
            if found:
                genai[attribute] = legacy[attribute] = found
        inputs = record.prompt_tokens + record.embedding_tokens
        if inputs:
            self._token_usage.record(
                inputs, {**genai, GEN_AI_TOKEN_TYPE: GenAiTokenTypeValues.INPUT.value}
            )
        if record.completion_tokens:
            self._token_usage.record(
                record.completion_tokens,
                {**genai, GEN_AI_TOKEN_TYPE: GenAiTokenTypeValues.OUTPUT.value},
            )
        if record.latency_ms is not None:
            duration = dict(genai)
            if record.status != "ok":
                duration[ERROR_TYPE] = record.error_type or "error"
            self._duration.record(record.latency_ms / 1000.0, duration)
        for kind, value in (
            ("prompt", record.prompt_tokens),
            ("completion", record.completion_tokens),
            ("total", record.total_tokens),
            ("embedding", record.embedding_tokens),
        ):
            if value:
                self._counters[kind].add(value, legacy)
        if record.cost_estimate_usd:
            self._cost.add(float(record.cost_estimate_usd), legacy)
        self._export_kinds(record, genai)

    def _export_kinds(self, record: UsageRecord, genai: dict[str, AttributeValue]) -> None:
        """Every billed kind on its usage counter. Parts without a count are left out,
        but input and output are counted for every call, failed ones too (0 ``unknown``
        when nothing was billed), as the conventions ask."""
        counts = _kind_counts(record)
        for counter, parts in self._kinds:
            for column, attributes in parts:
                if counts[column] or column in _ALWAYS_COUNTED:
                    labelled = dict(genai)
                    labelled.update(attributes)
                    counter.add(counts[column], labelled)
