"""Budgets: what may be spent, by whom, over which period; and the error raised before."""

from __future__ import annotations

import calendar
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: "global", "user", "session", "model", "node", "agent" or "dimension:<declared key>".
Scope = str
_SCOPES = ("global", "user", "session", "model", "node", "agent")
DIMENSION_SCOPE = "dimension:"
Period = Literal["minute", "hour", "day", "week", "month"]

#: Far enough to never roll over, early enough for every database's timestamp type.
_FOREVER_START = datetime(2000, 1, 1, tzinfo=timezone.utc)
_FOREVER_END = datetime(9999, 1, 1, tzinfo=timezone.utc)
_PERIOD_WORDS = {
    "minute": "this minute",
    "hour": "this hour",
    "day": "today",
    "week": "this week",
    "month": "this month",
}
ANONYMOUS = "(none)"


@dataclass(frozen=True)
class CallScope:
    """Who and what a call is, as budgets see it."""

    user_id: str | None = None
    session_id: str | None = None
    session_ids: tuple[str, ...] = ()
    model: str | None = None
    node: str | None = None
    agent: str | None = None
    #: the call's declared dimensions, (key, value) sorted by key
    dimensions: tuple[tuple[str, str], ...] = ()


class Budget(BaseModel):
    """A spending limit in USD, tokens or both, per scope and calendar period (UTC)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    limit_usd: Decimal | None = Field(default=None, gt=0)
    limit_tokens: int | None = Field(default=None, gt=0)
    per: Scope = "global"
    period: Period | timedelta | None = None
    name: str | None = None
    warn_at: float | None = Field(default=None, gt=0, lt=1)
    on_exceed: Literal["raise", "warn"] = "raise"
    on_warning: Callable[[BudgetWarning], Any] | None = Field(default=None, exclude=True)
    #: Set for a session's own budget: applies only while that session is active.
    session_only: str | None = Field(default=None, exclude=True)

    def __init__(
        self,
        limit_usd: Decimal | float | str | None = None,
        limit_tokens: int | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(limit_usd, float):
            limit_usd = Decimal(str(limit_usd))
        super().__init__(limit_usd=limit_usd, limit_tokens=limit_tokens, **kwargs)

    @model_validator(mode="after")
    def _check(self) -> Budget:
        if self.limit_usd is None and self.limit_tokens is None:
            raise ValueError(
                "a Budget needs a limit: Budget(limit_usd=5) or Budget(limit_tokens=100_000) "
                "(or both)"
            )
        if isinstance(self.period, timedelta) and self.period <= timedelta(0):
            raise ValueError("a rolling period must be positive, e.g. period=timedelta(hours=1)")
        if self.per not in _SCOPES and not self.per.startswith(DIMENSION_SCOPE):
            raise ValueError(
                f"per={self.per!r}: use {', '.join(map(repr, _SCOPES))} or 'dimension:<key>' "
                "(a key declared with UsageTracker(dimensions=[...]))"
            )
        if self.session_only is not None and self.per != "session":
            raise ValueError("session_only budgets must have per='session'")
        return self

    @property
    def label(self) -> str:
        """The budget's name, or one made of its scope, period and limits: its ledger key."""
        if self.name:
            return self.name
        limits = []
        if self.limit_usd is not None:
            limits.append(f"${self.limit_usd}")
        if self.limit_tokens is not None:
            limits.append(f"{self.limit_tokens}tok")
        period = (
            self.period
            if isinstance(self.period, str)
            else (f"rolling{int(self.period.total_seconds())}s" if self.period else "ever")
        )
        scope = f"session:{self.session_only}" if self.session_only else self.per
        return f"{scope}/{period}/{'+'.join(limits)}"

    def scope_key(self, call: CallScope) -> str | None:
        """The bucket this call spends from, or None when the budget does not apply."""
        if self.session_only is not None:
            if self.session_only not in call.session_ids:
                return None
            return ledger_key(self.session_only)
        if self.per == "global":
            return "*"
        if self.per.startswith(DIMENSION_SCOPE):
            value = dict(call.dimensions).get(self.per.removeprefix(DIMENSION_SCOPE))
        else:
            value = {
                "user": call.user_id,
                "session": call.session_id,
                "model": call.model,
                "node": call.node,
                "agent": call.agent,
            }[self.per]
        return ledger_key(value) if value else ANONYMOUS

    def window(self, now: datetime) -> tuple[datetime, datetime]:
        """The current period: calendar periods in UTC, or a rolling window ending now."""
        now = now.astimezone(timezone.utc)
        if self.period is None:
            return _FOREVER_START, _FOREVER_END
        if isinstance(self.period, timedelta):
            return now - self.period, now
        if self.period == "minute":
            start = now.replace(second=0, microsecond=0)
            return start, start + timedelta(minutes=1)
        if self.period == "hour":
            start = now.replace(minute=0, second=0, microsecond=0)
            return start, start + timedelta(hours=1)
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        if self.period == "day":
            return day, day + timedelta(days=1)
        if self.period == "week":
            start = day - timedelta(days=day.weekday())
            return start, start + timedelta(days=7)
        start = day.replace(day=1)
        days = calendar.monthrange(start.year, start.month)[1]
        return start, start + timedelta(days=days)

    @property
    def is_rolling(self) -> bool:
        return isinstance(self.period, timedelta)

    def period_words(self) -> str:
        if isinstance(self.period, str):
            return _PERIOD_WORDS[self.period]
        if self.period is None:
            return "in total"
        return f"in the last {self.period}"


#: The ledger's key columns are VARCHAR(256) and PostgreSQL text holds no NUL byte.
_MAX_LEDGER_KEY = 200


def ledger_key(value: str) -> str:
    """The scope key as the ledger can store it: as given, or a readable prefix and a
    digest when it is too long or holds a NUL byte or a lone surrogate (such a user's every
    call used to be refused, fail-closed, or let through unbudgeted, fail-open)."""
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raw = b""
    if raw and len(value) <= _MAX_LEDGER_KEY and b"\x00" not in raw:
        return value
    escaped = value.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "?")
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{escaped[:64]}...sha256:{digest}"


@dataclass(frozen=True)
class BudgetWarning:
    """Passed to ``on_warning`` when spend first crosses ``warn_at`` in a period."""

    budget: Budget
    key: str
    spent_usd: Decimal
    spent_tokens: int
    period_start: datetime
    period_end: datetime


class BudgetExceededError(Exception):
    """Raised before the provider is called when a call could exceed a budget."""

    def __init__(
        self,
        *,
        budget: Budget,
        key: str,
        unit: Literal["usd", "tokens"],
        limit: Decimal | int,
        spent: Decimal | int,
        requested: Decimal | int,
        period_start: datetime,
        period_end: datetime,
    ) -> None:
        self.budget = budget
        self.key = key
        self.unit = unit
        self.limit = limit
        self.spent = spent
        self.requested = requested
        self.period_start = period_start
        self.period_end = period_end
        super().__init__(self._message())

    def _message(self) -> str:
        def amount(value: Decimal | int) -> str:
            if self.unit == "tokens":
                return f"{int(value):,} tokens"
            value = Decimal(value)
            cents = value.quantize(Decimal("0.01"))
            return f"${cents if cents == value or value >= 1 else value.normalize()}"

        who = "global" if self.budget.per == "global" else f"{self.budget.per} {self.key}"
        if self.budget.session_only:
            who = f"session {self.key}"
        text = (
            f"{who}: {amount(self.spent)} of {amount(self.limit)} spent "
            f"{self.budget.period_words()}; this call needs up to {amount(self.requested)}"
        )
        if self.budget.period is not None and not self.budget.is_rolling:
            text += f"; resets {self.period_end.strftime('%Y-%m-%dT%H:%MZ')}"
        return f"{text} [budget {self.budget.label}]"

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across process pools
        return (_rebuild_error, (type(self), self.__dict__.copy()))


def _rebuild_error(cls: type[BudgetExceededError], state: dict[str, Any]) -> BudgetExceededError:
    error = cls.__new__(cls)
    error.__dict__.update(state)
    Exception.__init__(error, error._message())
    return error


class BudgetUnavailableError(BudgetExceededError):
    """Fail-closed refusal: the budgets could not be checked (their database is away, or
    the call's worst case could not be worked out), so the call is not made."""

    def __init__(self, budget: Budget | None, key: str | None, cause: BaseException) -> None:
        self.cause = cause
        if budget is None:  # failed before knowing which budgets apply
            now = datetime.now(timezone.utc)
            self.budget, self.key, self.unit = None, key or "", "tokens"  # type: ignore[assignment]
            self.limit = self.spent = self.requested = 0
            self.period_start = self.period_end = now
            Exception.__init__(self, self._message())
            return
        start, end = budget.window(datetime.now(timezone.utc))
        super().__init__(
            budget=budget,
            key=key or "",
            unit="usd" if budget.limit_usd is not None else "tokens",
            limit=budget.limit_usd if budget.limit_usd is not None else budget.limit_tokens or 0,
            spent=0,
            requested=0,
            period_start=start,
            period_end=end,
        )

    def _message(self) -> str:
        what = f"budget {self.budget.label}" if self.budget is not None else "budgets"
        return (
            f"{what} could not be checked ({describe_failure(self.cause)}); refusing the call "
            "(fail-closed). Pass budget_failure_mode='open' to UsageTracker to allow calls "
            "when budgets cannot be checked."
        )


class UnpricedModelError(BudgetExceededError):
    """A $ budget applies but the call's model has no known price, and the tracker was
    told (``unpriced_usd_per_mtok=None``) to refuse such calls rather than bound them."""

    def __init__(self, model: str | None, budget: Budget) -> None:
        self.model = model
        start, end = budget.window(datetime.now(timezone.utc))
        super().__init__(
            budget=budget,
            key="",
            unit="usd",
            limit=budget.limit_usd or 0,
            spent=0,
            requested=0,
            period_start=start,
            period_end=end,
        )

    def _message(self) -> str:
        model = getattr(self, "model", None)
        return (
            f"model {model or '(not named in the request)'} has no known price, so budget "
            f"{self.budget.label} cannot bound this call; refusing it. Price it with "
            f"UsageTracker(prices={{{model or 'MODEL'!r}: ModelPrice(input_per_mtok=..., "
            "output_per_mtok=...)}), or set unpriced_usd_per_mtok to reserve unpriced calls "
            "at that rate."
        )


def describe_failure(error: BaseException) -> str:
    """What failed, in one line: the database driver's own words, never the SQL statement
    or its parameters (SQLAlchemy puts both in ``str(error)``; they hold user ids)."""
    cause = getattr(error, "orig", None) or error  # SQLAlchemy's DBAPIError wraps the driver's
    lines = str(cause).strip().splitlines()
    detail = lines[0][:200] if lines else ""
    return f"{type(cause).__name__}: {detail}" if detail else type(cause).__name__
