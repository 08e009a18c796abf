"""``from usage_callbacks.langchain import UsageCallbackHandler, TrackedEmbeddings``."""

from usage_callbacks.integrations.langchain import TrackedEmbeddings, UsageCallbackHandler

__all__ = ["TrackedEmbeddings", "UsageCallbackHandler"]
