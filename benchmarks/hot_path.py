"""Where a side's time goes: a sampling profile (py-spy) of one per-process run.

    python benchmarks/hot_path.py langchain sqlite       # or budget, memory; llamaindex sqlite
    BENCH_CALLS=20000 python benchmarks/hot_path.py langchain budget --top 40

Runs ``bench_frameworks.py --child GROUP SIDE`` under ``py-spy record`` (every thread, so
the writer's work shows beside the caller's), keeps the samples taken in the timed round
and in background threads, and prints each function's inclusive and own time as µs per
call: its share of those samples times the CPU µs/call the child measured. py-spy is a
separate tool (``pip install py-spy``); this profile's own overhead is not in the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _stacks(
    group: str, side: str, rate: int, keep: Path | None
) -> tuple[list[tuple[list[str], int]], float]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        sys.exit("py-spy is not installed: pip install py-spy")
    env = {"BENCH_CALLS": "20000", **os.environ}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stacks.txt"
        command = [spy, "record", "--format", "raw", "--nolineno", "-r", str(rate), "-o", str(out)]
        child = [sys.executable, str(HERE / "bench_frameworks.py"), "--child", group, side]
        done = subprocess.run(
            [*command, "--", *child], capture_output=True, text=True, env=env, check=True
        )
        lines = out.read_text().splitlines()
        if keep is not None:
            shutil.copy(out, keep)
    result = next(
        json.loads(line) for line in reversed(done.stdout.splitlines()) if line.startswith("{")
    )
    stacks = []
    for line in lines:
        frames, _, count = line.rpartition(" ")
        stacks.append((frames.split(";"), int(count)))
    return stacks, result["cpu"]


#: Leaf frames of a thread that is waiting, not running: py-spy does not always tell.
IDLE = frozenset(
    (
        "Condition.wait (threading.py)",
        "Event.wait (threading.py)",
        "Thread.join (threading.py)",
        "_worker (concurrent/futures/thread.py)",  # an executor's thread waiting for work
    )
)


def _timed(frames: list[str]) -> bool:
    """A running sample of the timed round, or of a background thread (writer, exporter)."""
    if frames[-1] in IDLE:
        return False
    return frames[0] == "Thread._bootstrap (threading.py)" or "timed_round (harness.py)" in frames


def report(group: str, side: str, rate: int, top: int, keep: Path | None) -> None:
    stacks, cpu = _stacks(group, side, rate, keep)
    kept = [(frames, count) for frames, count in stacks if _timed(frames)]
    total = sum(count for _, count in kept)
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for frames, count in kept:
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    print(f"{group}/{side}: {cpu:.0f} CPU µs/call, {total:,} samples")
    for title, counter in (("inclusive", inclusive), ("own", own)):
        print(f"\n{title} µs/call:")
        for frame, count in counter.most_common(top):
            print(f"{count / total * cpu:8.1f}  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("group", choices=["langchain", "llamaindex"])
    parser.add_argument("side")
    parser.add_argument("--rate", type=int, default=997, help="samples per second")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--keep", type=Path, help="also save py-spy's raw stacks here")
    arguments = parser.parse_args()
    report(arguments.group, arguments.side, arguments.rate, arguments.top, arguments.keep)


if __name__ == "__main__":
    main()
