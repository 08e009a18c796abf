"""Progress of long commands: drawn on a real terminal (a pty), never into a pipe."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import sys
import termios
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from usage_callbacks import TokenUsage, UsageTracker

RECORDS = 12_000
LATER = datetime(2030, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'usage.db'}"
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with UsageTracker(url, batch_size=5000) as tracker:
        for index in range(RECORDS):
            tracker.record(
                TokenUsage(prompt_tokens=10 + index % 90),
                model="m",
                user_id=f"u{index % 7}",
                ended_at=start + timedelta(seconds=index),
            )
    return url


def _command(tmp_path: Path, url: str, name: str) -> list[str]:
    """A long command over the RECORDS calls; purge and ingest work on copies."""
    if name == "export":
        return ["export", "--db", url, "--format", "jsonl", "--out", str(tmp_path / "out.jsonl")]
    if name == "report":
        return ["report", "--db", url, "--out", str(tmp_path / "report.html")]
    if name == "purge":
        copy = tmp_path / f"purge-{len(list(tmp_path.iterdir()))}.db"
        copy.write_bytes((tmp_path / "usage.db").read_bytes())
        return ["purge", "--db", f"sqlite:///{copy}", "--before", f"{LATER:%Y-%m-%d}", "--yes"]
    spill = tmp_path / "spill.jsonl"
    if not spill.exists():
        export = _command(tmp_path, url, "export")
        subprocess.run([sys.executable, "-m", "usage_callbacks", *export], check=True, timeout=300)
        (tmp_path / "out.jsonl").rename(spill)
    target = tmp_path / f"ingest-{len(list(tmp_path.iterdir()))}.db"
    return ["ingest", "--db", f"sqlite:///{target}", str(spill)]


#: What each command's progress says while it works.
LABELS = {
    "export": "exporting",
    "report": "reading the records",
    "purge": f"deleting {RECORDS:,} records",
    "ingest": "ingesting spill.jsonl",
}


def _on_a_terminal(args: list[str]) -> tuple[int, str]:
    """Run the command with its stderr on a pty 120 columns wide; what the terminal got."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "NO_COLOR")}
    process = subprocess.Popen(
        [sys.executable, "-m", "usage_callbacks", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=slave,
        env={**env, "TERM": "xterm-256color"},
    )
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
    return process.wait(timeout=300), b"".join(chunks).decode(errors="replace")


def _piped(args: list[str]) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "usage_callbacks", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TERM": "xterm-256color"},
    )
    return result.returncode, result.stderr


@pytest.mark.parametrize("name", list(LABELS))
def test_progress_shows_on_a_terminal_and_not_in_a_pipe(
    tmp_path: Path, url: str, name: str
) -> None:
    code, terminal = _on_a_terminal(_command(tmp_path, url, name))
    assert code == 0, terminal
    assert LABELS[name] in terminal, terminal
    assert "\x1b[" in terminal  # drawn, then cleared, with the terminal's control codes
    code, piped = _piped(_command(tmp_path, url, name))
    assert code == 0, piped
    assert LABELS[name] not in piped and "\x1b" not in piped, piped
