"""OpenTelemetry metrics scraped by Prometheus: what Grafana would chart.

Records a few calls with the OTelExporter wired to a PrometheusMetricReader, serves the
metrics on a local port, scrapes them once over HTTP and prints the usage series.

    python examples/otel_prometheus.py
"""

import socket
import urllib.request

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import start_http_server

from usage_callbacks import TokenUsage, UsageTracker
from usage_callbacks.exporters.otel import OTelExporter


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main() -> None:
    port = free_port()
    server, _ = start_http_server(port, addr="127.0.0.1")
    provider = MeterProvider(metric_readers=[PrometheusMetricReader()])
    with UsageTracker("memory://", exporters=[OTelExporter(provider)]) as tracker:
        tracker.record(
            TokenUsage(prompt_tokens=1200, completion_tokens=300),
            model="gpt-4o-mini",
            provider="openai",
            latency_ms=850,
        )
        tracker.record(
            TokenUsage(prompt_tokens=900, completion_tokens=80),
            model="claude-haiku-4-5",
            provider="anthropic",
            latency_ms=430,
        )
        tracker.record(
            TokenUsage(embedding_tokens=5000),
            model="text-embedding-3-small",
            provider="openai",
            call_type="embedding",
        )
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    server.shutdown()
    provider.shutdown()
    for line in body.splitlines():
        if line.startswith(("llm_request_", "gen_ai_client_token_usage_sum")):
            print(line)


if __name__ == "__main__":
    main()
