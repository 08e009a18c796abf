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
from usage_callbacks.store import UsageFilter

DAY0 = datetime(2026, 11, 20, 9, tzinfo=timezone.utc)
MODELS = {"gpt-4o-mini": "openai", "claude-sonnet-4-5": "anthropic", "gpt-4o": "openai"}
_FILTERS = ("since", "until", "user", "session", "model")


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
                        node=("plan", "answer", "review")[index],
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
    assert result.returncode == 0 and "ingested 3 new records" in result.stdout
    assert json.loads(run("summary", "--db", url, "--json").stdout)["usage"]["total_tokens"] == 6


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("CI", "").lower() == "true":
        pytest.fail("chromium is required under CI=true (.ci/run installs it)")
    return found


def test_html_report_renders_its_charts_in_chromium(populated: str, tmp_path: Path) -> None:
    """The dashboard's charts: spend stacked by model, per-user and per-node sections, both
    axes labelled, as wide as the window."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium is not installed")
    from PIL import Image, ImageChops

    from usage_callbacks.charts import PALETTE

    out = tmp_path / "usage.html"
    assert run("report", "--db", populated, "--out", str(out)).returncode == 0
    text = out.read_text()
    assert "<script" not in text and "src=" not in text and "href=" not in text  # no network
    shot = tmp_path / "shot.png"
    window = 1600
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
            f"--window-size={window},6000",
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
    # the same charts as the dashboard: a section per user and per node
    from usage_callbacks.dashboard import snapshot
    from usage_callbacks.store import UsageFilter, open_store

    store = open_store(populated, read_only=True)
    try:
        page = snapshot(store, UsageFilter(), hourly=False)
    finally:
        store.close()
    assert page["spend_chart"] in text
    for level in ("user", "node"):
        [chart] = [b["chart"] for b in page["breakdowns"] if b["level"] == level]
        assert f"<h2>Cost by {level}</h2>{chart}" in text
    # alice, bob, carol and three nodes; the error call has neither
    assert text.count('class="group-bar" data-key="') == 4 + 4
    for axis in ("spend (USD)", "UTC day", "cost (USD)", ">user<", ">node<", ">tokens<"):
        assert axis in text, axis
    # as wide as the window: the rightmost day's bar (its third model's part: that colour
    # is in no other chart here) ends near its right edge
    solid = Image.new("RGB", image.size, rgb(PALETTE[2]))
    found = ImageChops.difference(image, solid).convert("L").point(lambda v: 255 if v == 0 else 0)
    right = found.getbbox()[2]  # type: ignore[index]
    assert right > 0.8 * window, right  # a 760-wide chart in a 900-wide page: < 0.72


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
    lines = [line for line in result.stdout.splitlines()[2:] if line.strip()]
    rows = [(line.split("  ")[0] or "  " + line.split()[0], line.split()[-9]) for line in lines]
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


# ------------------------------------------------------------------ safety (issue 18)


def calls(url: str, *filters: str) -> int:
    result = run("summary", "--db", url, "--json", *filters)
    assert result.returncode == 0, result.stderr
    return int(json.loads(result.stdout)["calls"])


PURGE_FILTERS = [
    ["--user", "alice"],
    ["--session", "s1"],
    ["--model", "gpt-4o"],
    ["--since", "2026-11-22"],
]


@pytest.mark.parametrize("narrowing", PURGE_FILTERS, ids=lambda f: f[0])
def test_purge_deletes_only_what_its_filter_selects(populated: str, narrowing: list[str]) -> None:
    total, selected = calls(populated), calls(populated, *narrowing)
    assert 0 < selected < total
    done = run("purge", "--db", populated, "--before", "2027-01-01", "--yes", *narrowing)
    assert done.returncode == 0, done.stderr
    assert f"deleted {selected} records" in done.stdout
    assert calls(populated) == total - selected and calls(populated, *narrowing) == 0


REFUSED_FILTERS = [
    ("budgets", [], "--node"),
    ("budgets", [], "--since"),
    ("budgets", [], "--until"),
    *(("ingest", ["spill.jsonl"], f"--{name}") for name in _FILTERS),
    *(("demo", [], f"--{name}") for name in _FILTERS),
]


@pytest.mark.parametrize(("command", "rest", "option"), REFUSED_FILTERS)
def test_a_filter_a_command_cannot_apply_is_refused(
    populated: str, command: str, rest: list[str], option: str
) -> None:
    value = "2026-11-22" if option in ("--since", "--until") else "alice"
    result = run(command, "--db", populated, *rest, option, value)
    assert result.returncode == 2 and "unrecognized arguments" in result.stderr
    assert calls(populated) == 22  # nothing deleted, nothing recorded


@pytest.mark.parametrize(
    "narrowing", [*PURGE_FILTERS, ["--until", "2026-11-22"]], ids=lambda f: f[0]
)
def test_export_and_report_apply_every_filter(
    populated: str, narrowing: list[str], tmp_path: Path
) -> None:
    selected = calls(populated, *narrowing)
    out = tmp_path / "u.csv"
    assert run("export", "--db", populated, "--format", "csv", "--out", str(out), *narrowing)
    assert len(list(csv.DictReader(out.open()))) == selected
    report = run("report", "--db", populated, "--out", str(tmp_path / "r.md"), *narrowing)
    assert f"({selected} calls)" in report.stdout


def test_budgets_narrow_to_a_user(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'b.db'}"
    with UsageTracker(url, budgets=[Budget(limit_usd=Decimal(1), per="user", period="day")]) as t:
        for user in ("alice", "bob"):
            t.record(TokenUsage(prompt_tokens=1000), model="gpt-4o", user_id=user)
    everyone = run("budgets", "--db", url).stdout
    assert " alice " in everyone and " bob " in everyone
    alice = run("budgets", "--db", url, "--user", "alice").stdout
    assert " alice " in alice and " bob " not in alice
    assert "no budget rows" in run("budgets", "--db", url, "--user", "dave").stdout


def test_csv_export_neutralizes_formulas(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'u.db'}"
    hostile = {'=HYPERLINK("http://x")': "user", "+1+cmd": "model", "-2": "session"}
    with UsageTracker(url) as tracker:
        tracker.record(
            TokenUsage(prompt_tokens=1),
            user_id='=HYPERLINK("http://x")',
            model="+1+cmd",
            session_id="-2",
            tags=["@SUM(A1)"],
        )
    out = tmp_path / "u.csv"
    assert run("export", "--db", url, "--format", "csv", "--out", str(out)).returncode == 0
    [row] = list(csv.DictReader(out.open()))
    assert row["user_id"] == '\'=HYPERLINK("http://x")'
    assert row["model"] == "'+1+cmd" and row["session_id"] == "'-2"
    for value in row.values():
        assert not value.startswith(("=", "+", "-", "@")), (value, hostile)


def test_markdown_and_html_reports_escape_values(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'u.db'}"
    nasty = "a|b<script>alert(1)</script>\nc"
    with UsageTracker(url) as tracker:
        tracker.record(TokenUsage(prompt_tokens=1), model=nasty, user_id="u|v")
    md, page = tmp_path / "r.md", tmp_path / "r.html"
    assert run("report", "--db", url, "--out", str(md)).returncode == 0
    assert run("report", "--db", url, "--out", str(page)).returncode == 0
    text = md.read_text()
    assert "<script" not in text
    [row] = [line for line in text.split("## Last 10 calls")[1].splitlines() if "u\\|v" in line]
    unescaped_borders = len(row.split("|")) - 1 - row.count("\\|")
    assert unescaped_borders == 10  # nine cells: none split by a value's |
    html_text = page.read_text()
    assert "<script>" not in html_text
    assert "a|b&lt;script&gt;alert(1)&lt;/script&gt; c" in html_text


def _tables_and_journal(path: Path) -> tuple[list[str], str]:
    import sqlite3

    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master")]
        journal = connection.execute("PRAGMA journal_mode").fetchone()[0]
    connection.close()
    return tables, journal


@pytest.mark.parametrize("command", ["summary", "budgets", "export", "report"])
def test_reading_never_creates_or_alters_a_database(tmp_path: Path, command: str) -> None:
    import sqlite3

    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as connection:
        connection.execute("CREATE TABLE notes (text TEXT)")
    connection.close()
    empty = tmp_path / "empty.db"
    empty.touch()
    before = foreign.read_bytes()
    extra = {
        "export": ["--format", "csv", "--out", str(tmp_path / "x.csv")],
        "report": ["--out", str(tmp_path / "x.md")],
    }.get(command, [])
    for path in (foreign, empty):
        result = run(command, "--db", f"sqlite:///{path}", *extra)
        assert result.returncode == 2 and "not a usage-callbacks database" in result.stderr
    assert foreign.read_bytes() == before
    assert _tables_and_journal(foreign) == (["notes"], "delete")
    assert empty.stat().st_size == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".csv") == [
        "empty.db",
        "foreign.db",
    ]


def test_reading_a_usage_database_leaves_it_as_it_was(populated: str, tmp_path: Path) -> None:
    path = Path(populated.removeprefix("sqlite:///"))
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    for args in (["summary"], ["budgets"], ["report", "--out", str(tmp_path / "r.html")]):
        assert run(*args, "--db", populated).returncode == 0
    after = {p.name: p.read_bytes() for p in path.parent.iterdir() if p.name != "r.html"}
    assert after == before


def _damage(path: Path) -> None:
    """Overwrite pages in the middle of a SQLite file with garbage."""
    data = bytearray(path.read_bytes())
    page = 4096
    for start in range(2 * page, len(data) - page, 3 * page):
        data[start + 8 : start + page] = b"\xa5" * (page - 8)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["report", "--out", "{tmp}/missing/dir/x.html"], "no directory"),
        (["report", "--out", "{tmp}/missing/x.md"], "no directory"),
        (["export", "--format", "csv", "--out", "{tmp}/missing/x.csv"], "no directory"),
        (["export", "--format", "jsonl", "--out", "{tmp}"], "is a directory"),
        (["ingest", "{tmp}"], "is not a file"),
        (["summary", "--db", "sqlite:///{tmp}/damaged.db"], "damaged"),
    ],
)
def test_failures_are_one_line_and_exit_2(
    populated: str, tmp_path: Path, args: list[str], message: str
) -> None:
    damaged = tmp_path / "damaged.db"
    with UsageTracker(f"sqlite:///{damaged}") as tracker:
        for index in range(3000):
            tracker.record(TokenUsage(prompt_tokens=index + 1), model="m", user_id=f"u{index}")
    _damage(damaged)
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    if "--db" not in argv:
        argv += ["--db", populated]
    result = run(*argv)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_demo_into_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    result = run("demo", "--db", f"sqlite:///{tmp_path}/missing/x.db")
    assert result.returncode == 2 and "no directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_ingest_rejects_non_records_and_counts_duplicates(tmp_path: Path) -> None:
    from usage_callbacks.store.spill import SpillFile

    with UsageTracker("memory://") as source:
        records = [source.record(TokenUsage(prompt_tokens=i + 1), model="m") for i in range(3)]
    spill = SpillFile(tmp_path / "spill.jsonl")
    spill.append(records)
    with spill.path.open("a") as handle:
        handle.write('{"not": "a record"}\n[1, 2]\n')
    url = f"sqlite:///{tmp_path / 'target.db'}"
    first = run("ingest", "--db", url, str(spill.path))
    assert "ingested 3 new records" in first.stdout
    assert first.stderr.count("not a usage record") == 2
    again = run("ingest", "--db", url, str(spill.path))
    assert "ingested 0 new records" in again.stdout and "3 already stored" in again.stdout
    assert calls(url) == 3


EXPORT_STDOUT = ("--format", "jsonl", "--out", "-")


def test_export_to_stdout(populated: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "usage_callbacks", "export", "--db", populated, *EXPORT_STDOUT],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 22 and "exported 22" in result.stderr
    assert not (tmp_path / "-").exists()


def test_files_the_library_creates_are_owner_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from usage_callbacks.store.spill import SpillFile

    old = os.umask(0o022)
    try:
        url = f"sqlite:///{tmp_path / 'usage.db'}"
        with UsageTracker(url) as tracker:
            record = tracker.record(TokenUsage(prompt_tokens=5), model="m")
            tracker.flush()
            modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
        SpillFile(tmp_path / "spill" / "s.jsonl").append([record])
        run("export", "--db", url, "--format", "csv", "--out", str(tmp_path / "u.csv"))
        run("report", "--db", url, "--out", str(tmp_path / "u.html"))
        assert {"usage.db", "usage.db-wal", "usage.db-shm"} <= set(modes)
        assert set(modes.values()) == {0o600}
        for name in ("spill/s.jsonl", "u.csv", "u.html"):
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
        assert (tmp_path / "spill").stat().st_mode & 0o777 == 0o700
        monkeypatch.setenv("USAGE_CALLBACKS_FILE_MODE", "640")
        SpillFile(tmp_path / "shared.jsonl").append([record])
        assert (tmp_path / "shared.jsonl").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_reads_survive_rows_outside_token_usage_rules(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from usage_callbacks.store.models import UsageRecord

    url = f"sqlite:///{tmp_path / 'u.db'}"
    with UsageTracker(url, durable=True) as tracker:
        tracker.record(TokenUsage(prompt_tokens=5), model="m", user_id="alice")
        good = UsageRecord().model_dump()
        tracker.store.write(
            [
                UsageRecord.model_construct(**{**good, "id": "neg", "prompt_tokens": -5}),
                UsageRecord.model_construct(
                    **{**good, "id": "frac", "prompt_tokens": 2.5, "total_tokens": 2.5}
                ),
            ]
        )
        with caplog.at_level("WARNING", logger="usage_callbacks"):
            for group_by in (None, "model", "user", "day"):
                summary = tracker.summary(group_by=group_by)
                assert summary.usage.prompt_tokens == 5 and summary.calls == 1
            assert len(tracker.store.daily_by_model(UsageFilter())) == 1
        assert "leaving out 2 stored record(s)" in caplog.text
    result = run("summary", "--db", url, "--by", "user")
    assert result.returncode == 0 and "leaving out 2" in result.stderr


def test_sums_beyond_sqlite_integers_are_exact(tmp_path: Path) -> None:
    from usage_callbacks import ModelPrice

    url = f"sqlite:///{tmp_path / 'u.db'}"
    usage = TokenUsage(prompt_tokens=10**9)  # the most a call may report
    prices = {"pricey": ModelPrice(input_per_mtok=Decimal(5000), output_per_mtok=Decimal(5000))}
    with UsageTracker(url, prices=prices) as tracker:
        records = [tracker.record(usage, model="pricey") for _ in range(100)]
        expected = sum((r.cost_estimate_usd for r in records), Decimal(0))
        assert expected * 10**12 > 2**63  # more pico-USD than SQLite's integers hold
        summary = tracker.summary(group_by="day")
        assert summary.usage.prompt_tokens == sum(r.prompt_tokens for r in records)
        assert summary.usage.cost_estimate_usd == expected
        [daily] = tracker.store.daily_by_model(UsageFilter())
        assert daily.usage.cost_estimate_usd == expected
    assert run("summary", "--db", url).returncode == 0
