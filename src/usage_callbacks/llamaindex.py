"""``from usage_callbacks.llamaindex import UsageCallbackHandler, UsageEventHandler, instrument``."""

from usage_callbacks.integrations.llamaindex import (
    Instrumentation,
    UsageCallbackHandler,
    UsageEventHandler,
    instrument,
)

__all__ = ["Instrumentation", "UsageCallbackHandler", "UsageEventHandler", "instrument"]
