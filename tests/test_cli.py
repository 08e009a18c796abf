"""The command line, driven as a subprocess against a populated SQLite file."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from usage_callbacks import Budget, TokenUsage, UsageTracker

DAY0 = datetime(2026, 11, 20, 9, tzinfo=timezone.utc)
MODELS = {"gpt-4o-mini": "openai", "claude-sonnet-4-5": "anthropic", "gpt-4o": "openai"}


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "usage_callbacks", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
        env={**os.environ, "USAGE_CALLBACKS_DB": "sqlite:///nowhere/none.db"},
    )


@pytest.fixture
def populated(tmp_path: Path) -> str:
    """Four days of calls: 3 models, 3 users, sessions, an error, a budget."""
    url = f"sqlite:///{tmp_path / 'usage.db'}"
    with UsageTracker(url, budgets=[Budget(limit_usd=Decimal(1), per="user", period="day")]) as t:
        for day in range(4):
            for index, (model, provider) in enumerate(MODELS.items()):
                for user in ("alice", "bob", "carol")[: day % 3 + 1]:
                    t.record(
                        TokenUsage(
                            prompt_tokens=1000 * (index + 1), completion_tokens=100 * (day + 1)
                        ),
                        model=model,
                        provider=provider,
                        user_id=user,
                        session_id=f"s{day}",
                        ended_at=DAY0 + timedelta(days=day, minutes=index),
                    )
        t.record(TokenUsage(), model="gpt-4o", status="error", ended_at=DAY0)
    return url


def test_summary_by_model_as_a_table_and_as_json(populated: str) -> None:
    table = run("summary", "--db", populated, "--by", "model")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["model", "calls", "prompt"]
    assert lines[-1].split()[:2] == ["TOTAL", "22"]
    data = json.loads(run("summary", "--db", populated, "--by", "model", "--json").stdout)
    assert data["calls"] == 22 and data["errors"] == 1
    assert {g["key"] for g in data["groups"]} == set(MODELS)
    assert Decimal(data["usage"]["cost_estimate_usd"]) == sum(
        Decimal(g["usage"]["cost_estimate_usd"]) for g in data["groups"]
    )
    assert {"p50", "p95", "p99"} <= set(data["stats"])


def test_filters_narrow_every_command(populated: str) -> None:
    alice = json.loads(run("summary", "--db", populated, "--user", "alice", "--json").stdout)
    assert alice["calls"] == 12
    since = json.loads(run("summary", "--db", populated, "--since", "2026-11-22", "--json").stdout)
    assert since["calls"] == 3 * 3 + 3 * 1
    model = json.loads(run("summary", "--db", populated, "--model", "gpt-4o", "--json").stdout)
    assert model["calls"] == 8  # 7 calls and the failed one


def test_markdown_report(populated: str, tmp_path: Path) -> None:
    out = tmp_path / "usage.md"
    result = run("report", "--db", populated, "--out", str(out))
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    for heading in ("## Totals", "## Cost by model", "## Last 10 calls", "cost / 1K tokens"):
        assert heading in text
    assert text.count("| claude-sonnet-4-5 |") >= 1
    last_calls = text.split("## Last 10 calls")[1].strip().splitlines()[2:]
    assert len(last_calls) == 10 and "2026-11-23" in last_calls[0]


def test_export_streams_every_record(populated: str, tmp_path: Path) -> None:
    csv_out, jsonl_out = tmp_path / "u.csv", tmp_path / "u.jsonl"
    assert (
        run("export", "--db", populated, "--format", "csv", "--out", str(csv_out)).returncode == 0
    )
    assert (
        run("export", "--db", populated, "--format", "jsonl", "--out", str(jsonl_out)).returncode
        == 0
    )
    rows = list(csv.DictReader(csv_out.open()))
    lines = [json.loads(line) for line in jsonl_out.read_text().splitlines()]
    assert len(rows) == len(lines) == 22
    assert rows[0]["id"] == lines[0]["id"] and json.loads(rows[0]["tags"]) == []
    assert sum(Decimal(r["cost_estimate_usd"]) for r in rows) == sum(
        Decimal(line["cost_estimate_usd"]) for line in lines
    )


def test_purge_asks_first(populated: str) -> None:
    refused = run("purge", "--db", populated, "--before", "2026-11-21")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    done = run("purge", "--db", populated, "--before", "2026-11-21", "--yes")
    assert done.returncode == 0 and "deleted 4 records" in done.stdout
    assert json.loads(run("summary", "--db", populated, "--json").stdout)["calls"] == 18


def test_budgets_show_spend_and_headroom(populated: str) -> None:
    result = run("budgets", "--db", populated)
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.startswith("user/day/$1")]
    # the fixture's spend is on past days: this period the budget is untouched
    assert line.split()[1:4] == ["-", "0.000000", "0.000000"] and "1.000000" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["summary", "--db", "not a url"], "not a database URL"),
        (["summary"], "no usage database at nowhere/none.db"),
        (["summary", "--db", "sqlite:///x.db", "--since", "last tuesday"], "is not a date"),
        (["report", "--db", "sqlite:///x.db", "--out", "r.pdf"], "use a .md or .html"),
        (["ingest", "missing.jsonl"], "no such file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_newer_schema_is_refused_in_one_line(populated: str) -> None:
    import sqlite3

    path = populated.removeprefix("sqlite:///")
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE usage_schema SET version = 99")
    result = run("summary", "--db", populated)
    assert result.returncode == 2 and "Upgrade usage-callbacks" in result.stderr


def test_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_text("hello" * 1000)
    result = run("summary", "--db", f"sqlite:///{junk}")
    assert result.returncode == 2 and "cannot use" in result.stderr


def test_ingest_loads_a_spill_file(tmp_path: Path) -> None:
    from usage_callbacks.store.spill import SpillFile

    with UsageTracker("memory://") as source:
        records = [source.record(TokenUsage(prompt_tokens=i + 1), model="m") for i in range(3)]
    spill = SpillFile(tmp_path / "spill.jsonl")
    spill.append(records)
    url = f"sqlite:///{tmp_path / 'target.db'}"
    result = run("ingest", "--db", url, str(spill.path))
    assert result.returncode == 0 and "ingested 3 records" in result.stdout
    assert json.loads(run("summary", "--db", url, "--json").stdout)["usage"]["total_tokens"] == 6


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("CI", "").lower() == "true":
        pytest.fail("chromium is required under CI=true (.ci/run installs it)")
    return found


def test_html_report_renders_its_charts_in_chromium(populated: str, tmp_path: Path) -> None:
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium is not installed")
    from PIL import Image

    from usage_callbacks.report import PALETTE

    out = tmp_path / "usage.html"
    assert run("report", "--db", populated, "--out", str(out)).returncode == 0
    text = out.read_text()
    assert "<script" not in text and "src=" not in text and "href=" not in text  # no network
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1000,2200",
            out.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    image = Image.open(shot).convert("RGB")
    colours = {pixel for count, pixel in image.getcolors(maxcolors=1 << 20) or [] if count > 200}

    def rgb(hex_colour: str) -> tuple[int, int, int]:
        return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]

    # one colour per model in the stacked spend chart, painted in large areas
    assert {rgb(colour) for colour in PALETTE[:3]} <= colours
    # four day columns: 4 stacks x 3 models
    assert text.count('class="bar" data-model=') == 12
    assert text.count('data-kind="') == 6


@pytest.fixture
def attributed_db(tmp_path: Path) -> str:
    """Calls in two graph nodes on two models, for two tenants."""
    url = f"sqlite:///{tmp_path / 'graph.db'}"
    with UsageTracker(url, dimensions=["tenant"]) as tracker:
        for node, model, tenant, tokens in [
            ("plan", "gpt-4o", "acme", 100),
            ("plan", "gpt-4o-mini", "acme", 10),
            ("act", "gpt-4o-mini", "globex", 30),
        ]:
            tracker.record(
                TokenUsage(prompt_tokens=tokens, cost_estimate_usd=Decimal(tokens) / 1000),
                model=model,
                node=node,
                thread_id="t1",
                dimensions={"tenant": tenant},
                ended_at=DAY0,
            )
    return url


def test_summary_by_node_and_model_nests_the_second_level(attributed_db: str) -> None:
    result = run("summary", "--db", attributed_db, "--by", "node,model")
    assert result.returncode == 0, result.stderr
    rows = [(line[:24].rstrip(), line.split()[-9]) for line in result.stdout.splitlines()[1:]]
    assert rows == [
        ("plan", "110"),
        ("  gpt-4o", "100"),
        ("  gpt-4o-mini", "10"),
        ("act", "30"),
        ("  gpt-4o-mini", "30"),
        ("TOTAL", "140"),
    ]
    as_json = json.loads(
        run("summary", "--db", attributed_db, "--by", "dimension:tenant", "--json").stdout
    )
    assert {g["key"]: g["usage"]["total_tokens"] for g in as_json["groups"]} == {
        "acme": 110,
        "globex": 30,
    }


def test_filters_by_attribution_reach_summary_export_and_purge(
    attributed_db: str, tmp_path: Path
) -> None:
    only_acme = run(
        "summary", "--db", attributed_db, "--dimension", "tenant=acme", "--node", "plan", "--json"
    )
    assert json.loads(only_acme.stdout)["calls"] == 2
    out = tmp_path / "act.jsonl"
    run("export", "--db", attributed_db, "--node", "act", "--format", "jsonl", "--out", str(out))
    [line] = out.read_text().splitlines()
    assert json.loads(line)["dimensions"] == {"tenant": "globex"}
    purged = run(
        "purge",
        "--db",
        attributed_db,
        "--before",
        "2030-01-01",
        "--thread",
        "t1",
        "--model",
        "gpt-4o",
        "--yes",
    )
    assert purged.stdout.strip() == "deleted 1 records"


@pytest.mark.parametrize(
    "args", [("summary", "--by", "nodes"), ("summary", "--dimension", "tenant")]
)
def test_bad_attribution_arguments_exit_2(attributed_db: str, args: tuple[str, ...]) -> None:
    result = run(*args, "--db", attributed_db)
    assert result.returncode == 2
    assert "node" in result.stderr or "key=value" in result.stderr


def test_report_breaks_down_by_node_then_model(attributed_db: str, tmp_path: Path) -> None:
    out = tmp_path / "usage.md"
    result = run("report", "--db", attributed_db, "--by", "node,model", "--out", str(out))
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    table = text[text.index("## Cost by node, then model") :].split("\n\n")[1]
    assert [row.split(" | ")[0:2] for row in table.splitlines()[2:]] == [
        ["| plan", "2"],
        ["| ↳ gpt-4o", "1"],
        ["| ↳ gpt-4o-mini", "1"],
        ["| act", "1"],
        ["| ↳ gpt-4o-mini", "1"],
    ]
