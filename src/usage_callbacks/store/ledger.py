"""The budget ledger: spend counters and reservation holds, atomic across processes.

Each check-and-hold runs in one transaction that owns the budgets it touches: SQLite
takes the write lock up front (``BEGIN IMMEDIATE``); PostgreSQL takes a transaction
advisory lock per (budget, scope key), in sorted order so that workers never deadlock.
Spend lives in counters bucketed by period start (rolling windows use 60 buckets per
window and count a partly expired bucket whole, so they err towards refusing). Holds
carry an expiry so a crashed process cannot pin a budget forever.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Field, SQLModel

from usage_callbacks.budgets import ANONYMOUS, Budget, BudgetExceededError, BudgetWarning
from usage_callbacks.store.models import UTCDateTime, pico_to_usd, records_table, usd_to_pico

logger = logging.getLogger("usage_callbacks")


class BudgetCounter(SQLModel, table=True):
    """Spend booked against one budget, scope key and period bucket."""

    __tablename__: ClassVar[str] = "budget_counters"

    budget: str = Field(primary_key=True, max_length=256)
    scope_key: str = Field(primary_key=True, max_length=256)
    bucket_start: datetime = Field(primary_key=True, sa_type=UTCDateTime)
    spent_pico: int = Field(default=0, sa_type=sa.BigInteger)
    spent_tokens: int = Field(default=0, sa_type=sa.BigInteger)
    warned: bool = False


class BudgetHold(SQLModel, table=True):
    """Money and tokens reserved by a call in flight."""

    __tablename__: ClassVar[str] = "budget_holds"
    __table_args__ = (sa.Index("ix_budget_holds_scope", "budget", "scope_key", "expires_at"),)

    reservation_id: str = Field(primary_key=True, max_length=32)
    budget: str = Field(primary_key=True, max_length=256)
    scope_key: str = Field(primary_key=True, max_length=256)
    pico: int = Field(default=0, sa_type=sa.BigInteger)
    tokens: int = Field(default=0, sa_type=sa.BigInteger)
    expires_at: datetime = Field(sa_type=UTCDateTime)


class BudgetSeed(SQLModel, table=True):
    """When a budget's scope key was first booked: spend recorded before then (by an
    earlier process, or before the budget existed) was added to its counters then."""

    __tablename__: ClassVar[str] = "budget_seeds"

    budget: str = Field(primary_key=True, max_length=256)
    scope_key: str = Field(primary_key=True, max_length=256)
    seeded_at: datetime = Field(sa_type=UTCDateTime)


class BudgetDefinition(SQLModel, table=True):
    """A tracker's budget as configured in code, so the CLI can show headroom."""

    __tablename__: ClassVar[str] = "budget_definitions"

    budget: str = Field(primary_key=True, max_length=256)
    limit_pico: int | None = Field(default=None, sa_type=sa.BigInteger)
    limit_tokens: int | None = Field(default=None, sa_type=sa.BigInteger)
    per: str = Field(max_length=64)  # "dimension:<key>"
    period: str | None = Field(default=None, max_length=16)
    rolling_seconds: float | None = None

    @classmethod
    def of(cls, budget: Budget) -> BudgetDefinition:
        rolling = budget.period if isinstance(budget.period, timedelta) else None
        return cls(
            budget=budget.label,
            limit_pico=None if budget.limit_usd is None else usd_to_pico(budget.limit_usd),
            limit_tokens=budget.limit_tokens,
            per=budget.per,
            period=budget.period if isinstance(budget.period, str) else None,
            rolling_seconds=rolling.total_seconds() if rolling else None,
        )

    def to_budget(self) -> Budget:
        period: str | timedelta | None = self.period
        if self.rolling_seconds:
            period = timedelta(seconds=self.rolling_seconds)
        return Budget(
            limit_usd=None if self.limit_pico is None else pico_to_usd(self.limit_pico),
            limit_tokens=self.limit_tokens,
            per=self.per,
            period=period,
            name=self.budget,
        )


_definitions = BudgetDefinition.__table__  # type: ignore[attr-defined]
_counters = BudgetCounter.__table__  # type: ignore[attr-defined]
_holds = BudgetHold.__table__  # type: ignore[attr-defined]
_seeds = BudgetSeed.__table__  # type: ignore[attr-defined]
_records = records_table
#: The record column each scope's key names (None: every record counts).
_SCOPE_COLUMNS = {
    "user": _records.c.user_id,
    "session": _records.c.session_id,
    "model": _records.c.model,
    "global": None,
}
#: Charges known seeded, so that a renewal asks the database only the first time; bounded.
_MAX_KNOWN_SEEDED = 4096


#: Where a counter stops growing: below 2^63 with room for one more booking.
_SATURATED = 2**62


def _sum(column: Any) -> Any:
    return sa.func.coalesce(sa.func.sum(column), 0)


# Built once: constructing SQL expressions per call cost more than running them.
_same_charge = (_counters.c.budget == sa.bindparam("budget")) & (
    _counters.c.scope_key == sa.bindparam("key")
)
_spent = sa.select(_sum(_counters.c.spent_pico), _sum(_counters.c.spent_tokens)).where(
    _same_charge,
    _counters.c.bucket_start >= sa.bindparam("first"),
    _counters.c.bucket_start < sa.bindparam("end"),
)
_held = sa.select(_sum(_holds.c.pico), _sum(_holds.c.tokens)).where(
    _holds.c.budget == sa.bindparam("budget"),
    _holds.c.scope_key == sa.bindparam("key"),
    _holds.c.expires_at > sa.bindparam("now"),
)
_DROP_HOLD = sa.delete(_holds).where(
    _holds.c.reservation_id == sa.bindparam("reservation"),
    _holds.c.budget == sa.bindparam("budget"),
    _holds.c.scope_key == sa.bindparam("key"),
)
_DATABASE_NOW = sa.select(sa.func.now())
_spent_rows = _spent.subquery()
_held_rows = _held.subquery()
_USED = sa.select(*_spent_rows.c, *_held_rows.c).select_from(
    _spent_rows.join(_held_rows, sa.true())
)


@dataclass(frozen=True)
class Charge:
    """One budget bucket a call spends from."""

    budget: Budget
    key: str
    #: the budget's label, made once: it keys the ledger and is read on every call
    label: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", self.budget.label)

    @property
    def lock_id(self) -> int:
        digest = hashlib.blake2b(f"{self.label}\0{self.key}".encode(), digest_size=8)
        return int.from_bytes(digest.digest(), "big", signed=True)


@dataclass(frozen=True)
class BudgetStatus:
    budget: Budget
    key: str
    period_start: datetime
    period_end: datetime
    spent_usd: Decimal
    spent_tokens: int
    reserved_usd: Decimal
    reserved_tokens: int

    @property
    def remaining_usd(self) -> Decimal | None:
        if self.budget.limit_usd is None:
            return None
        return self.budget.limit_usd - self.spent_usd - self.reserved_usd

    @property
    def remaining_tokens(self) -> int | None:
        if self.budget.limit_tokens is None:
            return None
        return self.budget.limit_tokens - self.spent_tokens - self.reserved_tokens


def bucket_start(budget: Budget, now: datetime) -> datetime:
    """The counter row a spend at ``now`` is booked into."""
    return bucket_bounds(budget, now)[0]


def bucket_bounds(budget: Budget, now: datetime) -> tuple[datetime, datetime]:
    """The start and end of the counter bucket that holds ``now``."""
    start, end = budget.window(now)
    if not budget.is_rolling:
        return start, end
    assert isinstance(budget.period, timedelta)
    width = max(budget.period / 60, timedelta(seconds=1))
    epoch = datetime(2000, 1, 1, tzinfo=now.tzinfo)
    start = epoch + ((now - epoch) // width) * width
    return start, start + width


def _first_bucket(budget: Budget, now: datetime) -> datetime:
    start, _ = budget.window(now)
    return bucket_start(budget, start) if budget.is_rolling else start


class BudgetLedger:
    """Reserve, settle and release against budgets kept in the tracker's database."""

    def __init__(self, engine: Engine, lock: AbstractContextManager[object] | None = None) -> None:
        self.engine = engine
        self._guard = lock or nullcontext()
        self.dialect = engine.dialect.name
        SQLModel.metadata.create_all(engine, tables=[_counters, _holds, _definitions, _seeds])
        self._seeded: set[tuple[str, str]] = set()
        insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        self._insert = insert
        self._hold = insert(_holds).on_conflict_do_nothing()
        booking = insert(_counters)
        # saturating: a bucket past any limit needs no more precision, and an overflow
        # would fail every later booking of everyone sharing the budget
        least = sa.func.least if self.dialect == "postgresql" else sa.func.min
        self._add_spend = booking.on_conflict_do_update(
            index_elements=["budget", "scope_key", "bucket_start"],
            set_={
                column: least(
                    getattr(_counters.c, column), _SATURATED - getattr(booking.excluded, column)
                )
                + getattr(booking.excluded, column)
                for column in ("spent_pico", "spent_tokens")
            },
        )

    def _begin(self, connection: Connection) -> None:
        """Start the transaction that owns the budget rows touched next."""
        if self.dialect == "sqlite":
            connection.info["begin_mode"] = "IMMEDIATE"

    def _clock(self, connection: Connection, now: datetime) -> datetime:
        """The time budgets are judged by: the database's clock where there is one shared
        by every host (PostgreSQL), so that a host whose clock is off cannot see a rolling
        window's spend as already past (90 s of skew let 1,500 through a limit of 1,000);
        a SQLite file is local, its host's clock is the one that counts."""
        if self.dialect != "postgresql":
            return now
        database_now: datetime = connection.execute(_DATABASE_NOW).scalar_one()
        return database_now.astimezone(timezone.utc)

    def _lock(self, connection: Connection, charges: Sequence[Charge]) -> None:
        if self.dialect == "postgresql":
            for lock_id in sorted({charge.lock_id for charge in charges}):
                connection.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": lock_id})

    def _used(
        self, connection: Connection, charge: Charge, now: datetime
    ) -> tuple[int, int, int, int]:
        """Spent pico, spent tokens, held pico, held tokens for one charge right now."""
        row = connection.execute(
            _USED,
            {
                "budget": charge.label,
                "key": charge.key,
                "first": _first_bucket(charge.budget, now),
                "end": charge.budget.window(now)[1] + timedelta(seconds=1),
                "now": now,
            },
        ).one()
        return int(row[0]), int(row[1]), int(row[2]), int(row[3])

    def renew(
        self,
        lease_id: str,
        changes: Sequence[LeaseChange],
        now: datetime,
        ttl: timedelta,
        policy: LeasePolicy,
    ) -> Renewal:
        """Book each charge's spend, then set the lease's hold on it, in one transaction.

        The hold becomes what the caller keeps (calls in flight, an unused slice) plus
        what it needs now plus a fresh slice of the headroom left. When a charge has no
        room for what is needed, the spend is still booked, the hold shrinks to what is
        kept, and the renewal comes back refused: the caller raises after commit.
        """
        grants: list[Grant] = []
        warnings: list[BudgetWarning] = []
        overruns: list[BudgetExceededError] = []
        refused: BudgetExceededError | None = None
        with self._guard, self.engine.connect() as connection:
            self._begin(connection)
            with connection.begin():
                now = self._clock(connection, now)
                charges = [change.charge for change in changes]
                self._lock(connection, charges)
                connection.execute(
                    _DROP_HOLD,
                    [{"reservation": lease_id, "budget": c.label, "key": c.key} for c in charges],
                )
                for change in changes:
                    self._seed(connection, change.charge, now)
                    warning = self._book(connection, change, now)
                    if warning is not None:
                        warnings.append(warning)
                used = [self._used(connection, change.charge, now) for change in changes]
                for change, in_use in zip(changes, used, strict=True):
                    error = _check(change, in_use, now)
                    if error is None:
                        continue
                    if change.charge.budget.on_exceed == "warn":
                        overruns.append(error)
                    elif refused is None:
                        refused = error
                for change, in_use in zip(changes, used, strict=True):
                    grants.append(_grant(change, in_use, policy, granted=refused is None))
                rows = [
                    {
                        "reservation_id": lease_id,
                        "budget": change.charge.label,
                        "scope_key": change.charge.key,
                        "pico": grant.hold_pico,
                        "tokens": grant.hold_tokens,
                        "expires_at": now + ttl,
                    }
                    for change, grant in zip(changes, grants, strict=True)
                    if grant.hold_pico or grant.hold_tokens
                ]
                if rows:
                    connection.execute(self._hold, rows)
        return Renewal(grants, refused, overruns, warnings)

    def _seed(self, connection: Connection, charge: Charge, now: datetime) -> None:
        """The first booking of a charge starts from what the store already holds for it
        in the current window: calls recorded by earlier processes, or before the budget
        was added. Once per charge, inside the renewal's transaction (which owns it)."""
        known = (charge.label, charge.key)
        if known in self._seeded:
            return
        seeded = connection.execute(
            sa.select(_seeds.c.seeded_at).where(
                _seeds.c.budget == charge.label, _seeds.c.scope_key == charge.key
            )
        ).first()
        if seeded is None:
            for bucket, (pico, tokens) in self._recorded(connection, charge, now).items():
                self._add_to_bucket(connection, charge, bucket, pico, tokens)
            connection.execute(
                self._insert(_seeds).on_conflict_do_nothing(),
                {"budget": charge.label, "scope_key": charge.key, "seeded_at": now},
            )
        if len(self._seeded) >= _MAX_KNOWN_SEEDED:
            self._seeded.clear()
        self._seeded.add(known)

    def _recorded(
        self, connection: Connection, charge: Charge, now: datetime
    ) -> dict[datetime, tuple[int, int]]:
        """Stored spend of the charge's scope in its current window, by bucket."""
        budget = charge.budget
        per = "session" if budget.session_only else budget.per
        if per not in _SCOPE_COLUMNS:
            return {}  # a scope the records do not name: nothing to start from
        start, _ = budget.window(now)
        column = _SCOPE_COLUMNS[per]
        where = [_records.c.ended_at >= start, _records.c.ended_at < now]
        if column is not None:
            where.append(
                sa.or_(column.is_(None), column == "")
                if charge.key == ANONYMOUS
                else column == charge.key
            )
        if not budget.is_rolling:  # a calendar period is one bucket: sum in the database
            pico, tokens = connection.execute(
                sa.select(
                    _sum(sa.type_coerce(_records.c.cost_estimate_usd, sa.BigInteger)),
                    _sum(_records.c.total_tokens),
                ).where(*where)
            ).one()
            return {start: (int(pico), int(tokens))} if pico or tokens else {}
        buckets: dict[datetime, list[int]] = {}
        rows = sa.select(
            _records.c.ended_at, _records.c.cost_estimate_usd, _records.c.total_tokens
        ).where(*where)
        for ended_at, cost, tokens in connection.execute(rows):
            amounts = buckets.setdefault(bucket_start(budget, ended_at), [0, 0])
            amounts[0] += usd_to_pico(cost)
            amounts[1] += tokens
        return {bucket: (pico, tokens) for bucket, (pico, tokens) in buckets.items()}

    def _add_to_bucket(
        self, connection: Connection, charge: Charge, bucket: datetime, pico: int, tokens: int
    ) -> None:
        """Add spend to one counter row (created when new; saturating, as the counters are)."""
        connection.execute(
            self._add_spend,
            {
                "budget": charge.label,
                "scope_key": charge.key,
                "bucket_start": bucket,
                "spent_pico": min(pico, _SATURATED),
                "spent_tokens": min(tokens, _SATURATED),
                "warned": False,
            },
        )

    def _book(
        self, connection: Connection, change: LeaseChange, now: datetime
    ) -> BudgetWarning | None:
        """Add the change's spend to its period buckets; a warning if warn_at is crossed."""
        charge = change.charge
        bookings = change.bookings
        if not bookings:
            return None
        if self.dialect == "postgresql":  # by the database's clock (_clock), not the host's
            bookings = {
                bucket_start(charge.budget, now): (
                    sum(pico for pico, _ in bookings.values()),
                    sum(tokens for _, tokens in bookings.values()),
                )
            }
        for bucket, (pico, tokens) in sorted(bookings.items()):
            self._add_to_bucket(connection, charge, bucket, pico, tokens)
        return self._crossed_warning(connection, charge, max(bookings), now)

    def _crossed_warning(
        self, connection: Connection, charge: Charge, bucket: datetime, now: datetime
    ) -> BudgetWarning | None:
        budget = charge.budget
        if budget.warn_at is None:
            return None
        spent_pico, spent_tokens, _, _ = self._used(connection, charge, now)
        over_usd = budget.limit_usd is not None and spent_pico >= usd_to_pico(
            budget.limit_usd * Decimal(str(budget.warn_at))
        )
        over_tokens = (
            budget.limit_tokens is not None and spent_tokens >= budget.limit_tokens * budget.warn_at
        )
        if not (over_usd or over_tokens):
            return None
        start, end = budget.window(now)
        # warn once per period: the first bucket of the window carries the flag
        already_warned = connection.execute(
            sa.select(sa.func.count()).where(
                _counters.c.budget == budget.label,
                _counters.c.scope_key == charge.key,
                _counters.c.bucket_start >= _first_bucket(budget, now),
                _counters.c.warned.is_(True),
            )
        ).scalar_one()
        if already_warned:
            return None
        connection.execute(
            sa.update(_counters)
            .where(
                _counters.c.budget == budget.label,
                _counters.c.scope_key == charge.key,
                _counters.c.bucket_start == bucket,
            )
            .values(warned=True)
        )
        return BudgetWarning(
            budget=budget,
            key=charge.key,
            spent_usd=pico_to_usd(spent_pico),
            spent_tokens=spent_tokens,
            period_start=start,
            period_end=end,
        )

    def register(self, budget: Budget) -> None:
        """Remember the budget's definition (latest wins) for readers such as the CLI."""
        row = BudgetDefinition.of(budget).model_dump()
        statement = self._insert(_definitions).values(**row)
        statement = statement.on_conflict_do_update(
            index_elements=["budget"], set_={k: v for k, v in row.items() if k != "budget"}
        )
        with self._guard, self.engine.begin() as connection:
            connection.execute(statement)

    def overview(self, now: datetime) -> list[BudgetStatus]:
        """Every registered budget, for every key with spend or holds this period."""
        with self._guard, self.engine.connect() as connection:
            rows = connection.execute(sa.select(_definitions)).mappings().all()
        result: list[BudgetStatus] = []
        for row in rows:
            budget = BudgetDefinition(**row).to_budget()
            # a budget nobody spent from this period still shows, with all its headroom
            result += self.statuses(budget, now) or [_status(budget, "-", now, (0, 0, 0, 0))]
        return result

    def status(self, charges: Sequence[Charge], now: datetime) -> list[BudgetStatus]:
        """The status of each charge given."""
        with self._guard, self.engine.connect() as connection:
            now = self._clock(connection, now)
            return [
                _status(charge.budget, charge.key, now, self._used(connection, charge, now))
                for charge in charges
            ]

    def statuses(
        self,
        budget: Budget,
        now: datetime,
        *,
        key: str | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[BudgetStatus]:
        """The budget's status for each scope key with spend or holds this period, in key
        order: only ``key``, or the first ``limit`` keys after ``after`` (keyset paging,
        read from the indexes a page at a time). A global budget always has its key."""
        label = budget.label
        with self._guard, self.engine.connect() as connection:
            now = self._clock(connection, now)
            spent_where = [
                _counters.c.budget == label,
                _counters.c.bucket_start >= _first_bucket(budget, now),
                _counters.c.bucket_start < budget.window(now)[1] + timedelta(seconds=1),
            ]
            held_where = [_holds.c.budget == label, _holds.c.expires_at > now]
            wheres = ((_counters.c.scope_key, spent_where), (_holds.c.scope_key, held_where))
            for column, where in wheres:
                if key is not None:
                    where.append(column == key)
                if after is not None:
                    where.append(column > after)
            if limit is not None:  # this page's keys: the first of each index, merged
                found: set[str] = set()
                for column, where in wheres:
                    first_keys = sa.select(column).where(*where).distinct().order_by(column)
                    found.update(connection.execute(first_keys.limit(limit)).scalars())
                page = sorted(found)[:limit]
                for column, where in wheres:
                    where.append(column <= page[-1] if page else sa.false())
            spent = _sums_by_key(connection, _counters.c, "spent_pico", "spent_tokens", spent_where)
            held = _sums_by_key(connection, _holds.c, "pico", "tokens", held_where)
        keys = set(spent) | set(held)
        if budget.per == "global" and key in (None, "*") and (after is None or after < "*"):
            keys.add("*")
        return [
            _status(budget, name, now, (*spent.get(name, (0, 0)), *held.get(name, (0, 0))))
            for name in sorted(keys)[:limit]
        ]


def _sums_by_key(
    connection: Connection, columns: Any, pico: str, tokens: str, where: list[Any]
) -> dict[str, tuple[int, int]]:
    """Pico and tokens summed per scope key of the rows ``where`` selects."""
    key = columns.scope_key
    rows = connection.execute(
        sa.select(key, _sum(columns[pico]), _sum(columns[tokens])).where(*where).group_by(key)
    )
    return {name: (int(p), int(t)) for name, p, t in rows}


def _status(
    budget: Budget, key: str, now: datetime, in_use: tuple[int, int, int, int]
) -> BudgetStatus:
    spent_pico, spent_tokens, held_pico, held_tokens = in_use
    start, end = budget.window(now)
    return BudgetStatus(
        budget=budget,
        key=key,
        period_start=start,
        period_end=end,
        spent_usd=pico_to_usd(spent_pico),
        spent_tokens=spent_tokens,
        reserved_usd=pico_to_usd(held_pico),
        reserved_tokens=held_tokens,
    )


@dataclass(frozen=True)
class LeasePolicy:
    """How big a slice of the headroom a renewal adds to a process's hold."""

    #: Share of the headroom left after the call; 0 holds only what calls need.
    fraction: float = 0.125
    #: Cap, in multiples of the call that asked: a small call never pins a large budget.
    max_calls: int = 32


@dataclass(frozen=True)
class LeaseChange:
    """What a process books and asks of one charge in a renewal.

    The new hold is ``keep + need + free``. ``keep`` is held unchecked: the calls in
    flight and ``spare``, the unused room the process had, which its other threads may
    be spending while the ledger is asked; ``free`` tops the spare up to a fresh slice
    sized by ``unit`` (its typical call), never beyond the headroom left.
    """

    charge: Charge
    #: Spend to move from the hold to the counters: bucket start -> (pico, tokens).
    bookings: Mapping[datetime, tuple[int, int]]
    keep_pico: int = 0
    keep_tokens: int = 0
    need_pico: int = 0
    need_tokens: int = 0
    spare_pico: int = 0
    spare_tokens: int = 0
    unit_pico: int = 0
    unit_tokens: int = 0
    #: the part of ``keep`` that is the asking call's (it took the room the process had):
    #: a refusal reports it as requested, not as spent
    placed_pico: int = 0
    placed_tokens: int = 0


@dataclass(frozen=True)
class Grant:
    """The hold a charge now has, and the spend booked in its window (for warn_at)."""

    hold_pico: int
    hold_tokens: int
    spent_pico: int
    spent_tokens: int


@dataclass(frozen=True)
class Renewal:
    grants: list[Grant]
    refused: BudgetExceededError | None
    overruns: list[BudgetExceededError]
    warnings: list[BudgetWarning]


def _check(
    change: LeaseChange, in_use: tuple[int, int, int, int], now: datetime
) -> BudgetExceededError | None:
    """The error if the change's need does not fit next to spend and every other hold."""
    if not (change.need_pico or change.need_tokens):
        return None
    budget = change.charge.budget
    spent_pico, spent_tokens, held_pico, held_tokens = in_use
    used_pico = spent_pico + held_pico + change.keep_pico
    used_tokens = spent_tokens + held_tokens + change.keep_tokens
    start, end = budget.window(now)
    if budget.limit_usd is not None and used_pico + change.need_pico > usd_to_pico(
        budget.limit_usd
    ):
        return BudgetExceededError(
            budget=budget,
            key=change.charge.key,
            unit="usd",
            limit=budget.limit_usd,
            spent=pico_to_usd(used_pico - change.placed_pico),
            requested=pico_to_usd(change.need_pico + change.placed_pico),
            period_start=start,
            period_end=end,
        )
    if budget.limit_tokens is not None and used_tokens + change.need_tokens > budget.limit_tokens:
        return BudgetExceededError(
            budget=budget,
            key=change.charge.key,
            unit="tokens",
            limit=budget.limit_tokens,
            spent=used_tokens - change.placed_tokens,
            requested=change.need_tokens + change.placed_tokens,
            period_start=start,
            period_end=end,
        )
    return None


def _grant(
    change: LeaseChange, in_use: tuple[int, int, int, int], policy: LeasePolicy, *, granted: bool
) -> Grant:
    spent_pico, spent_tokens, held_pico, held_tokens = in_use
    budget = change.charge.budget
    hold_pico, hold_tokens = change.keep_pico, change.keep_tokens
    if granted:
        limit_pico = None if budget.limit_usd is None else usd_to_pico(budget.limit_usd)
        hold_pico += change.need_pico + _free(
            limit_pico,
            spent_pico + held_pico + hold_pico + change.need_pico,
            change.spare_pico,
            change.unit_pico,
            policy,
        )
        hold_tokens += change.need_tokens + _free(
            budget.limit_tokens,
            spent_tokens + held_tokens + hold_tokens + change.need_tokens,
            change.spare_tokens,
            change.unit_tokens,
            policy,
        )
    return Grant(hold_pico, hold_tokens, spent_pico, spent_tokens)


def _free(limit: int | None, in_use: int, spare: int, unit: int, policy: LeasePolicy) -> int:
    """Room added ahead of need: what a fresh slice of the headroom (a share of it,
    capped at ``max_calls`` typical calls) exceeds the spare kept (part of ``in_use``) by."""
    if limit is None or policy.fraction == 0:
        return 0
    headroom = limit - in_use
    fresh = min(int((headroom + spare) * policy.fraction), unit * policy.max_calls)
    return max(0, min(fresh - spare, headroom))
