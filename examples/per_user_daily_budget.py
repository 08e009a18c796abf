"""A per-user daily budget that raises before the provider is called.

Free-tier users get $0.001 a day. Each call reserves its worst case (prompt by tiktoken
plus max_tokens) first; the call that would not fit is refused, and the "provider"
(a counting fake) never sees it.

    python examples/per_user_daily_budget.py
"""

import os
from decimal import Decimal

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage

from usage_callbacks import Budget, BudgetExceededError, UsageTracker
from usage_callbacks.langchain import UsageCallbackHandler

#: A database of its own: examples sharing ./usage.db counted each other's rows.
DB = os.environ.get("USAGE_CALLBACKS_DB", "sqlite:///per_user_daily_budget.db")


class Provider(GenericFakeChatModel):
    """A gpt-4o-mini stand-in that bills 900 prompt + 150 completion tokens a call."""

    model_name: str = "gpt-4o-mini"
    max_tokens: int = 200
    calls: int = 0

    def _generate(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        object.__setattr__(self, "calls", self.calls + 1)
        return super()._generate(*args, **kwargs)


def reply() -> AIMessage:
    usage = {"input_tokens": 900, "output_tokens": 150, "total_tokens": 1050}
    return AIMessage(content="Here you go.", usage_metadata=usage)


def main() -> None:
    free_tier = Budget(limit_usd=Decimal("0.001"), per="user", period="day", name="free-tier")
    model = Provider(messages=iter(reply() for _ in range(100)))
    with UsageTracker(DB, budgets=[free_tier]) as tracker:
        handler = UsageCallbackHandler(tracker, user_id="free-user-7")
        for attempt in range(1, 11):
            try:
                model.invoke("Summarise my inbox.", config={"callbacks": [handler]})
            except BudgetExceededError as refused:
                print(f"call {attempt} refused: {refused}")
                break
            print(f"call {attempt} answered")
        print(f"the provider was called {model.calls} times")


if __name__ == "__main__":
    main()
