"""Run every benchmark, print one table, write benchmarks/RESULTS.md.

    python benchmarks/run.py            # BENCH_RECORDS=100000 for a quick run

Framework comparisons run both sides in one process, alternating, and report ratios.
PostgreSQL rows run when BENCH_PG_URL (default: the local test server) answers.
"""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_frameworks
import bench_store

PG_URL = os.environ.get("BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _pg_url() -> str | None:
    try:
        engine = sa.create_engine(PG_URL)
        with engine.connect():
            pass
        engine.dispose()
    except Exception:
        return None
    return PG_URL


def main() -> int:
    rows = bench_frameworks.run()
    rows += bench_store.run(_pg_url())
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "| benchmark | measurement | value | note |",
        "|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in rows),
    ]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    header = (
        f"# Benchmark results\n\nRun {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on "
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{bench_store.RECORDS:,} records.\n\n"
    )
    (Path(__file__).parent / "RESULTS.md").write_text(header + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
