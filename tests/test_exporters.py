"""Exporters: OpenTelemetry metrics (in-memory reader and a real Prometheus scrape), log line."""

from __future__ import annotations

import logging
import socket
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from llama_index.core.callbacks import CallbackManager
from llama_index.core.llms import MockLLM
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from usage_callbacks import ModelPrice, TokenUsage, UsageTracker
from usage_callbacks.exporters.otel import OTelExporter
from usage_callbacks.langchain import UsageCallbackHandler as LangChainHandler
from usage_callbacks.llamaindex import UsageCallbackHandler as LlamaIndexHandler

PRICES = {"m": ModelPrice(input_per_mtok=Decimal(1), output_per_mtok=Decimal(2))}
TTL = "usage_callbacks.cache.ttl"


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def tracker(reader: InMemoryMetricReader) -> Iterator[UsageTracker]:
    exporter = OTelExporter(MeterProvider(metric_readers=[reader]))
    with UsageTracker("memory://", exporters=[exporter], prices=PRICES) as tracker:
        yield tracker


def _points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    found: dict[str, list[Any]] = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                found.setdefault(metric.name, []).extend(metric.data.data_points)
    return found


def _by(points: list[Any], **attributes: str) -> Any:
    [point] = [p for p in points if all(p.attributes.get(k) == v for k, v in attributes.items())]
    return point


def test_known_sequence_gives_exact_metrics(
    tracker: UsageTracker, reader: InMemoryMetricReader
) -> None:
    tracker.record(
        TokenUsage(prompt_tokens=100, completion_tokens=20), model="m", provider="p", latency_ms=500
    )
    tracker.record(
        TokenUsage(prompt_tokens=50, completion_tokens=5), model="m", provider="p", latency_ms=1500
    )
    tracker.record(TokenUsage(embedding_tokens=30), model="m", provider="p", call_type="embedding")
    tracker.record(
        TokenUsage(), model="m", provider="p", status="error", error_type="Timeout", latency_ms=250
    )
    points = _points(reader)
    usage = points["gen_ai.client.token.usage"]
    chat_in = _by(usage, **{"gen_ai.operation.name": "chat", "gen_ai.token.type": "input"})
    assert (chat_in.count, chat_in.sum) == (2, 150)
    chat_out = _by(usage, **{"gen_ai.operation.name": "chat", "gen_ai.token.type": "output"})
    assert (chat_out.count, chat_out.sum) == (2, 25)
    embed_in = _by(usage, **{"gen_ai.operation.name": "embeddings", "gen_ai.token.type": "input"})
    assert (embed_in.count, embed_in.sum) == (1, 30)
    assert chat_in.attributes["gen_ai.provider.name"] == "p"
    assert chat_in.attributes["gen_ai.request.model"] == "m"
    durations = points["gen_ai.client.operation.duration"]
    ok = [p for p in durations if "error.type" not in p.attributes]
    assert sum(p.count for p in ok) == 2 and sum(p.sum for p in ok) == pytest.approx(2.0)
    assert _by(durations, **{"error.type": "Timeout"}).sum == pytest.approx(0.25)
    assert _by(points["llm.request.tokens.prompt"], **{"llm.call_type": "chat"}).value == 150
    assert _by(points["llm.request.tokens.completion"], **{"llm.call_type": "chat"}).value == 25
    assert _by(points["llm.request.tokens.total"], **{"llm.call_type": "chat"}).value == 175
    assert _by(points["llm.request.tokens.embedding"], **{"llm.call_type": "embedding"}).value == 30
    cost = sum(p.value for p in points["llm.request.cost"])
    assert cost == pytest.approx(float(sum(r.cost_estimate_usd for r in tracker.records())))
    assert all("user.id" not in p.attributes for series in points.values() for p in series)


def test_every_token_kind_is_exported_with_its_value(
    tracker: UsageTracker, reader: InMemoryMetricReader
) -> None:
    """The GenAI usage counters, by modality and cache TTL; the parts sum to their whole."""
    every_kind = TokenUsage(
        prompt_tokens=1000,
        completion_tokens=300,
        cache_read_tokens=400,
        cache_write_tokens=150,
        cache_write_1h_tokens=100,
        input_audio_tokens=120,
        input_image_tokens=80,
        tool_prompt_tokens=30,
        reasoning_tokens=90,
        output_audio_tokens=60,
        output_image_tokens=40,
        web_search_requests=3,
    )
    tracker.record(every_kind, model="m", provider="p")
    tracker.record(TokenUsage(embedding_tokens=25), model="m", provider="p", call_type="embedding")
    tracker.record(TokenUsage(), model="m", provider="q", status="error", error_type="Timeout")
    points = _points(reader)
    chat = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "p"}
    found = {
        (
            name,
            point.attributes.get("gen_ai.token.modality"),
            point.attributes.get(TTL),
        ): point.value
        for name, series in points.items()
        if name.startswith(("gen_ai.client.inference.", "usage_callbacks."))
        for point in series
        if all(point.attributes.get(k) == v for k, v in chat.items())
    }
    usage = "gen_ai.client.inference.usage"
    assert found == {
        (f"{usage}.input_tokens", "audio", None): 120,
        (f"{usage}.input_tokens", "image", None): 80,
        (f"{usage}.input_tokens", "unknown", None): 800,
        (f"{usage}.output_tokens", "audio", None): 60,
        (f"{usage}.output_tokens", "image", None): 40,
        (f"{usage}.output_tokens", "unknown", None): 200,
        (f"{usage}.cache_read.input_tokens", "unknown", None): 400,
        (f"{usage}.cache_write.input_tokens", "unknown", "5m"): 50,
        (f"{usage}.cache_write.input_tokens", "unknown", "1h"): 100,
        (f"{usage}.reasoning.output_tokens", "unknown", None): 90,
        ("usage_callbacks.usage.tool_prompt.input_tokens", "unknown", None): 30,
        ("usage_callbacks.usage.web_search.requests", None, None): 3,
    }
    embedded = _by(points[f"{usage}.input_tokens"], **{"gen_ai.operation.name": "embeddings"})
    assert (embedded.value, embedded.attributes["gen_ai.token.modality"]) == (25, "unknown")
    failed = {  # a failed call counts 0 input and output tokens of unknown modality
        (name, point.attributes["gen_ai.token.modality"], point.value)
        for name, series in points.items()
        for point in series
        if name.startswith(usage) and point.attributes.get("gen_ai.provider.name") == "q"
    }
    assert failed == {
        (f"{usage}.input_tokens", "unknown", 0),
        (f"{usage}.output_tokens", "unknown", 0),
    }


def test_user_ids_only_on_request(reader: InMemoryMetricReader) -> None:
    exporter = OTelExporter(MeterProvider(metric_readers=[reader]), include_user_id=True)
    with UsageTracker("memory://", exporters=[exporter]) as tracker:
        tracker.record(TokenUsage(prompt_tokens=1), model="m", user_id="alice")
    points = _points(reader)["llm.request.tokens.prompt"]
    assert points[0].attributes["user.id"] == "alice"


def test_both_frameworks_through_one_exporter(
    tracker: UsageTracker, reader: InMemoryMetricReader
) -> None:
    reply = AIMessage(
        content="hi",
        response_metadata={"model_name": "m"},
        usage_metadata={"input_tokens": 40, "output_tokens": 4, "total_tokens": 44},
    )
    chat = GenericFakeChatModel(messages=iter([reply, reply]))
    for _ in range(2):
        chat.invoke("hello", config={"callbacks": [LangChainHandler(tracker)]})
    MockLLM(max_tokens=3, callback_manager=CallbackManager([LlamaIndexHandler(tracker)])).complete(
        "one two"
    )
    records = tracker.records()
    points = _points(reader)
    chat_total = _by(points["llm.request.tokens.total"], **{"llm.call_type": "chat"}).value
    completion_total = _by(points["llm.request.tokens.total"], **{"llm.call_type": "completion"})
    assert chat_total == 88
    assert completion_total.value == records[-1].total_tokens
    assert sum(p.value for p in points["llm.request.tokens.total"]) == sum(
        r.total_tokens for r in records
    )


def test_exporter_failures_do_not_lose_the_record(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def export(self, record: Any) -> None:
            raise RuntimeError("collector down")

    with caplog.at_level(logging.WARNING), UsageTracker("memory://", exporters=[Broken()]) as t:
        t.record(TokenUsage(prompt_tokens=1), model="m")
        assert len(t.records()) == 1
    assert "exporter" in caplog.text


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_prometheus_endpoint_serves_the_series() -> None:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import start_http_server

    port = _free_port()
    server, _thread = start_http_server(port, addr="127.0.0.1")
    provider = MeterProvider(metric_readers=[PrometheusMetricReader()])
    try:
        exporter = OTelExporter(provider)
        with UsageTracker("memory://", exporters=[exporter], prices=PRICES) as tracker:
            tracker.record(
                TokenUsage(prompt_tokens=1200, completion_tokens=300), model="m", provider="p"
            )
            tracker.record(
                TokenUsage(prompt_tokens=800, completion_tokens=100), model="m", provider="p"
            )
        body = (
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        )
    finally:
        server.shutdown()
        provider.shutdown()  # unregisters the collector from prometheus_client's registry
    lines = {
        line.split(" ")[0]: line.split(" ")[1]
        for line in body.splitlines()
        if line and not line.startswith("#")
    }
    prompt = [
        v for k, v in lines.items() if k.startswith("llm_request_tokens_prompt") and "_total{" in k
    ]
    assert [float(v) for v in prompt] == [2000.0]
    completion = [
        v
        for k, v in lines.items()
        if k.startswith("llm_request_tokens_completion") and "_total{" in k
    ]
    assert [float(v) for v in completion] == [400.0]
    cost = [v for k, v in lines.items() if k.startswith("llm_request_cost") and "_total{" in k]
    assert float(cost[0]) == pytest.approx(0.0028)
    assert any(k.startswith("gen_ai_client_token_usage") and "_count{" in k for k in lines)
    assert 'llm_model_name="m"' in body and 'gen_ai_token_type="input"' in body


def test_the_log_line_is_off_by_default(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="usage_callbacks"), UsageTracker("memory://") as t:
        t.record(TokenUsage(prompt_tokens=1234, completion_tokens=567), model="gpt-4o-mini")
    assert not any(m.startswith("Token usage:") for m in caplog.messages)


def test_attribution_only_on_request(reader: InMemoryMetricReader) -> None:
    exporter = OTelExporter(
        MeterProvider(metric_readers=[reader]),
        include_attribution=["node", "agent", "thread", "dimension:tenant"],
    )
    with UsageTracker("memory://", exporters=[exporter], dimensions=["tenant", "feature"]) as t:
        t.record(
            TokenUsage(prompt_tokens=5),
            model="m",
            node="plan",
            agent="planner",
            thread_id="t-1",
            run_name="plan",
            dimensions={"tenant": "acme", "feature": "search"},
        )
        t.record(TokenUsage(prompt_tokens=3), model="m")
    points = _points(reader)["gen_ai.client.token.usage"]
    attributed = _by(points, **{"usage_callbacks.node": "plan"})
    assert attributed.sum == 5
    assert attributed.attributes["gen_ai.agent.name"] == "planner"
    assert attributed.attributes["gen_ai.conversation.id"] == "t-1"
    assert attributed.attributes["usage_callbacks.dimension.tenant"] == "acme"
    # not asked for: the run name and the feature dimension stay out
    names = {name for p in points for name in p.attributes}
    assert "usage_callbacks.run_name" not in names
    assert "usage_callbacks.dimension.feature" not in names
    with pytest.raises(ValueError, match="not one of"):
        OTelExporter(MeterProvider(metric_readers=[]), include_attribution=["tenant"])


def test_no_attribution_attributes_by_default(reader: InMemoryMetricReader) -> None:
    exporter = OTelExporter(MeterProvider(metric_readers=[reader]))
    with UsageTracker("memory://", exporters=[exporter], dimensions=["tenant"]) as t:
        t.record(TokenUsage(prompt_tokens=5), model="m", node="plan", dimensions={"tenant": "a"})
    names = {name for series in _points(reader).values() for p in series for name in p.attributes}
    assert not any(name.startswith(("usage_callbacks.", "gen_ai.agent")) for name in names)
