"""OpenTelemetry metrics for every tracked call: GenAI semantic conventions plus the
``llm.request.*`` counters existing dashboards use.

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
