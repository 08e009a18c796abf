"""The first hour of a new user: mistakes end in messages that say what to do."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest

from usage_callbacks import Budget, TokenUsage, UsageTracker


def python(code: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd
    )


@pytest.mark.parametrize(
    ("module", "package", "extra"),
    [
        ("usage_callbacks.langchain", "langchain_core", "langchain"),
        ("usage_callbacks.llamaindex", "llama_index", "llamaindex"),
        ("usage_callbacks.exporters.otel", "opentelemetry", "otel"),
    ],
)
def test_a_missing_extra_says_which_to_install(module: str, package: str, extra: str) -> None:
    result = python(f"import sys; sys.modules[{package!r}] = None; import {module}")
    assert result.returncode == 1
    assert f'pip install "usage-callbacks[{extra}]"' in result.stderr.splitlines()[-1]


def test_python_api_mistakes_say_what_to_pass() -> None:
    with UsageTracker("memory://") as tracker:
        with pytest.raises(ValueError, match=r"cannot group by 'week'; use one or two of model"):
            tracker.summary(group_by="week")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="since takes a timezone-aware datetime"):
            tracker.summary(since="2026-01-01")
        with pytest.raises(TypeError, match="unknown filter user; filters are user_id"):
            tracker.summary(user="alice")
        with pytest.raises(ValueError, match=r"before=.* is naive; pass a timezone-aware"):
            tracker.purge(datetime(2026, 1, 1))
    with pytest.raises(TypeError, match=r"budgets=\[Budget\(\.\.\.\)\]"):
        UsageTracker("memory://", budgets=Budget(limit_usd=Decimal(1)))  # type: ignore[arg-type]


def test_the_llamaindex_handler_given_to_langchain_names_the_right_one() -> None:
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    from usage_callbacks.llamaindex import UsageCallbackHandler

    with UsageTracker("memory://") as tracker:
        model = FakeListChatModel(responses=["hi"])
        with pytest.raises(TypeError, match=r"usage_callbacks\.langchain\.UsageCallbackHandler"):
            model.invoke("x", config={"callbacks": [UsageCallbackHandler(tracker)]})


def _demo(url: str, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "usage_callbacks", "demo", "--db", url],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_demo_tells_the_same_story_every_run(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    first, second = _demo(url, tmp_path), _demo(url, tmp_path)
    for output in (first, second):
        assert output.count("-> ") == 4  # three answers and the RAG query
        assert output.count("refused before the call") == 1
        assert "unknown" not in output
    recorded = [output.split("What this run recorded:")[1] for output in (first, second)]
    assert recorded[0].splitlines()[:-2] == recorded[1].splitlines()[:-2]
    # without --db every run gets a fresh database of its own
    fresh = subprocess.run(
        [sys.executable, "-m", "usage_callbacks", "demo"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "USAGE_CALLBACKS_DB"},
    )
    assert fresh.returncode == 0 and not (tmp_path / "usage.db").exists()
    assert (
        fresh.stdout.split("What this run recorded:")[1].splitlines()[:-2]
        == recorded[0].splitlines()[:-2]
    )


def test_a_script_that_never_closes_leaves_its_rows_in_the_database_file(tmp_path: Path) -> None:
    script = (
        "from usage_callbacks import TokenUsage, UsageTracker\n"
        "tracker = UsageTracker('sqlite:///usage.db')\n"
        "for i in range(50):\n"
        "    tracker.record(TokenUsage(prompt_tokens=i + 1), model='gpt-4o')\n"
    )
    assert python(script, cwd=tmp_path).returncode == 0
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "usage.db").write_bytes((tmp_path / "usage.db").read_bytes())  # not the -wal
    with sqlite3.connect(copy / "usage.db") as connection:
        assert connection.execute("SELECT count(*) FROM usage_records").fetchone() == (50,)
    connection.close()


def test_help_loads_no_heavy_module() -> None:
    result = python(
        "import sys\n"
        "from usage_callbacks.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = {'sqlalchemy', 'pydantic', 'genai_prices', 'tiktoken'} & set(sys.modules)\n"
        "print(sorted(heavy), file=sys.stderr)\n"
    )
    assert result.stderr.strip() == "[]", result.stderr
    assert "usage-callbacks" in result.stdout


def test_names_are_still_exported() -> None:
    import usage_callbacks

    for name in usage_callbacks.__all__:
        assert getattr(usage_callbacks, name) is not None
    assert TokenUsage is usage_callbacks.TokenUsage
    with pytest.raises(AttributeError):
        _ = usage_callbacks.NoSuchThing  # type: ignore[attr-defined]
