"""Budgets per tenant (a declared dimension), per node and per agent."""

from __future__ import annotations

from decimal import Decimal

import pytest

from usage_callbacks import Budget, BudgetExceededError, ModelPrice, TokenUsage, UsageTracker
from usage_callbacks.attribution import Attribution

# a token costs a micro-dollar
PRICES = {"m": ModelPrice(input_per_mtok=Decimal(1), output_per_mtok=Decimal(1))}


def _call(tracker: UsageTracker, attribution: Attribution, tokens: int = 100) -> None:
    """Reserve before the 'provider', then record what it billed."""
    reservation = tracker.reserve(
        model="m", prompt_tokens=tokens, max_output_tokens=0, attribution=attribution
    )
    tracker.record(
        TokenUsage(prompt_tokens=tokens),
        model="m",
        reservation=reservation,
        node=attribution.node,
        agent=attribution.agent,
        dimensions=dict(attribution.dimensions),
    )


def test_a_tenant_budget_refuses_that_tenant_only(store_url: str) -> None:
    budget = Budget(limit_tokens=250, per="dimension:tenant")
    with UsageTracker(store_url, dimensions=["tenant"], budgets=[budget], prices=PRICES) as tracker:
        acme = Attribution(dimensions=(("tenant", "acme"),))
        globex = Attribution(dimensions=(("tenant", "globex"),))
        _call(tracker, acme)
        _call(tracker, acme)
        with pytest.raises(BudgetExceededError) as refused:
            _call(tracker, acme)
        assert refused.value.key == "acme"
        assert "dimension:tenant acme" in str(refused.value)
        _call(tracker, globex)  # another tenant's bucket
        # calls with no tenant share one bucket of their own
        _call(tracker, Attribution())
        tracker.flush()
        spent = {
            status.key: status.spent_tokens
            for status in tracker.budget_status()
            if status.budget == budget
        }
        assert spent == {"acme": 200, "globex": 100, "(none)": 100}


def test_session_dimensions_place_calls_in_the_tenant_budget() -> None:
    budget = Budget(limit_tokens=150, per="dimension:tenant")
    with UsageTracker("memory://", dimensions=["tenant"], budgets=[budget]) as tracker:
        with tracker.session("s", dimensions={"tenant": "acme"}):
            _call(tracker, Attribution())
            with pytest.raises(BudgetExceededError):
                _call(tracker, Attribution())
        [record] = tracker.records()
        assert record.dimensions == {"tenant": "acme"}


@pytest.mark.parametrize("per", ["node", "agent"])
def test_node_and_agent_budgets(per: str) -> None:
    budget = Budget(limit_tokens=150, per=per)
    with UsageTracker("memory://", budgets=[budget], prices=PRICES) as tracker:
        place = {per: "planner"}
        _call(tracker, Attribution(**place))
        with pytest.raises(BudgetExceededError):
            _call(tracker, Attribution(**place))
        _call(tracker, Attribution(**{per: "executor"}))


def test_a_budget_per_undeclared_dimension_or_unknown_scope_is_refused() -> None:
    with pytest.raises(ValueError, match="declare the dimension"):
        UsageTracker("memory://", budgets=[Budget(limit_usd=1, per="dimension:tenant")])
    with pytest.raises(ValueError, match="dimension:<key>"):
        Budget(limit_usd=1, per="tenant")
    with (
        UsageTracker("memory://", dimensions=["tenant"]) as tracker,
        pytest.raises(ValueError, match="not declared"),
    ):
        tracker.session(dimensions={"feature": "x"})
