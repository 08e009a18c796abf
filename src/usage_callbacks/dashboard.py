"""``usage-callbacks dashboard``: a local, read-only web page over the usage database.

The server aggregates in SQL (the filters and sums of ``summary``) and answers JSON;
the page (``dashboard.html``, shipped in the package: no CDN, works offline) draws it and
asks again every few seconds, so it follows calls while they are recorded. It binds to
127.0.0.1; any other address needs ``allow_remote`` and a token every request carries.
"""

from __future__ import annotations

import hmac
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from typing import Any
from urllib.parse import parse_qs, urlsplit

from usage_callbacks import charts
from usage_callbacks.store import SqlStore, UsageFilter
from usage_callbacks.store.base import DIMENSION_PREFIX, Breakdown, GroupTotals
from usage_callbacks.store.ledger import BudgetStatus
from usage_callbacks.store.models import UsageRecord, pico_to_usd, usd_to_pico

logger = logging.getLogger("usage_callbacks")

LOOPBACK = ("127.0.0.1", "::1", "localhost")
#: Rows of the costliest-calls and errors tables.
TOP_ROWS = 10
#: The window the page shows until another is chosen.
DEFAULT_DAYS = 30
#: The page's breakdowns besides the declared dimensions.
BREAKDOWNS = ("model", "user", "node", "agent", "thread")
#: Queries of one refresh that run side by side.
QUERY_THREADS = 4


class DashboardConfigurationError(ValueError):
    """The dashboard was asked to do something unsafe; the message says what to add."""


def check_bind(host: str, *, allow_remote: bool, token: str | None) -> None:
    """Loopback only, unless the caller both asks for another address and sets a token."""
    if host in LOOPBACK:
        return
    if not allow_remote or not token:
        raise DashboardConfigurationError(
            f"refusing to serve usage data on {host}: other machines could read it. Pass "
            "--allow-remote and --token SECRET (every request must then carry the token)"
        )


def default_since(now: datetime) -> datetime:
    """The start of the page's default window: the last DEFAULT_DAYS UTC days, today too."""
    today = now.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=DEFAULT_DAYS - 1)


#: The page's filters and the UsageFilter field each sets.
FILTERS = {
    "user": "user_id",
    "model": "model",
    "session": "session_id",
    "node": "node",
    "agent": "agent",
    "thread": "thread_id",
}


def usage_filter(query: dict[str, list[str]]) -> UsageFilter:
    """The page's filters: user, model, session, node, agent, thread, ``dimension:KEY``
    and a since/until date range. Without ``since`` the last DEFAULT_DAYS days are read
    (a refresh stays bounded however old the database); an empty ``since`` reads all."""

    def text(name: str) -> str | None:
        value = (query.get(name) or [""])[0].strip()
        return value or None

    def moment(name: str) -> datetime | None:
        value = text(name)
        if value is None:
            return None
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)

    dimensions = {
        name.removeprefix(DIMENSION_PREFIX): value
        for name in query
        if name.startswith(DIMENSION_PREFIX) and (value := text(name)) is not None
    }
    since = moment("since") if "since" in query else default_since(_now())
    return UsageFilter(
        **{field: text(name) for name, field in FILTERS.items()},
        dimensions=dimensions or None,
        since=since,
        until=moment("until"),
    )


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _call(record: UsageRecord) -> dict[str, Any]:
    return {
        "ended_at": record.ended_at.isoformat(),
        "model": record.model,
        "user_id": record.user_id,
        "node": record.node,
        "total_tokens": record.total_tokens,
        "cost_usd": str(record.cost_estimate_usd),
        "cost_known": record.cost_known,
        "status": record.status,
        "error_type": record.error_type,
    }


def forecast(status: BudgetStatus, now: datetime) -> str:
    """When the budget runs out at the rate spent so far this period, in words."""
    limit = status.budget.limit_usd
    if limit is None or status.remaining_usd is None:
        return "no dollar limit"
    if status.remaining_usd <= 0:
        return "used up"
    elapsed = (now - status.period_start).total_seconds()
    spent = status.spent_usd + status.reserved_usd
    if elapsed <= 0 or spent <= 0:
        return "nothing spent yet"
    seconds_left = float(status.remaining_usd) * elapsed / float(spent)
    runs_out = now + timedelta(seconds=seconds_left)
    if runs_out >= status.period_end:
        return "lasts the period at this rate"
    return f"runs out at {runs_out:%Y-%m-%d %H:%M} UTC at this rate"


def levels(store: SqlStore) -> list[str]:
    """The breakdowns the page shows: the attribution levels and each declared dimension."""
    return [*BREAKDOWNS, *(DIMENSION_PREFIX + key for key in store.declared_dimensions())]


def _groups(breakdown: Breakdown) -> dict[str, Any]:
    level = breakdown.levels[0]
    return {
        "level": level,
        "chart": charts.breakdown_chart(breakdown, level.removeprefix(DIMENSION_PREFIX)),
        "group_count": breakdown.group_count,
        "groups": [
            {**group.model_dump(mode="json", exclude={"keys"}), "key": group.keys[0]}
            for group in breakdown.groups
        ],
    }


def _added(keys: tuple[str | None, ...], groups: list[GroupTotals]) -> GroupTotals:
    """One group of all ``groups``' numbers."""
    return GroupTotals(
        keys=keys,
        calls=sum(group.calls for group in groups),
        total_tokens=sum(group.total_tokens for group in groups),
        cost_usd=pico_to_usd(sum(usd_to_pico(group.cost_usd) for group in groups)),
        errors=sum(group.errors for group in groups),
        unpriced_calls=sum(group.unpriced_calls for group in groups),
    )


def _by_model(series: Breakdown) -> Breakdown:
    """The breakdown by model, added up from the spend chart's (bucket, model) groups
    (every call is in one): no query of its own, and the chart and table agree."""
    models: dict[str | None, list[GroupTotals]] = {}
    for group in series.groups:
        models.setdefault(group.keys[1], []).append(group)
    found = [_added((model,), groups) for model, groups in models.items()]
    found.sort(key=lambda group: (-group.cost_usd, group.keys[0] or ""))
    return Breakdown(levels=("model",), groups=found[: charts.TOP_GROUPS], group_count=len(found))


def snapshot(store: SqlStore, where: UsageFilter, *, hourly: bool) -> dict[str, Any]:
    """Everything the page shows, aggregated in SQL: one query per part, run side by side
    (sqlite3 and psycopg let other threads run while a query does)."""
    now = _now()
    shown = levels(store)
    bucket = "hour" if hourly else "day"
    with ThreadPoolExecutor(QUERY_THREADS) as pool:
        series = pool.submit(store.breakdown, where, (bucket, "model"))
        # the first level, model, is added up from the series; the others are queried
        queried = [
            pool.submit(store.breakdown, where, (level,), charts.TOP_GROUPS) for level in shown[1:]
        ]
        costliest = pool.submit(store.costliest, where, TOP_ROWS)
        errors = pool.submit(store.failures, where, TOP_ROWS)
        statuses = pool.submit(store.ledger.overview, now)
    budgets = [
        {
            "budget": status.budget.label,
            "key": status.key,
            "spent_usd": str(status.spent_usd),
            "limit_usd": None if status.budget.limit_usd is None else str(status.budget.limit_usd),
            "left_usd": None if status.remaining_usd is None else str(status.remaining_usd),
            "forecast": forecast(status, now),
        }
        for status in statuses.result()
    ]
    return {
        "totals": _added((), series.result().groups).model_dump(mode="json", exclude={"keys"}),
        "since": None if where.since is None else where.since.isoformat(),
        "dimensions": [level.removeprefix(DIMENSION_PREFIX) for level in shown[len(BREAKDOWNS) :]],
        "breakdowns": [
            _groups(breakdown)
            for breakdown in [_by_model(series.result()), *(f.result() for f in queried)]
        ],
        "spend_chart": charts.spend_chart(series.result(), hourly=hourly),
        "series": [
            {
                "bucket": group.keys[0],
                "model": group.keys[1] or "unknown",
                "cost_usd": str(group.cost_usd),
            }
            for group in series.result().groups
        ],
        "costliest": [_call(record) for record in costliest.result()],
        "errors": [_call(record) for record in errors.result()],
        "budgets": budgets,
        "as_of": now.isoformat(),
    }


def page() -> bytes:
    return files("usage_callbacks").joinpath("dashboard.html").read_bytes()


def make_server(
    store: SqlStore, host: str = "127.0.0.1", port: int = 8765, token: str | None = None
) -> ThreadingHTTPServer:
    """A server for the page and its data; ``serve_forever()`` runs it."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = parse_qs(url.query, keep_blank_values=True)
            if token is not None:
                given = (query.get("token") or [""])[0]
                if not hmac.compare_digest(given.encode(), token.encode()):
                    self._send(HTTPStatus.FORBIDDEN, b"a token is required", "text/plain")
                    return
            if url.path == "/":
                self._send(HTTPStatus.OK, page(), "text/html; charset=utf-8")
            elif url.path == "/api/data":
                try:
                    where = usage_filter(query)
                except (ValueError, TypeError) as error:
                    self._send(HTTPStatus.BAD_REQUEST, str(error).encode(), "text/plain")
                    return
                hourly = (query.get("bucket") or ["day"])[0] == "hour"
                body = json.dumps(snapshot(store, where, hourly=hourly), default=_json)
                self._send(HTTPStatus.OK, body.encode(), "application/json")
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain")

        def _send(self, status: HTTPStatus, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("dashboard: " + format, *args)

    return ThreadingHTTPServer((host, port), Handler)


def _json(value: Any) -> str:
    if isinstance(value, (Decimal, datetime)):
        return str(value) if isinstance(value, Decimal) else value.isoformat()
    raise TypeError(type(value).__name__)
