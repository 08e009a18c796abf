"""UsageTracker: the one place usage goes to be priced, budgeted, counted and stored."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

from usage_callbacks.allowances import BudgetAllowances
from usage_callbacks.attribution import (
    NO_ATTRIBUTION,
    Attribution,
    Dimensions,
    check_dimension_keys,
    check_given_dimensions,
    declared_dimensions,
    merge_dimensions,
)
from usage_callbacks.budgets import (
    DIMENSION_SCOPE,
    Budget,
    BudgetExceededError,
    BudgetUnavailableError,
    BudgetWarning,
    CallScope,
    UnpricedModelError,
    describe_failure,
    ledger_key,
)
from usage_callbacks.collected import collected_pending, wait_for_collected, when_collected
from usage_callbacks.pricing import ModelPrice, PricedUsage, Pricer, PriceTable
from usage_callbacks.runs import CALLS, Reservation, RunState, TrackerRuns
from usage_callbacks.sessions import UsageSession, active_sessions, sessions_of
from usage_callbacks.store import UsageFilter, UsageSummary, open_store
from usage_callbacks.store.base import GroupBy
from usage_callbacks.store.ledger import BudgetStatus, Charge, LeasePolicy, Renewal
from usage_callbacks.store.models import (
    UsageRecord,
    fit_text_columns,
    new_record_id,
    usd_to_pico,
    utcnow,
)
from usage_callbacks.store.spill import SpillFile, ingest_file
from usage_callbacks.store.writer import BatchWriter
from usage_callbacks.usage import (
    MAX_COST_PER_CALL_USD,
    MAX_TOKENS_PER_CALL,
    CallType,
    TokenUsage,
    build_usage,
)

logger = logging.getLogger("usage_callbacks")

DEFAULT_OUTPUT_ALLOWANCE = 1024
#: Seconds a call waits for the budget ledger before budget_failure_mode decides: as long
#: as SQLite waits for its write lock, so contention alone does not refuse calls; a server
#: that stops answering fails sooner (connect 5 s, unacknowledged sends 10 s).
DEFAULT_BUDGET_WAIT = 30.0
#: What a $ budget counts for a call whose model has no known price, per 1M tokens of any
#: kind: above the output rate of nearly every catalogued model (gpt-4.5 $150, o1 $60,
#: Claude Opus $75), so an unpriced model cannot overrun a $ limit by being unpriced.
DEFAULT_UNPRICED_USD_PER_MTOK = Decimal(150)
#: How long a refusal waits for the holds of garbage-collected calls to be given back.
_COLLECTED_WAIT_S = 1.0
#: Call scopes whose charges are remembered (users x sessions x models seen lately).
_MAX_REMEMBERED_SCOPES = 4096


class UsageExporter(Protocol):
    """Receives every record as it is made (metrics, logs); must not raise or block."""

    def export(self, record: UsageRecord) -> None: ...


class UsageTracker:
    """Prices, budgets, session totals and persistence for tracked calls.

    ``url`` is a SQLAlchemy URL (``sqlite:///usage.db``, ``postgresql+psycopg://...``) or
    ``memory://``; None reads ``$USAGE_CALLBACKS_DB`` and falls back to
    ``sqlite:///usage.db``. When the budget database cannot be reached,
    ``budget_failure_mode="closed"`` (the default) refuses calls with
    BudgetUnavailableError (a BudgetExceededError); ``"open"`` allows them with a warning.
    A call waits for the ledger at most ``budget_wait`` seconds (a partitioned database
    that neither answers nor refuses), then the same mode decides; a thread whose call
    fits the hold this process has never waits, and ``record()`` never waits for it.
    Records are written in batches from a background thread
    (at most ``batch_size`` records or ``flush_interval`` seconds old); ``durable=True``
    writes each record before ``record()`` returns. ``record()`` never waits for the
    database: beyond two batches queued, the oldest goes to ``spill_path`` (JSONL), read
    back as the database catches up (or by the next tracker on it, if this process dies).
    While the database is away records wait in memory (at most ``max_buffer``, ~3 KB
    each), then spill.

    Budgets are checked in memory against a hold this process keeps in the ledger: the
    call's worst case plus ``budget_lease_fraction`` of the headroom left (at most 32
    calls' worth), renewed in one transaction when it runs short. Other processes see
    the hold, so a shared limit is never overspent; 0 holds only what calls need and
    books every call at once (two transactions a call, nothing held ahead).

    ``dimensions`` declares the metadata keys kept per call (``["tenant", "feature"]``),
    from LangChain run metadata, handler and session arguments and LlamaIndex; no other
    metadata is stored. Summaries group by ``"dimension:tenant"``, budgets apply
    ``per="dimension:tenant"``.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        budgets: Iterable[Budget] = (),
        prices: PriceTable | dict[str, ModelPrice] | None = None,
        batch_size: int = 500,
        flush_interval: float = 0.5,
        durable: bool = False,
        reservation_ttl: timedelta = timedelta(minutes=10),
        default_output_allowance: int = DEFAULT_OUTPUT_ALLOWANCE,
        exporters: Iterable[UsageExporter] = (),
        log_usage: bool = False,
        budget_failure_mode: Literal["closed", "open"] = "closed",
        budget_wait: float = DEFAULT_BUDGET_WAIT,
        max_buffer: int = 10_000,
        spill_path: str | Path | None = None,
        budget_lease_fraction: float = LeasePolicy.fraction,
        dimensions: Iterable[str] = (),
        unpriced_usd_per_mtok: Decimal | float | str | None = DEFAULT_UNPRICED_USD_PER_MTOK,
    ) -> None:
        if not 0 <= budget_lease_fraction < 1:
            raise ValueError("budget_lease_fraction must be in [0, 1); 0 books every call")
        if budget_failure_mode not in ("closed", "open"):
            raise ValueError("budget_failure_mode must be 'closed' (refuse) or 'open' (allow)")
        if not budget_wait > 0:
            raise ValueError("budget_wait must be a positive number of seconds")
        self.dimensions = check_dimension_keys(
            [dimensions] if isinstance(dimensions, str) else dimensions
        )
        self.declared_dimensions = frozenset(self.dimensions)
        self.store = open_store(url)
        if self.dimensions:
            self.store.index_dimensions(self.dimensions)
        self.pricer = Pricer(prices)
        self.runs = TrackerRuns(self, CALLS)
        self.durable = durable
        self.reservation_ttl = reservation_ttl
        self.default_output_allowance = default_output_allowance
        self.budget_failure_mode = budget_failure_mode
        self.unpriced_usd_per_mtok = _unpriced_rate(unpriced_usd_per_mtok)
        self._allowances = BudgetAllowances(
            self.store.ledger,
            ttl=reservation_ttl,
            policy=LeasePolicy(fraction=budget_lease_fraction),
            book_interval=flush_interval,
            wait=budget_wait,
            announce=_announce,
        )
        self._budgets: list[Budget] = []
        #: the budgets of open sessions by label, with the sessions sharing each (two
        #: requests of one conversation open the same session name at once)
        self._session_budgets: dict[str, Budget] = {}
        #: the open sessions sharing each session budget, weakly: one never exited ends
        #: when it is garbage-collected
        self._session_budget_owners: dict[str, weakref.WeakSet[UsageSession]] = {}
        # re-entrant: a session collected while the lock is held releases its budget share
        self._budget_lock = threading.RLock()
        #: the charges of each call scope seen, until the budgets change
        self._charges_by_scope: dict[CallScope, tuple[Charge, ...]] = {}
        if isinstance(budgets, Budget):
            raise TypeError("budgets takes a list of budgets: budgets=[Budget(...)]")
        self._exporters: list[UsageExporter] = list(exporters)
        if log_usage:
            from usage_callbacks.exporters.log import LogExporter

            self._exporters.append(LogExporter())
        self._writer = BatchWriter(
            self.store,
            batch_size=batch_size,
            max_delay=flush_interval,
            max_buffer=max(max_buffer, batch_size),
            spill=SpillFile(Path(spill_path)) if spill_path else None,
            store_identity=self.store.identity,
        )
        self._closed = False
        self._atexit = _register_exit_and_fork(self)
        try:
            for budget in budgets:
                self.add_budget(budget)
        except BaseException:  # a bad budget: stop the writer before the error reaches the caller
            self.close()
            raise

    # ------------------------------------------------------------------ budgets

    def add_budget(self, budget: Budget) -> None:
        """Enforce ``budget`` from the next call on; its period starts from the spend the
        store already holds for it (records still queued are written first)."""
        self._writer.flush(30.0)
        if not isinstance(budget, Budget):
            raise TypeError(f"add_budget takes a Budget, not {type(budget).__name__}")
        key = budget.per.removeprefix(DIMENSION_SCOPE)
        if budget.per.startswith(DIMENSION_SCOPE) and key not in self.declared_dimensions:
            raise ValueError(
                f"budget per={budget.per!r}: declare the dimension first, "
                f"UsageTracker(dimensions=[{key!r}, ...])"
            )
        with self._budget_lock:
            if any(existing.label == budget.label for existing in self._budgets):
                raise ValueError(
                    f"a budget labelled {budget.label!r} exists; give one of them a name="
                )
            self._budgets.append(budget)
            self._charges_by_scope = {}
        try:
            self.store.ledger.register(budget)
        except Exception as error:  # only readers (the CLI) miss it; say why, not the SQL
            logger.warning(
                "could not save budget %s for readers (%s)", budget.label, describe_failure(error)
            )

    @property
    def budgets(self) -> list[Budget]:
        with self._budget_lock:
            return [*self._budgets, *self._session_budgets.values()]

    @property
    def has_budgets(self) -> bool:
        """Adapters skip pre-call token estimation when this is False."""
        return bool(self._budgets or self._session_budgets)

    def _charges(self, scope: CallScope) -> tuple[Charge, ...]:
        """The budgets a call spends from, remembered per scope until the budgets change
        (building them cost ~2 µs of every reservation)."""
        known = self._charges_by_scope
        charges = known.get(scope)
        if charges is None:
            charges = tuple(
                Charge(budget, key)
                for budget in self.budgets
                if (key := budget.scope_key(scope)) is not None
            )
            if len(known) >= _MAX_REMEMBERED_SCOPES:
                known.clear()
            known[scope] = charges
        return charges

    def _scope(
        self,
        model: str | None,
        user_id: str | None,
        session_id: str | None,
        sessions: Sequence[UsageSession],
        attribution: Attribution = NO_ATTRIBUTION,
    ) -> CallScope:
        return CallScope(
            user_id=user_id,
            session_id=session_id,
            session_ids=tuple(session.session_id for session in sessions) if sessions else (),
            model=model,
            node=attribution.node,
            agent=attribution.agent,
            dimensions=attribution.dimensions,
        )

    def reserve(
        self,
        *,
        model: str | None,
        provider: str | None = None,
        prompt_tokens: int = 0,
        max_output_tokens: int | None = None,
        embedding_tokens: int = 0,
        user_id: str | None = None,
        session_id: str | None = None,
        sessions: Sequence[UsageSession] | None = None,
        attribution: Attribution = NO_ATTRIBUTION,
    ) -> Reservation | None:
        """Hold the most this call can cost against every budget that applies.

        Raises BudgetExceededError (holding nothing) when any budget would be exceeded.
        Returns None when no budget applies. ``max_output_tokens`` None means the
        tracker's ``default_output_allowance``. ``attribution`` places the call for
        budgets per node, agent or dimension (sessions add their dimensions).
        """
        if not self.has_budgets:
            return None
        sessions = self._sessions(sessions)
        if sessions:
            user_id, session_id = self._defaults(user_id, session_id, sessions)
            attribution = _with_session_dimensions(attribution, sessions)
        charges = self._charges(self._scope(model, user_id, session_id, sessions, attribution))
        if not charges:
            return None
        if embedding_tokens:
            output = 0
        elif max_output_tokens is None:
            output = self.default_output_allowance
        else:
            output = max_output_tokens
        _check_token_counts(prompt_tokens, output, embedding_tokens)
        estimate = build_usage(
            prompt=prompt_tokens, completion=output, embedding=embedding_tokens, estimated=True
        )
        now = utcnow()
        usd = self._budget_usd(estimate, model, provider, now, charges)
        reservation = Reservation(
            id=new_record_id(), charges=charges, usd=usd, tokens=estimate.total, estimate=estimate
        )
        try:
            renewal = self._hold(reservation, now)
        except BudgetExceededError:
            raise
        except Exception as error:
            return self._ledger_unavailable(error, charges, reservation)
        # a reservation dropped without being settled or released (its call's state was
        # collected: an abandoned call) gives its hold back
        reservation.when_dropped = when_collected(
            reservation, self._allowances.abandon, reservation.id, reservation.charges
        )
        reservation.when_dropped.atexit = False
        for warning in renewal.warnings if renewal else ():
            _announce(warning)
        return reservation

    def _hold(self, reservation: Reservation, now: datetime) -> Renewal | None:
        """Hold ``reservation`` in the allowances. Holds of calls just garbage-collected are
        given back on a thread of their own: a refusal waits for them (briefly) to stand."""

        def hold() -> Renewal | None:
            return self._allowances.reserve(
                reservation.id,
                reservation.charges,
                usd_to_pico(reservation.usd),
                reservation.tokens,
                now,
            )

        try:
            return hold()
        except BudgetExceededError:
            if not collected_pending() or not wait_for_collected(_COLLECTED_WAIT_S):
                raise
            return hold()

    def _budget_usd(
        self,
        estimate: TokenUsage,
        model: str | None,
        provider: str | None,
        now: datetime,
        charges: Sequence[Charge],
    ) -> Decimal:
        """What a reservation holds against $ limits: the model's price, or for a model
        without one the ``unpriced_usd_per_mtok`` bound (None: refuse, saying how to price)."""
        priced = self.pricer.price(estimate, model, provider, now)
        if priced.known or not any(c.budget.limit_usd is not None for c in charges):
            return priced.cost_usd
        if self.unpriced_usd_per_mtok is None:
            usd_budget = next(c.budget for c in charges if c.budget.limit_usd is not None)
            raise UnpricedModelError(model, usd_budget)
        return self.unpriced_usd_per_mtok * estimate.total / _MTOK

    def _ledger_unavailable(
        self, error: Exception, charges: Sequence[Charge], reservation: Reservation
    ) -> Reservation | None:
        """The budget database is away: refuse (fail-closed) or allow with a warning."""
        self.budget_check_failed(error, charges[0])
        return None

    def budget_check_failed(self, error: BaseException, charge: Charge | None = None) -> None:
        """Something failed on the way to a call's reservation (counting its prompt, reaching
        the ledger): refuse it with BudgetUnavailableError (``budget_failure_mode="closed"``)
        or let it through with a warning (``"open"``). Never a silent pass."""
        if self.budget_failure_mode == "open":
            logger.warning(
                "budgets could not be checked (%s); allowing the call (fail-open)",
                describe_failure(error),
            )
            return
        budget, key = (charge.budget, charge.key) if charge else (None, None)
        raise BudgetUnavailableError(budget, key, error) from error

    def release(self, reservation: Reservation | None) -> None:
        """Drop a reservation whose call never happened (never raises)."""
        if reservation is not None:
            reservation.ended()
            self._allowances.release(reservation.id, reservation.charges)

    def forget_runs(self, states: list[RunState]) -> None:
        """Calls whose end never came within the reservation TTL: release their holds."""
        for state in states:
            self.release(state.reservation)
        logger.warning(
            "%d calls started over %s ago and never ended (no end or error event); "
            "forgotten, and their budget holds released",
            len(states),
            self.reservation_ttl,
        )

    def budget_status(
        self, key: str | None = None, *, limit: int | None = None, after: str | None = None
    ) -> list[BudgetStatus]:
        """Spend, holds and headroom of every budget for every scope key seen this period,
        in key order. ``key`` (a user id, session id, ...) reads that key alone; ``limit``
        reads the first ``limit`` keys after ``after`` (each with a status per budget it
        has), a page at a time from the database's indexes: pass the last status's key as
        ``after`` for the next page. A global budget's key is ``"*"``."""
        now = utcnow()
        # book our spend and hand back our unused slice: reserved = calls in flight,
        # plus the slices other processes hold
        for warning in self._allowances.sync(now, keep_slices=False):
            _announce(warning)
        wanted = None if key is None else ledger_key(key)
        statuses = [
            status
            for budget in self.budgets
            for status in self.store.ledger.statuses(
                budget, now, key=wanted, after=after, limit=limit
            )
        ]
        statuses.sort(key=lambda status: (status.key, status.budget.label))
        if limit is not None:
            keys = sorted({status.key for status in statuses})[:limit]
            statuses = [status for status in statuses if status.key <= keys[-1]] if keys else []
        return statuses

    # ------------------------------------------------------------------ recording

    def price(
        self, usage: TokenUsage, model: str | None, provider: str | None = None
    ) -> PricedUsage:
        return self.pricer.price(usage, model, provider)

    def record(
        self,
        usage: TokenUsage,
        *,
        model: str | None = None,
        provider: str | None = None,
        call_type: CallType = "chat",
        framework: str = "manual",
        user_id: str | None = None,
        session_id: str | None = None,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        tags: Sequence[str] | None = None,
        status: str = "ok",
        error_type: str | None = None,
        started_at: datetime | None = None,
        ended_at: datetime | None = None,
        latency_ms: float | None = None,
        cache_hit: bool = False,
        sessions: Sequence[UsageSession] | None = None,
        reservation: Reservation | None = None,
        node: str | None = None,
        agent: str | None = None,
        thread_id: str | None = None,
        run_name: str | None = None,
        root_run_name: str | None = None,
        dimensions: Mapping[str, Any] | None = None,
    ) -> UsageRecord:
        """Price, book against budgets, add to open sessions, queue for storage, export.

        Usage that already carries a cost keeps it; otherwise it is priced here. A cache
        hit bills nothing. Storage and budget failures are logged, never raised; a naive
        or non-datetime time is refused (ValueError, TypeError) before anything is kept.
        ``node`` ... ``dimensions`` say where the call was made; only the declared
        dimension keys are kept, the rest is dropped.
        """
        kept = declared_dimensions(self.declared_dimensions, dimensions)
        sessions = self._sessions(sessions)
        if sessions:
            user_id, session_id = self._defaults(user_id, session_id, sessions)
            tags = [*(tags or ()), *(tag for session in sessions for tag in session.tags)]
            kept = merge_dimensions(_session_dimensions(sessions), kept)
        # checked here, not in the writer: a naive time would fail its batch again and again
        ended_at = utcnow() if ended_at is None else _as_utc(ended_at, "ended_at")
        if started_at is not None:
            started_at = _as_utc(started_at, "started_at")
        total = usage.total
        values = {
            **usage.__dict__,  # the TokenUsage fields, read without validation
            "total_tokens": total,
            "cost_known": True,
            "id": new_record_id(),
            "started_at": started_at or ended_at,
            "ended_at": ended_at,
            "latency_ms": latency_ms,
            "framework": framework,
            "provider": provider,
            "model": model,
            "call_type": call_type,
            "run_id": None if run_id is None else str(run_id),
            "parent_run_id": None if parent_run_id is None else str(parent_run_id),
            "session_id": session_id,
            "user_id": user_id,
            "tags": list(dict.fromkeys(map(str, tags))) if tags else [],
            "status": status,
            "error_type": error_type,
            "cache_hit": cache_hit,
            "node": node,
            "agent": agent,
            "thread_id": thread_id,
            "run_name": run_name,
            "root_run_name": root_run_name,
            "dimensions": dict(kept) if kept else None,
        }
        if cache_hit:
            values.update(_NOTHING_BILLED)
        elif total > 0 and usage.cost_estimate_usd == 0:
            priced = self.pricer.price(usage, model, provider, ended_at)
            values["cost_estimate_usd"] = _bounded_cost(priced.cost_usd, model)
            values["cost_known"] = priced.known
        fit_text_columns(values)
        record = UsageRecord.from_values(values)
        self._settle(record, sessions, reservation)
        for session in sessions:
            session.add(record)
        if self.durable or self._closed:
            self._write_now(record)
        else:
            self._writer.submit(record)
        for exporter in self._exporters:
            try:
                exporter.export(record)
            except Exception:
                logger.warning("exporter %r failed", exporter, exc_info=True)
        return record

    def record_run(
        self,
        state: RunState,
        usage: TokenUsage,
        *,
        model: str | None = None,
        error: BaseException | None = None,
        cache_hit: bool = False,
    ) -> UsageRecord:
        """Record a call an adapter followed from its start event to its end."""
        return self.record(
            usage,
            model=model or state.model,
            provider=state.provider,
            call_type=state.call_type,
            framework=state.framework,
            user_id=state.user_id,
            session_id=state.session_id,
            run_id=state.run_id or None,
            parent_run_id=state.parent_run_id,
            tags=state.tags,
            status="ok" if error is None else "error",
            error_type=None if error is None else type(error).__name__,
            started_at=state.started_at,
            latency_ms=state.latency_ms(),
            cache_hit=cache_hit,
            sessions=state.sessions,
            reservation=state.reservation,
            node=state.attribution.node,
            agent=state.attribution.agent,
            thread_id=state.attribution.thread_id,
            run_name=state.attribution.run_name,
            root_run_name=state.attribution.root_run_name,
            dimensions=dict(state.attribution.dimensions),
        )

    def _settle(
        self, record: UsageRecord, sessions: Sequence[UsageSession], reservation: Reservation | None
    ) -> None:
        if reservation is not None:
            reservation.ended()
            charges = reservation.charges
        elif self.has_budgets:
            scope = self._scope(
                record.model, record.user_id, record.session_id, sessions, _attribution(record)
            )
            charges = self._charges(scope)
        else:
            return
        if not charges:
            return
        usd = record.cost_estimate_usd
        if not record.cost_known and self.unpriced_usd_per_mtok is not None:
            usd = self.unpriced_usd_per_mtok * record.total_tokens / _MTOK  # bounded, not free
        self._allowances.settle(
            reservation.id if reservation else None,
            charges,
            usd_to_pico(usd),
            record.total_tokens,
            record.ended_at,
        )

    def _write_now(self, record: UsageRecord) -> None:
        """``durable=True``, or after close(): write before returning; queue on failure."""
        if self._closed:
            logger.warning("record() after close(): writing synchronously")
        try:
            self.store.write([record])
        except Exception:
            logger.warning("writing a usage record failed; queueing it for retry", exc_info=True)
            self._writer.submit(record)

    def _sessions(self, sessions: Sequence[UsageSession] | None) -> tuple[UsageSession, ...]:
        if sessions is None:
            return sessions_of(self)
        if not sessions:
            return ()
        return tuple(session for session in sessions if session.tracker is self)

    @staticmethod
    def _defaults(
        user_id: str | None, session_id: str | None, sessions: Sequence[UsageSession]
    ) -> tuple[str | None, str | None]:
        """Fill user and session from the innermost open session."""
        for session in reversed(sessions):
            if session_id is None:
                session_id = session.session_id
            if user_id is None and session.user_id is not None:
                user_id = session.user_id
        return user_id, session_id

    # ------------------------------------------------------------------ sessions

    def session(
        self,
        name: str | None = None,
        *,
        user_id: str | None = None,
        tags: Sequence[str] | None = None,
        max_tokens: int | None = None,
        max_cost_usd: Decimal | float | str | None = None,
        dimensions: Mapping[str, Any] | None = None,
    ) -> UsageSession:
        """A context manager totalling every call made inside it, with an optional budget.

        ``dimensions`` (declared keys only) are given to every call made inside it.
        """
        session = UsageSession(
            self,
            name,
            user_id=user_id,
            tags=list(tags or []),
            dimensions=check_given_dimensions(self.declared_dimensions, dimensions),
        )
        if max_tokens is not None or max_cost_usd is not None:
            budget = Budget(
                limit_usd=max_cost_usd,
                limit_tokens=max_tokens,
                per="session",
                session_only=session.session_id,
            )
            with self._budget_lock:
                # sessions of one name and limits share one budget until the last closes
                budget = self._session_budgets.setdefault(budget.label, budget)
                owners = self._session_budget_owners.setdefault(budget.label, weakref.WeakSet())
                owners.add(session)
                self._charges_by_scope = {}
            # a session never exited ends when it is garbage-collected, and its share too
            when_collected(session, self._release_session_budget, budget.label)
        return session

    def forget_session(self, session: UsageSession) -> None:
        """Called when a session closes: its budget stops applying once no other open
        session shares it."""
        if any(open_session is session for open_session in active_sessions()):
            return  # still open in this context (re-entered)
        with self._budget_lock:
            label = next(
                (
                    label
                    for label, owners in self._session_budget_owners.items()
                    if session in owners
                ),
                None,
            )
            if label is None:
                return
            self._session_budget_owners[label].discard(session)
        self._release_session_budget(label)

    def _release_session_budget(self, label: str) -> None:
        """The last session sharing a session budget has closed (or been collected)."""
        with self._budget_lock:
            owners = self._session_budget_owners.get(label)
            if owners is None or any(True for _ in owners):  # iteration skips the dead
                return
            del self._session_budget_owners[label]
            budget = self._session_budgets.pop(label)
            self._charges_by_scope = {}
        self._allowances.forget(budget, utcnow())

    # ------------------------------------------------------------------ reading

    def records(self, *, limit: int | None = None, **filters: Any) -> list[UsageRecord]:
        """Stored records; filters: user_id, session_id, model, provider, since, until,
        node, agent, thread_id, run_name, root_run_name, dimensions={key: value}."""
        where = UsageFilter.of(**filters)
        self.flush()
        return self.store.records(where, limit)

    def summary(self, group_by: GroupBy | None = None, **filters: Any) -> UsageSummary:
        """Totals, per-group totals and per-call token percentiles, aggregated in SQL.

        ``group_by``: model, user, provider, session, day, node, agent, thread,
        run_name, root_run_name or dimension:<key>; two levels as ``"node,model"``
        (each group then holds its second-level ``groups``). Filters as for records().
        """
        where = UsageFilter.of(**filters)
        self.flush()
        return self.store.summary(where, group_by)

    def ingest(self, path: str | Path) -> int:
        """Store the records of a spill file (already stored ones are skipped)."""
        return ingest_file(Path(path), self.store)

    @property
    def spill_path(self) -> Path:
        """Where records go when the database is away and the buffer is full."""
        return self._writer.spill_path

    def purge(self, before: datetime, **filters: Any) -> int:
        """Delete records that ended before ``before`` (and match the filters, as for
        records()); returns how many."""
        before = _as_utc(before, "before")
        where = UsageFilter.of(**filters)
        self.flush()
        return self.store.purge(before, where)

    # ------------------------------------------------------------------ lifecycle

    def add_exporter(self, exporter: UsageExporter) -> None:
        self._exporters.append(exporter)

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Write everything recorded so far and book its spend against budgets; False if
        the store did not take the records in time."""
        started = time.monotonic()

        def left() -> float | None:
            return None if timeout is None else max(0.0, timeout - (time.monotonic() - started))

        collected = wait_for_collected(timeout)  # calls ended by garbage collection
        for warning in self._allowances.sync(utcnow(), timeout=left()):
            _announce(warning)
        return self._writer.flush(left()) and collected

    def close(self) -> None:
        if self._closed:
            return
        self._allowances.close(utcnow())
        self._writer.close()
        self._closed = True
        atexit.unregister(self._atexit)
        for exporter in self._exporters:
            shutdown = getattr(exporter, "shutdown", None)
            if callable(shutdown):
                shutdown()
        self.store.close()

    @property
    def closed(self) -> bool:
        """``close()`` was called: integrations stop enforcing budgets through it."""
        return self._closed

    def __enter__(self) -> UsageTracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"UsageTracker({self.store._safe_url()!r}, budgets={len(self.budgets)})"


#: A cache hit replays a stored answer: no tokens billed, nothing spent.
_NOTHING_BILLED = {name: 0 for name in TokenUsage.model_fields if name.endswith("_tokens")} | {
    "cost_estimate_usd": Decimal(0)
}


def _session_dimensions(sessions: Sequence[UsageSession]) -> Dimensions:
    """The open sessions' dimensions, inner sessions overriding outer ones."""
    found: Dimensions = ()
    for session in sessions:
        found = merge_dimensions(found, session.dimensions)
    return found


def _with_session_dimensions(
    attribution: Attribution, sessions: Sequence[UsageSession]
) -> Attribution:
    outer = _session_dimensions(sessions)
    if not outer:
        return attribution
    return attribution._replace(dimensions=merge_dimensions(outer, attribution.dimensions))


def _attribution(record: UsageRecord) -> Attribution:
    """A stored call's attribution, as budgets see it."""
    return Attribution(
        node=record.node,
        agent=record.agent,
        dimensions=tuple(sorted(record.dimensions.items())) if record.dimensions else (),
    )


_MTOK = Decimal(1_000_000)


def _bounded_cost(cost: Decimal, model: str | None) -> Decimal:
    """A call's cost, at most MAX_COST_PER_CALL_USD: one absurd usage report must not
    overflow the ledger's and the summaries' sums for everyone else."""
    if cost <= MAX_COST_PER_CALL_USD:
        return cost
    logger.warning(
        "a %s call priced at $%s, beyond the $%s a call can cost; recording $%s",
        model,
        cost,
        MAX_COST_PER_CALL_USD,
        MAX_COST_PER_CALL_USD,
    )
    return MAX_COST_PER_CALL_USD


def _unpriced_rate(value: Decimal | float | str | None) -> Decimal | None:
    if value is None:
        return None
    rate = Decimal(str(value)) if isinstance(value, float) else Decimal(value)
    if not rate.is_finite() or rate <= 0:
        raise ValueError(
            "unpriced_usd_per_mtok must be a positive price per 1M tokens (or None to refuse "
            f"unpriced models under $ budgets), not {value!r}"
        )
    return rate


def _as_utc(moment: datetime, name: str) -> datetime:
    """``moment`` in UTC; a naive datetime is refused (which zone would it be in?)."""
    if not isinstance(moment, datetime):
        raise TypeError(f"{name} must be a datetime, not {type(moment).__name__}")
    if moment.tzinfo is timezone.utc:
        return moment
    if moment.utcoffset() is None:
        raise ValueError(
            f"{name}={moment!r} is naive; pass a timezone-aware datetime, e.g. "
            "datetime.now(timezone.utc)"
        )
    return moment.astimezone(timezone.utc)


def _check_token_counts(prompt: int, output: int, embedding: int) -> None:
    """A caller's token counts, checked as TokenUsage would check them."""
    counts = {"prompt_tokens": prompt, "max_output_tokens": output, "embedding_tokens": embedding}
    for name, value in counts.items():
        if type(value) is not int or not 0 <= value <= MAX_TOKENS_PER_CALL:
            raise ValueError(
                f"{name} must be an int from 0 to {MAX_TOKENS_PER_CALL}, not {value!r}"
            )


def _announce(warning: BudgetWarning) -> None:
    budget = warning.budget
    logger.warning(
        "budget %s for %s crossed %.0f%%: $%s and %d tokens spent %s",
        budget.label,
        warning.key,
        (budget.warn_at or 0) * 100,
        warning.spent_usd,
        warning.spent_tokens,
        budget.period_words(),
    )
    if budget.on_warning is not None:
        try:
            budget.on_warning(warning)
        except Exception:
            logger.warning("on_warning callback failed", exc_info=True)


def _register_exit_and_fork(tracker: UsageTracker) -> Any:
    """Flush (and checkpoint SQLite's log into the database file) at interpreter exit, and
    work on in a forked child (gunicorn ``--preload``, Celery prefork, multiprocessing's
    fork), without keeping the tracker alive.

    A child inherits no writer thread: it used to store nothing and block 10 s at exit.
    It gets its own writer and connections, and a multiprocessing child (which ends with
    ``os._exit``, skipping atexit) is flushed by multiprocessing's own exit finalizers.
    """
    reference = weakref.ref(tracker)

    def flush_at_exit() -> None:
        alive = reference()
        if alive is not None and not alive._closed:
            alive.flush(timeout=10)
            try:
                alive.store.checkpoint()
            except Exception as error:  # the interpreter is exiting: say so, never raise
                logger.warning("checkpointing the database at exit failed (%s)", error)

    def restart_in_child() -> None:
        alive = reference()
        if alive is None or alive._closed:
            return
        alive.store.reopen_in_child()
        alive._writer.restart_in_child()
        # not imported for this alone (10 ms); a multiprocessing child has it loaded
        util = sys.modules.get("multiprocessing.util")
        if util is not None:  # run once the child process object is set up
            util.register_after_fork(
                alive, lambda _: util.Finalize(None, flush_at_exit, exitpriority=10)
            )

    atexit.register(flush_at_exit)
    os.register_at_fork(after_in_child=restart_in_child)
    return flush_at_exit
