"""Files and schemas: WAL for many processes, schema versions and upgrades, bad URLs."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from usage_callbacks import (
    SchemaTooNewError,
    StoreConfigurationError,
    TokenUsage,
    UsageTracker,
)
from usage_callbacks.store.models import SCHEMA_VERSION
from usage_callbacks.store.spill import SpillFile

WRITER = """
import sys
from usage_callbacks import TokenUsage, UsageTracker
with UsageTracker(sys.argv[1], batch_size=50) as tracker:
    for _ in range(int(sys.argv[2])):
        tracker.record(TokenUsage(prompt_tokens=10, completion_tokens=5), model="gpt-4o-mini")
"""


def test_sqlite_runs_in_wal_mode(sqlite_url: str) -> None:
    with UsageTracker(sqlite_url) as tracker, tracker.store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_processes_share_one_file_and_readers_see_whole_batches(sqlite_url: str) -> None:
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, sqlite_url, "500"]) for _ in range(3)
    ]
    seen = []
    with UsageTracker(sqlite_url) as reader:
        while any(writer.poll() is None for writer in writers):
            summary = reader.summary()
            # every committed record is whole: tokens always 15 per call
            assert summary.usage.total_tokens == 15 * summary.calls
            seen.append(summary.calls)
        assert all(writer.wait() == 0 for writer in writers)
        assert reader.summary().calls == 1500
    assert seen == sorted(seen)  # totals only grow


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    UsageTracker(url).close()
    with sqlite3.connect(tmp_path / "new.db") as connection:
        connection.execute("UPDATE usage_schema SET version = 99")
    with pytest.raises(SchemaTooNewError, match=r"v99.*Upgrade usage-callbacks"):
        UsageTracker(url)


@pytest.mark.parametrize("url", ["not a url", "nosuchdb://x/y"])
def test_bad_urls_fail_fast_with_advice(url: str) -> None:
    with pytest.raises(StoreConfigurationError, match=r"sqlite:///usage\.db|cannot"):
        UsageTracker(url)


def test_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreConfigurationError, match="cannot use"):
        UsageTracker(f"sqlite:///{junk}")


def test_default_url_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USAGE_CALLBACKS_DB", f"sqlite:///{tmp_path / 'env.db'}")
    with UsageTracker() as tracker:
        tracker.record(TokenUsage(prompt_tokens=1), model="m")
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'env.db'}")
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT count(*) FROM usage_records").scalar() == 1
    engine.dispose()


OLD_SCHEMA = """
CREATE TABLE usage_records (
    id VARCHAR(32) PRIMARY KEY, started_at DATETIME NOT NULL, ended_at DATETIME NOT NULL,
    latency_ms FLOAT, framework VARCHAR(32) NOT NULL, provider VARCHAR(128),
    model VARCHAR(256), call_type VARCHAR(16) NOT NULL, run_id VARCHAR(64),
    parent_run_id VARCHAR(64), session_id VARCHAR(256), user_id VARCHAR(256),
    tags JSON NOT NULL, status VARCHAR(16) NOT NULL, cost_known BOOLEAN NOT NULL,
    prompt_tokens BIGINT NOT NULL, completion_tokens BIGINT NOT NULL,
    total_tokens BIGINT NOT NULL, embedding_tokens BIGINT NOT NULL,
    cache_read_tokens BIGINT NOT NULL, cache_write_tokens BIGINT NOT NULL,
    reasoning_tokens BIGINT NOT NULL, cost_estimate_usd BIGINT NOT NULL,
    estimated BOOLEAN NOT NULL
);
INSERT INTO usage_records VALUES ('a1', '2026-01-01 10:00:00', '2026-01-01 10:00:01', 1000.0,
    'manual', 'openai', 'gpt-4o', 'chat', NULL, NULL, 's', 'u', '[]', 'ok', 1,
    100, 20, 120, 0, 0, 0, 0, 5000000, 0);
"""


def test_a_database_of_an_older_schema_is_upgraded_in_place(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as connection:
        connection.executescript(OLD_SCHEMA)  # no version table, no cache_hit/error_type
    with UsageTracker(f"sqlite:///{path}") as tracker:
        [old] = tracker.records()
        assert (old.id, old.total_tokens, old.cache_hit, old.error_type) == ("a1", 120, False, None)
        assert str(old.cost_estimate_usd) == "0.000005"
        tracker.record(TokenUsage(prompt_tokens=1), model="m", cache_hit=True)
        assert tracker.summary().calls == 2
    assert f"from schema v0 to v{SCHEMA_VERSION}" in caplog.text
    assert "usage_records.cache_hit" in caplog.text


#: Columns schema v2 added: the billable kinds beside tokens.
V2_COLUMNS = (
    "cache_write_1h_tokens",
    "input_audio_tokens",
    "output_audio_tokens",
    "input_image_tokens",
    "output_image_tokens",
    "tool_prompt_tokens",
    "web_search_requests",
    "service_tier",
)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_v1_database_gains_the_billable_kinds_in_place(
    backend: str, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url")
    with UsageTracker(url) as tracker:
        tracker.record(TokenUsage(prompt_tokens=100, completion_tokens=20), model="gpt-4o")
    engine = sa.create_engine(url)
    with engine.begin() as connection:  # back to the v1 tables (and indexes)
        connection.exec_driver_sql("DROP INDEX ix_usage_records_invalid")
        for column in V2_COLUMNS:
            connection.exec_driver_sql(f"ALTER TABLE usage_records DROP COLUMN {column}")
        connection.exec_driver_sql("UPDATE usage_schema SET version = 1")
    engine.dispose()
    audio = TokenUsage(
        prompt_tokens=1_000,
        completion_tokens=500,
        input_audio_tokens=800,
        output_audio_tokens=400,
        cache_write_tokens=100,
        cache_write_1h_tokens=100,
        web_search_requests=2,
        service_tier="flex",
    )
    with UsageTracker(url) as tracker:
        [old] = tracker.records()
        assert (old.prompt_tokens, old.input_audio_tokens, old.service_tier) == (100, 0, None)
        tracker.record(audio, model="gpt-audio")
        tracker.flush()
        new = next(r for r in tracker.records() if r.model == "gpt-audio")
        assert new.usage.model_dump(exclude={"cost_estimate_usd"}) == audio.model_dump(
            exclude={"cost_estimate_usd"}
        )
        total = tracker.summary().usage
        assert (total.prompt_tokens, total.input_audio_tokens, total.web_search_requests) == (
            1_100,
            800,
            2,
        )
    assert f"from schema v1 to v{SCHEMA_VERSION}" in caplog.text
    assert "usage_records.input_audio_tokens" in caplog.text


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_schema_creation_races_between_processes_are_safe(
    backend: str, request: pytest.FixtureRequest
) -> None:
    url = str(request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url"))
    script = (
        "import sys; from usage_callbacks import UsageTracker; UsageTracker(sys.argv[1]).close()"
    )
    openers = [subprocess.Popen([sys.executable, "-c", script, url]) for _ in range(6)]
    assert [opener.wait(timeout=120) for opener in openers] == [0] * 6


def test_records_made_after_the_database_directory_is_deleted_are_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Open connections wrote on into the deleted file: every record was lost, flush()
    said True and nothing was logged."""
    directory = tmp_path / "db"
    directory.mkdir()
    spill = tmp_path / "spill.jsonl"
    with UsageTracker(
        f"sqlite:///{directory / 'usage.db'}",
        flush_interval=0.01,
        batch_size=50,
        max_buffer=100,
        spill_path=spill,
    ) as tracker:
        tracker.record(TokenUsage(prompt_tokens=1))
        assert tracker.flush(timeout=10)
        shutil.rmtree(directory)
        after = {tracker.record(TokenUsage(prompt_tokens=2)).id for _ in range(300)}
        assert not tracker.flush(timeout=0.5)
        assert "usage.db was deleted with its directory" in caplog.text
        assert SpillFile(spill).exists()  # beyond max_buffer, kept on disk meanwhile
        directory.mkdir()
        assert tracker.flush(timeout=30)
        deadline = time.monotonic() + 30
        while SpillFile(spill).exists() and time.monotonic() < deadline:  # re-ingested
            time.sleep(0.05)
        assert {record.id for record in tracker.records()} == after


def test_a_database_file_deleted_or_replaced_in_use_is_created_anew(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "usage.db"
    with UsageTracker(f"sqlite:///{path}", flush_interval=0.01) as tracker:
        tracker.record(TokenUsage(prompt_tokens=1))
        assert tracker.flush(timeout=10)
        path.unlink()
        kept = tracker.record(TokenUsage(prompt_tokens=2)).id
        assert tracker.flush(timeout=10)
        assert [record.id for record in tracker.records()] == [kept]
    assert "usage.db was deleted; created it anew" in caplog.text
