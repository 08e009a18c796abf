"""Run the benchmarks, print their tables, update benchmarks/RESULTS.md.

    python benchmarks/run.py                # frameworks and store
    python benchmarks/run.py frameworks     # only one part; the other's section is kept
    BENCH_RECORDS=100000 BENCH_CALLS=1000 BENCH_ROUNDS=3 python benchmarks/run.py  # quick

Peers (OpenLLMetry, OpenInference, Langfuse, langchain-community) are not in the dev
extra: install them beside it (``pip install -e ".[all,dev,bench]"``, best in a venv of
its own) or their rows say how. Each part writes its own "## ..." section of RESULTS.md
with its time, machine and load average; sections written by hand are kept as they are.
PostgreSQL rows run when BENCH_PG_URL (default: the local test server) answers.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_frameworks
import bench_store
import harness

PG_URL = os.environ.get("BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
RESULTS = Path(__file__).parent / "RESULTS.md"
TITLE = "# Benchmark results\n"


def _pg_url() -> str | None:
    try:
        engine = sa.create_engine(PG_URL)
        with engine.connect():
            pass
        engine.dispose()
    except Exception:  # any failure to connect means: no PostgreSQL rows
        return None
    return PG_URL


PARTS: dict[str, tuple[str, Callable[[], list[harness.Row]], str]] = {
    "frameworks": (
        "## Frameworks and peers",
        bench_frameworks.run,
        f"{harness.CALLS:,} calls x {harness.ROUNDS} rounds",
    ),
    "store": ("## Store", lambda: bench_store.run(_pg_url()), f"{bench_store.RECORDS:,} records"),
}


def _section(heading: str, rows: list[harness.Row], size: str, loads: list[float]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    return "\n".join(
        [
            heading,
            "",
            f"Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by benchmarks/run.py on "
            f"{platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, {size}; 1-minute load average "
            f"{loads[0]:.1f} at the start, {loads[1]:.1f} at the end.",
            "",
            "| benchmark | measurement | value | note |",
            "|---|---|---|---|",
            *(f"| {' | '.join(row)} |" for row in rows),
            "",
        ]
    )


def _sections(text: str) -> dict[str, str]:
    """The "## " sections of RESULTS.md by heading, in order."""
    sections: dict[str, str] = {}
    heading = ""
    for line in text.splitlines(keepends=True):
        if line.startswith("## "):
            heading = line.rstrip("\n")
            sections[heading] = ""
        if heading:
            sections[heading] += line
    return sections


def main(parts: list[str]) -> int:
    sections = _sections(RESULTS.read_text()) if RESULTS.exists() else {}
    for part in parts or list(PARTS):
        heading, run, size = PARTS[part]
        start = os.getloadavg()[0]
        rows = run()
        sections[heading] = _section(heading, rows, size, [start, os.getloadavg()[0]]) + "\n"
    ordered = [heading for heading, _, _ in PARTS.values() if heading in sections]
    ordered += [heading for heading in sections if heading not in ordered]
    text = "".join(sections[heading] for heading in ordered)
    RESULTS.write_text(TITLE + "\n" + text.rstrip("\n") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
