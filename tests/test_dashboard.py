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
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from usage_callbacks import Budget, TokenUsage, UsageTracker
from usage_callbacks.dashboard import make_server
from usage_callbacks.store import open_store

DAY0 = datetime(2026, 11, 20, 9, tzinfo=timezone.utc)
SCREENSHOT = os.environ.get("USAGE_CALLBACKS_DASHBOARD_SHOT")


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'usage.db'}"
    budget = Budget(limit_usd=Decimal(1), per="user", period="day", name="team-daily")
    with UsageTracker(url, budgets=[budget]) as tracker:
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
                    ended_at=DAY0 + timedelta(days=day, hours=day),
                )
        tracker.record(TokenUsage(), model="gpt-4o", user_id="bob", status="error", ended_at=DAY0)
        tracker.record(TokenUsage(prompt_tokens=900), model="gpt-4o", user_id="carol")
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


@pytest.mark.parametrize("filters", [[], ["--user", "alice"], ["--model", "gpt-4o"]])
def test_the_data_equals_summary_json(url: str, server: str, filters: list[str]) -> None:
    pairs = [(filters[i].lstrip("-"), filters[i + 1]) for i in range(0, len(filters), 2)]
    query = "&".join(f"{name}={value}" for name, value in pairs)
    data = fetch(f"{server}/api/data?{query}")
    assert data["summary"] == summary_json(url, *filters)


def test_series_by_hour_and_day_add_up(server: str) -> None:
    for bucket in ("day", "hour"):
        data = fetch(f"{server}/api/data?bucket={bucket}")
        total = sum(Decimal(row["cost_usd"]) for row in data["series"])  # type: ignore[attr-defined]
        assert total == Decimal(data["summary"]["usage"]["cost_estimate_usd"])  # type: ignore[index]
    hours = {row["bucket"] for row in fetch(f"{server}/api/data?bucket=hour")["series"]}  # type: ignore[attr-defined]
    assert "2026-11-21 10" in hours


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
        assert fetch(f"{base}/api/data?token=s3cret")["summary"]["calls"] == 17  # type: ignore[index]
    finally:
        httpd.shutdown()
        httpd.server_close()
        store.close()


def test_the_page_needs_no_network() -> None:
    from usage_callbacks.dashboard import page

    text = page().decode()
    assert "src=" not in text and "href=" not in text and "@import" not in text
    assert re.findall(r"https?://[^\"' ]+", text) == ["http://www.w3.org/2000/svg"]  # a name


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


def test_the_page_renders_and_its_filters_change_the_numbers(
    url: str, server: str, tmp_path: Path
) -> None:
    everyone = _render(server + "/", tmp_path / "p1", "--dump-dom")
    assert 'data-loaded="yes"' in everyone
    total = summary_json(url)
    assert _shown(everyone, "calls") == f"{total['calls']:,}"
    assert _shown(everyone, "tokens") == f"{total['usage']['total_tokens']:,}"  # type: ignore[index]
    assert everyone.count('class="bar"') == 3 * 5 + 1  # 3 models, 5 days, carol today
    alice = _render(server + "/?user=alice&since=2026-11-22", tmp_path / "p2", "--dump-dom")
    expected = summary_json(url, "--user", "alice", "--since", "2026-11-22")
    assert _shown(alice, "calls") == f"{expected['calls']:,}" != _shown(everyone, "calls")
    cost = Decimal(expected["usage"]["cost_estimate_usd"])  # type: ignore[index]
    assert _shown(alice, "cost") == f"{cost:.6f}"
    shot = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "dashboard.png"
    _render(server + "/", tmp_path / "p3", f"--screenshot={shot}")
    assert shot.stat().st_size > 10_000
