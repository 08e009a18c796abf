"""Every example runs offline, start to finish, and tells its story."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXPECTED = {
    "quickstart.py": "refused before the call",
    "langchain_chain.py": "ana: 2 calls",
    "session_across_frameworks.py": "session weekly-report: 2 calls",
    "per_user_daily_budget.py": "the provider was called 2 times",
    "rag_embedding_tokens.py": "langchain-rag: 37 embedding tokens",
    "async_many_tasks.py": "200 conversations, 500 calls",
    "postgres_workers.py": "across 4 processes",
    "otel_prometheus.py": "llm_request_tokens_total",
    "graph_attribution.py": "tenant globex: 2 calls",
}


def test_every_example_is_covered() -> None:
    assert {path.name for path in EXAMPLES.glob("*.py")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = f"sqlite:///{tmp_path / 'usage.db'}"
    if name == "postgres_workers.py":
        url = str(request.getfixturevalue("pg_url"))
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        cwd=tmp_path,
        env={**os.environ, "USAGE_CALLBACKS_DB": url},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert EXPECTED[name] in result.stdout


def test_examples_keep_their_records_apart() -> None:
    """Examples sharing ./usage.db counted each other's rows: each names its own default."""
    defaults = {}
    for path in EXAMPLES.glob("*.py"):
        text = path.read_text()
        assert "UsageTracker()" not in text and "UsageTracker(budgets" not in text, path.name
        if "sqlite:///" in text:
            defaults[path.name] = text.split("sqlite:///")[1].split('"')[0]
    assert len(set(defaults.values())) == len(defaults) >= 5
    assert "usage.db" not in defaults.values()
