"""usage-callbacks: token usage, cost and budgets for LangChain and LlamaIndex applications.

Framework integrations live in ``usage_callbacks.langchain`` and
``usage_callbacks.llamaindex``; importing this package never imports a framework, and its
names are imported when first used (``usage-callbacks --help`` loads neither the price
tables, SQLAlchemy nor pydantic).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from usage_callbacks.attribution import Attribution
    from usage_callbacks.budgets import (
        Budget,
        BudgetExceededError,
        BudgetUnavailableError,
        BudgetWarning,
        UnpricedModelError,
    )
    from usage_callbacks.pricing import ModelPrice, PriceTable, calculate_cost, price
    from usage_callbacks.readers import normalize_usage
    from usage_callbacks.runs import Reservation
    from usage_callbacks.sessions import UsageSession, active_sessions
    from usage_callbacks.store import (
        GroupSummary,
        SchemaTooNewError,
        StoreConfigurationError,
        TokenStats,
        UsageFilter,
        UsageRecord,
        UsageSummary,
    )
    from usage_callbacks.store.ledger import BudgetStatus
    from usage_callbacks.tokens import (
        EncodingUnavailableError,
        count_message_tokens,
        count_text_tokens,
    )
    from usage_callbacks.tracker import UsageExporter, UsageTracker
    from usage_callbacks.usage import TokenUsage

#: Public name -> the module that defines it.
_EXPORTS = {
    "Attribution": "usage_callbacks.attribution",
    "Budget": "usage_callbacks.budgets",
    "BudgetExceededError": "usage_callbacks.budgets",
    "BudgetUnavailableError": "usage_callbacks.budgets",
    "BudgetWarning": "usage_callbacks.budgets",
    "UnpricedModelError": "usage_callbacks.budgets",
    "ModelPrice": "usage_callbacks.pricing",
    "PriceTable": "usage_callbacks.pricing",
    "calculate_cost": "usage_callbacks.pricing",
    "price": "usage_callbacks.pricing",
    "normalize_usage": "usage_callbacks.readers",
    "UsageSession": "usage_callbacks.sessions",
    "active_sessions": "usage_callbacks.sessions",
    "GroupSummary": "usage_callbacks.store",
    "SchemaTooNewError": "usage_callbacks.store",
    "StoreConfigurationError": "usage_callbacks.store",
    "TokenStats": "usage_callbacks.store",
    "UsageFilter": "usage_callbacks.store",
    "UsageRecord": "usage_callbacks.store",
    "UsageSummary": "usage_callbacks.store",
    "BudgetStatus": "usage_callbacks.store.ledger",
    "EncodingUnavailableError": "usage_callbacks.tokens",
    "count_message_tokens": "usage_callbacks.tokens",
    "count_text_tokens": "usage_callbacks.tokens",
    "Reservation": "usage_callbacks.runs",
    "UsageExporter": "usage_callbacks.tracker",
    "UsageTracker": "usage_callbacks.tracker",
    "TokenUsage": "usage_callbacks.usage",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'usage_callbacks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


__version__ = "0.1.0"

__all__ = [
    "Attribution",
    "Budget",
    "BudgetExceededError",
    "BudgetStatus",
    "BudgetUnavailableError",
    "BudgetWarning",
    "EncodingUnavailableError",
    "GroupSummary",
    "ModelPrice",
    "PriceTable",
    "Reservation",
    "SchemaTooNewError",
    "StoreConfigurationError",
    "TokenStats",
    "TokenUsage",
    "UnpricedModelError",
    "UsageExporter",
    "UsageFilter",
    "UsageRecord",
    "UsageSession",
    "UsageSummary",
    "UsageTracker",
    "active_sessions",
    "calculate_cost",
    "count_message_tokens",
    "count_text_tokens",
    "normalize_usage",
    "price",
]
