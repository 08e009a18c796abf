"""The LlamaIndex import path: handlers for both event systems and ``instrument``."""

from usage_callbacks.integrations.llamaindex import (
    Instrumentation,
    UsageCallbackHandler,
    UsageEventHandler,
    instrument,
)

__all__ = ["Instrumentation", "UsageCallbackHandler", "UsageEventHandler", "instrument"]
