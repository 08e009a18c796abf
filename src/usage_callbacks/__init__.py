"""usage-callbacks: token usage, cost and budgets for LangChain and LlamaIndex applications.

Framework integrations live in ``usage_callbacks.langchain`` and
``usage_callbacks.llamaindex``; importing this package never imports a framework.
"""

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
from usage_callbacks.tracker import Reservation, UsageExporter, UsageTracker
from usage_callbacks.usage import TokenUsage

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
