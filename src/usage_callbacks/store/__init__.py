"""Stores: where usage records are kept."""

from __future__ import annotations

import os

from usage_callbacks.store.base import (
    GroupBy,
    GroupSummary,
    TokenStats,
    UsageFilter,
    UsageStore,
    UsageSummary,
)
from usage_callbacks.store.memory import MemoryStore
from usage_callbacks.store.models import UsageRecord
from usage_callbacks.store.sql import SchemaTooNewError, SqlStore, StoreConfigurationError

DEFAULT_URL = "sqlite:///usage.db"
URL_ENV = "USAGE_CALLBACKS_DB"


def resolve_url(url: str | None) -> str:
    """The URL given, else ``$USAGE_CALLBACKS_DB``, else ``sqlite:///usage.db``."""
    return url or os.environ.get(URL_ENV) or DEFAULT_URL


def open_store(url: str | None = None, *, read_only: bool = False) -> SqlStore:
    """The store at ``url``; ``read_only`` never creates or alters a database."""
    resolved = resolve_url(url)
    if resolved.startswith("memory://"):
        return MemoryStore()
    return SqlStore(resolved, read_only=read_only)


__all__ = [
    "DEFAULT_URL",
    "URL_ENV",
    "GroupBy",
    "GroupSummary",
    "MemoryStore",
    "SchemaTooNewError",
    "SqlStore",
    "StoreConfigurationError",
    "TokenStats",
    "UsageFilter",
    "UsageRecord",
    "UsageStore",
    "UsageSummary",
    "open_store",
    "resolve_url",
]
