"""Shared fixtures: one store suite over memory, a SQLite file and PostgreSQL.

PostgreSQL tests use the server on 127.0.0.1:5432 (trust auth). Each test run creates
its own database so parallel runs never share rows. Under ``CI=true`` a missing server
fails the run instead of skipping.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from usage_callbacks import UsageTracker

PG_ADMIN_URL = os.environ.get(
    "USAGE_CALLBACKS_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _pg_unavailable(reason: str) -> None:
    message = f"PostgreSQL not available at {PG_ADMIN_URL}: {reason}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " (CI=true: PostgreSQL tests must run)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """URL of a fresh database created for this test session, dropped afterwards."""
    name = f"usage_cb_{uuid.uuid4().hex[:10]}"
    try:
        # NullPool: a fresh connection each time, so a test that restarts the server is fine
        admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except Exception as error:
        _pg_unavailable(str(error).splitlines()[0])
    url = sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def pg_url(pg_server_url: str) -> str:
    """The session's PostgreSQL database, emptied for this test."""
    engine = sa.create_engine(pg_server_url, poolclass=NullPool)
    with engine.begin() as connection:
        connection.execute(sa.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    return pg_server_url


@pytest.fixture(autouse=True)
def _spill_folder_per_test(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spill files (and the orphans the next tracker on a database adopts) stay within
    their test, and its subprocesses: not one test's records in another's database."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'usage.db'}"


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every store backend in turn."""
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'usage.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(params=["sqlite", "postgres"])
def file_or_server_url(request: pytest.FixtureRequest) -> str:
    """A SQLite file, then a PostgreSQL database: the stores a schema upgrade meets."""
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url"))


@pytest.fixture
def tracker(store_url: str) -> Iterator[UsageTracker]:
    with UsageTracker(store_url) as tracker:
        yield tracker


@pytest.fixture
def memory_tracker() -> Iterator[UsageTracker]:
    with UsageTracker("memory://") as tracker:
        yield tracker
