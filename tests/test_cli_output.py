"""What the command line prints, as a person at a terminal reads it."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from usage_callbacks import ModelPrice, TokenUsage, UsageTracker
from usage_callbacks.cli import main

DAY0 = datetime(2026, 11, 20, 9, tzinfo=timezone.utc)
LONG_MODEL = "accounts/fireworks/models/llama-v3p1-405b-instruct-long-name"


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'usage.db'}"
    prices = {"free-model": ModelPrice(input_per_mtok=Decimal(0), output_per_mtok=Decimal(0))}
    with UsageTracker(url, prices=prices) as tracker:
        for day, cost_rank in enumerate((1, 3, 2)):  # cost order differs from date order
            tracker.record(
                TokenUsage(prompt_tokens=2_201_579 * cost_rank, completion_tokens=842),
                model="gpt-4o",
                ended_at=DAY0 + timedelta(days=day),
            )
        tracker.record(TokenUsage(prompt_tokens=10), model="free-model", ended_at=DAY0)
        tracker.record(TokenUsage(prompt_tokens=10), model=LONG_MODEL, ended_at=DAY0)
    return url


def summary(capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    assert main(["summary", *args]) == 0
    return capsys.readouterr().out.splitlines()


def test_columns_never_run_together_and_labels_are_whole(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    lines = summary(capsys, "--db", url, "--by", "model")
    [row] = [line for line in lines if line.startswith("gpt-4o ")]
    cells = row.split()
    assert cells[1:6] == ["3", "13,209,474", "2,526", "0", "13,212,000"]
    assert any(line.startswith(LONG_MODEL + " ") for line in lines)  # not cut at 23


def test_days_are_in_date_order(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    lines = summary(capsys, "--db", url, "--by", "day")
    days = [line.split()[0] for line in lines if re.match(r"\d{4}-\d{2}-\d{2} ", line)]
    assert days == ["2026-11-20", "2026-11-21", "2026-11-22"]


def test_unpriced_cost_is_unknown_not_zero(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    lines = summary(capsys, "--db", url, "--by", "model")
    cost = {line.split()[0]: line.split()[6] for line in lines[2:] if line.strip()}
    assert cost[LONG_MODEL] == "unknown"
    assert cost["free-model"] == "0.000000"
    assert cost["TOTAL"].startswith("≥")  # a lower bound: one call had no price
    assert "1 calls have no known price" in lines[-1]


@pytest.mark.parametrize("width", [80, 100])
def test_tables_fit_the_terminal(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, width: int
) -> None:
    monkeypatch.setenv("COLUMNS", str(width))
    lines = summary(capsys, "--db", url, "--by", "model")
    assert max(len(line) for line in lines) <= width
    assert "…" not in "\n".join(lines)  # columns are left out, not cut
    [total] = [line for line in lines if line.startswith("TOTAL")]
    assert total.split()[1:3] == ["5", "13,209,494"]
