"""Hot-path cost per call, side by side with the frameworks' own usage handlers and peers.

Two measurements of the same configurations (see harness.py): per process (a fresh
subprocess per side per round, CPU time of the whole process per call) and interleaved
in one process. Ratios are to the framework's own handler.

    python benchmarks/bench_frameworks.py --child langchain sqlite   # one side, one round
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import harness
import sides_langchain
import sides_llamaindex

GROUPS: dict[str, ModuleType] = {"langchain": sides_langchain, "llamaindex": sides_llamaindex}


def bench(group: str) -> list[harness.Row]:
    sides = GROUPS[group]
    names = list(sides.LABELS)
    skipped: dict[str, str] = {}
    separate = harness.per_process(group, names, skipped)
    with tempfile.TemporaryDirectory() as tmp:
        builders = {name: _builder(sides, name, Path(tmp)) for name in names if name not in skipped}
        together = harness.interleaved(builders, skipped)
    return [
        *harness.rows(f"{group} per process", separate, sides.LABELS, sides.BASELINE, sides.NOTES),
        *harness.rows(f"{group} interleaved", together, sides.LABELS, sides.BASELINE, {}),
        *harness.skipped_rows(group, skipped, sides.LABELS),
    ]


def _builder(sides: ModuleType, name: str, workdir: Path) -> Callable[[], harness.Side]:
    return lambda: sides.build(name, workdir)


def run() -> list[harness.Row]:
    return bench("langchain") + bench("llamaindex")


def _child(group: str, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        harness.child(_builder(GROUPS[group], name, Path(tmp)))


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    _child(sys.argv[2], sys.argv[3])
