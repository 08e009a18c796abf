"""How a configuration is timed: alone in its own process, and interleaved in one process.

A ``Side`` is one configuration of a framework call (no callbacks, a framework's own
handler, ours, a peer). Both modes report CPU time of the whole process per call
(``time.process_time`` counts every thread, so a writer or span exporter thread is paid
by the side that caused it); wall time swings with the other work on a shared machine.

Per process: a fresh subprocess per side per round (``python bench_frameworks.py --child
GROUP SIDE``), rounds alternated so that drift hits every side alike. Interleaved: one
process, every side built once, round by round. A side whose packages are missing raises
``Missing`` when built and is skipped with its message.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

Row = tuple[str, str, str, str]
CALLS = int(os.environ.get("BENCH_CALLS", "3000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "9"))
WARMUP = 200
HERE = Path(__file__).resolve().parent


def nothing() -> None:
    return None


class Missing(Exception):
    """A side's package is not installed: the benchmark skips it, saying how to install it."""

    def __init__(self, package: str) -> None:
        super().__init__(f"not installed: pip install {package} (or the bench extra)")


@dataclass
class Side:
    """One configuration. ``finish`` runs inside the timed round (flush a writer, force an
    exporter), ``enter``/``leave`` around it (an instrumentor patches LangChain globally,
    so in one process it is on only during its own rounds), ``check`` after the warm-up
    proves the side did its work (a record stored, spans exported)."""

    call: Callable[[], object]
    finish: Callable[[], object] = nothing
    enter: Callable[[], object] = nothing
    leave: Callable[[], object] = nothing
    check: Callable[[], object] = nothing
    close: Callable[[], object] = nothing


@dataclass
class Timing:
    """Per-call CPU and wall microseconds over rounds, with the 1-minute load average
    seen at the start of each round."""

    cpu: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)

    def add(self, cpu: float, wall: float, load: float) -> None:
        self.cpu.append(cpu)
        self.wall.append(wall)
        self.load.append(load)


def timed_round(side: Side, calls: int) -> tuple[float, float, float]:
    """(CPU µs/call, wall µs/call, load average) for one round of ``calls`` calls."""
    load = os.getloadavg()[0]
    side.enter()
    gc.collect()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(calls):
        side.call()
    side.finish()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    side.leave()
    return cpu / calls * 1e6, wall / calls * 1e6, load


def warm_up(side: Side) -> None:
    side.enter()
    for _ in range(WARMUP):
        side.call()
    side.finish()
    side.check()
    side.leave()


def child(build: Callable[[], Side]) -> None:
    """The per-process side: warm up, check, time one round, print it as JSON."""
    try:
        side = build()
    except Missing as missing:
        print(json.dumps({"missing": str(missing)}))
        return
    warm_up(side)
    cpu, wall, load = timed_round(side, CALLS)
    side.close()
    print(json.dumps({"cpu": cpu, "wall": wall, "load": load}))


def per_process(group: str, names: list[str], skipped: dict[str, str]) -> dict[str, Timing]:
    """Each side in a fresh process per round; the order reverses every other round."""
    timings = {name: Timing() for name in names}
    for index in range(ROUNDS):
        for name in names if index % 2 == 0 else names[::-1]:
            if name in skipped:
                continue
            command = [sys.executable, str(HERE / "bench_frameworks.py"), "--child", group, name]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{group}/{name} failed:\n{done.stderr}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if "missing" in result:
                skipped[name] = result["missing"]
                print(f"skipping {group}/{name}: {result['missing']}", file=sys.stderr)
                continue
            timings[name].add(result["cpu"], result["wall"], result["load"])
    return {name: timing for name, timing in timings.items() if name not in skipped}


def interleaved(
    builders: dict[str, Callable[[], Side]], skipped: dict[str, str]
) -> dict[str, Timing]:
    """Every side in this one process, round by round."""
    sides: dict[str, Side] = {}
    for name, build in builders.items():
        try:
            sides[name] = build()
        except Missing as missing:
            skipped[name] = str(missing)
            print(f"skipping {name}: {missing}", file=sys.stderr)
    for side in sides.values():
        warm_up(side)
    timings = {name: Timing() for name in sides}
    for _ in range(ROUNDS):
        for name, side in sides.items():
            timings[name].add(*timed_round(side, CALLS))
    for side in sides.values():
        side.close()
    return timings


def rows(
    group: str,
    timings: dict[str, Timing],
    labels: dict[str, str],
    baseline: str,
    notes: dict[str, str],
) -> list[Row]:
    """One row per side: median CPU µs/call, its ratio to the baseline side, median wall
    time and the load averages seen."""
    base = statistics.median(timings[baseline].cpu)
    out = []
    for name, timing in timings.items():
        cpu = statistics.median(timing.cpu)
        note = f"{cpu / base:.2f}x {labels[baseline]}"
        if name in notes:
            note += f"; {notes[name]}"
        note += (
            f"; wall {statistics.median(timing.wall):,.0f} µs"
            f"; load {min(timing.load):.1f}-{max(timing.load):.1f}"
        )
        out.append((group, f"{labels[name]}, CPU µs/call", f"{cpu:,.0f}", note))
    return out


def skipped_rows(group: str, skipped: dict[str, str], labels: dict[str, str]) -> list[Row]:
    return [(group, labels[name], "skipped", message) for name, message in skipped.items()]
