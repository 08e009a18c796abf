"""Exporters receive every record as it is made: a log line, OpenTelemetry metrics."""
