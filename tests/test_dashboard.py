"""The dashboard: served on 127.0.0.1, read-only, rendered in a real headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from usage_callbacks import Budget, TokenUsage, UsageTracker
from usage_callbacks.charts import TOP_GROUPS
from usage_callbacks.dashboard import make_server
from usage_callbacks.store import open_store

#: Five days of calls ending a week ago: inside the page's default window (30 days).
DAY0 = datetime.now(timezone.utc).replace(hour=9, minute=0, second=0, microsecond=0) - timedelta(
    days=12
)
SCREENSHOT = os.environ.get("USAGE_CALLBACKS_DASHBOARD_SHOT")


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'usage.db'}"
    budget = Budget(limit_usd=Decimal(1), per="user", period="day", name="team-daily")
    with UsageTracker(url, budgets=[budget], dimensions=["tenant"]) as tracker:
        for day in range(5):
            for user, model, tokens in [
                ("alice", "gpt-4o", 2000),
                ("bob", "gpt-4o-mini", 5000),
                ("alice", "claude-sonnet-4-5", 1000 * (day + 1)),
            ]:
                tracker.record(
                    TokenUsage(prompt_tokens=tokens, completion_tokens=tokens // 10),
                    model=model,
                    user_id=user,
                    node="answer" if model != "gpt-4o-mini" else "plan",
                    agent="researcher" if day % 2 else "writer",
                    thread_id=f"t{day % 3}",
                    dimensions={"tenant": "acme" if user == "alice" else "globex"},
                    ended_at=DAY0 + timedelta(days=day, hours=day),
                )
        tracker.record(TokenUsage(), model="gpt-4o", user_id="bob", status="error", ended_at=DAY0)
        tracker.record(TokenUsage(prompt_tokens=900), model="gpt-4o", user_id="carol")
        # before the default window: only an explicit range shows it
        tracker.record(
            TokenUsage(prompt_tokens=7), model="gpt-4o", user_id="dave", ended_at=DAY0 - OLD
        )
    return url


@pytest.fixture
def server(url: str) -> Iterator[str]:
    store = open_store(url, read_only=True)
    httpd = make_server(store, port=0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    store.close()


def summary_json(url: str, *filters: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-m", "usage_callbacks", "summary", "--db", url, "--json", *filters],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    data: dict[str, object] = json.loads(result.stdout)
    return data


def fetch(address: str) -> dict[str, object]:
    with urllib.request.urlopen(address, timeout=30) as response:
        data: dict[str, object] = json.loads(response.read())
    return data


OLD = timedelta(days=40)
#: Page filters and the summary options that ask for the same records.
FILTERS = [
    [],
    ["--user", "alice"],
    ["--model", "gpt-4o"],
    ["--agent", "researcher"],
    ["--thread", "t1"],
    ["--node", "plan"],
    ["--dimension", "tenant=acme"],
    ["--agent", "writer", "--dimension", "tenant=globex"],
]


def _query(filters: list[str]) -> str:
    """The page's query string for summary options (``--dimension k=v``: ``dimension:k=v``)."""
    pairs = []
    for name, value in zip(filters[::2], filters[1::2], strict=True):
        if name == "--dimension":
            key, _, value = value.partition("=")
            pairs.append((f"dimension:{key}", value))
        else:
            pairs.append((name.lstrip("-"), value))
    return urllib.parse.urlencode(pairs)


def _since(days_ago: int = 29) -> str:
    """The page's default window starts at 00:00 UTC this many days ago."""
    return f"{datetime.now(timezone.utc) - timedelta(days=days_ago):%Y-%m-%d}"


@pytest.mark.parametrize("filters", FILTERS)
def test_the_data_equals_summary_json(url: str, server: str, filters: list[str]) -> None:
    data = fetch(f"{server}/api/data?{_query(filters)}")
    window = [*filters, "--since", _since()]
    _same_totals(data["totals"], summary_json(url, *window))  # type: ignore[arg-type]
    for breakdown in data["breakdowns"]:  # type: ignore[attr-defined]
        level = breakdown["level"]
        expected = summary_json(url, *window, "--by", level)["groups"]
        assert breakdown["group_count"] == len(expected)  # type: ignore[arg-type]
        shown = [
            (group["key"], group["calls"], group["total_tokens"], group["cost_usd"])
            for group in breakdown["groups"]
        ]
        assert shown == [
            (
                group["key"],
                group["calls"],
                group["usage"]["total_tokens"],
                group["usage"]["cost_estimate_usd"],
            )
            for group in expected[:TOP_GROUPS]  # type: ignore[index]
        ], level


def _same_totals(totals: dict[str, Any], summary: dict[str, Any]) -> None:
    assert totals == {
        "calls": summary["calls"],
        "total_tokens": summary["usage"]["total_tokens"],
        "cost_usd": summary["usage"]["cost_estimate_usd"],
        "errors": summary["errors"],
        "unpriced_calls": summary["unpriced_calls"],
    }


def test_the_breakdowns_are_the_levels_and_the_declared_dimensions(server: str) -> None:
    data = fetch(f"{server}/api/data")
    assert [b["level"] for b in data["breakdowns"]] == [  # type: ignore[attr-defined]
        "model", "user", "node", "agent", "thread", "dimension:tenant",
    ]  # fmt: skip
    assert data["dimensions"] == ["tenant"]


def test_the_default_window_is_the_last_30_days_and_an_empty_since_reads_all(
    url: str, server: str
) -> None:
    recent = fetch(f"{server}/api/data")["totals"]
    everything = fetch(f"{server}/api/data?since=")["totals"]
    _same_totals(everything, summary_json(url))  # type: ignore[arg-type]
    assert everything["calls"] == recent["calls"] + 1  # type: ignore[index,operator]
    assert fetch(f"{server}/api/data?user=dave")["totals"]["calls"] == 0  # type: ignore[index]
    assert fetch(f"{server}/api/data?since=&user=dave")["totals"]["calls"] == 1  # type: ignore[index]


def test_series_by_hour_and_day_add_up(server: str) -> None:
    for bucket in ("day", "hour"):
        data = fetch(f"{server}/api/data?bucket={bucket}")
        total = sum(Decimal(row["cost_usd"]) for row in data["series"])  # type: ignore[attr-defined]
        assert total == Decimal(data["totals"]["cost_usd"])  # type: ignore[index]
    hours = {row["bucket"] for row in fetch(f"{server}/api/data?bucket=hour")["series"]}  # type: ignore[attr-defined]
    assert f"{DAY0 + timedelta(days=1, hours=1):%Y-%m-%d %H}" in hours


def test_budgets_forecast_and_errors(server: str) -> None:
    data = fetch(f"{server}/api/data")
    [carol] = [row for row in data["budgets"] if row["key"] == "carol"]  # type: ignore[attr-defined]
    assert carol["budget"] == "team-daily" and "rate" in carol["forecast"]
    assert [row["status"] for row in data["errors"]] == ["error"]  # type: ignore[attr-defined]
    costliest = [Decimal(row["cost_usd"]) for row in data["costliest"]]  # type: ignore[attr-defined]
    assert costliest == sorted(costliest, reverse=True) and len(costliest) == 10


REMOTE = ("--host", "0.0.0.0")


def test_other_addresses_need_a_flag_and_a_token(url: str) -> None:
    for extra in ([], ["--allow-remote"], ["--token", "s3cret"]):
        result = subprocess.run(
            [sys.executable, "-m", "usage_callbacks", "dashboard", "--db", url, *REMOTE, *extra],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2 and "--allow-remote and --token" in result.stderr


def test_a_token_is_checked(url: str) -> None:
    store = open_store(url, read_only=True)
    httpd = make_server(store, port=0, token="s3cret")
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            fetch(f"{base}/api/data")
        assert refused.value.code == 403
        assert fetch(f"{base}/api/data?token=s3cret")["totals"]["calls"] == 17  # type: ignore[index]
    finally:
        httpd.shutdown()
        httpd.server_close()
        store.close()


def test_the_page_needs_no_network() -> None:
    from usage_callbacks.dashboard import page

    text = page().decode()
    assert "src=" not in text and "href=" not in text and "@import" not in text
    assert re.findall(r"https?://[^\"' ]+", text) == []


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is required under CI=true (.ci/run installs it)")
        pytest.skip("chromium is not installed")
    return found


def _render(address: str, profile: Path, *extra: str) -> str:
    result = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=8000",
            "--window-size=1280,1800",
            *extra,
            address,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _shown(dom: str, element: str) -> str:
    found = re.search(rf'id="{element}">([^<]*)<', dom)
    assert found is not None, dom[:3000]
    return found.group(1)


def _table(dom: str, element: str) -> list[list[str]]:
    """The rows of a table the page drew (its header left out)."""
    found = re.search(rf'<table id="{element}">(.*?)</table>', dom, re.S)
    assert found is not None, dom[:3000]
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", found.group(1), re.S)
    return [re.findall(r"<td>([^<]*)</td>", row) for row in rows[1:]]


def test_the_page_renders_and_its_filters_change_the_numbers(
    url: str, server: str, tmp_path: Path
) -> None:
    everyone = _render(server + "/", tmp_path / "p1", "--dump-dom")
    assert 'data-loaded="yes"' in everyone
    total = summary_json(url, "--since", _since())
    assert _shown(everyone, "calls") == f"{total['calls']:,}"
    assert _shown(everyone, "tokens") == f"{total['usage']['total_tokens']:,}"  # type: ignore[index]
    assert everyone.count('class="bar"') == 3 * 5 + 1  # 3 models, 5 days, carol today
    later = f"{DAY0 + timedelta(days=2):%Y-%m-%d}"
    alice = _render(f"{server}/?user=alice&since={later}", tmp_path / "p2", "--dump-dom")
    expected = summary_json(url, "--user", "alice", "--since", later)
    assert _shown(alice, "calls") == f"{expected['calls']:,}" != _shown(everyone, "calls")
    cost = Decimal(expected["usage"]["cost_estimate_usd"])  # type: ignore[index]
    assert _shown(alice, "cost") == f"{cost:.6f}"
    for filters in ([], ["--agent", "researcher", "--dimension", "tenant=acme"]):
        dom = _render(f"{server}/?{_query(filters)}", tmp_path / "p4", "--dump-dom")
        for level, table in (("user", "by-user"), ("dimension:tenant", "by-dimension-tenant")):
            groups = summary_json(url, "--since", _since(), *filters, "--by", level)["groups"]
            assert _table(dom, table) == [
                [
                    group["key"] or "-",
                    f"{group['calls']:,}",
                    f"{group['usage']['total_tokens']:,}",
                    f"{Decimal(group['usage']['cost_estimate_usd']):.6f}",
                ]
                for group in groups  # type: ignore[union-attr]
            ]
    assert _table(dom, "by-user") != _table(everyone, "by-user")
    shot = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "dashboard.png"
    _render(server + "/", tmp_path / "p3", f"--screenshot={shot}")
    assert shot.stat().st_size > 10_000
