"""The pricing hot path: ``Pricer.price`` per call, as the tracker calls it (with the
call's time), for a plain call, a cached Anthropic call and a time-of-day price.

    python benchmarks/bench_pricing.py                     # this checkout's Pricer
    python benchmarks/bench_pricing.py old.py new.py       # pricing modules side by side

Modules given as files are timed in one process, alternating, so that a before/after
comparison shares the machine's load; each value is the minimum over rounds.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType

from usage_callbacks import pricing
from usage_callbacks.usage import TokenUsage

ROUNDS = int(os.environ.get("BENCH_PRICING_ROUNDS", "300"))
CALLS = 1000
AT = datetime(2026, 12, 2, 9, 30, tzinfo=timezone.utc)
CASES = [
    ("gpt-4o plain", TokenUsage(prompt_tokens=1200, completion_tokens=300), "gpt-4o", "openai"),
    (
        "claude-sonnet-4-5 cached",
        TokenUsage(
            prompt_tokens=5000,
            completion_tokens=300,
            cache_read_tokens=4000,
            cache_write_tokens=500,
        ),
        "claude-sonnet-4-5",
        "anthropic",
    ),
    (
        "deepseek-chat (time-of-day price)",
        TokenUsage(prompt_tokens=1200, completion_tokens=300),
        "deepseek-chat",
        "deepseek",
    ),
]


def _load(path: str, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def measure(modules: dict[str, ModuleType]) -> dict[str, dict[str, float]]:
    """µs per call, by case and module: the minimum over ROUNDS rounds of CALLS calls."""
    results: dict[str, dict[str, float]] = {}
    for label, usage, model, provider in CASES:
        pricers = {name: module.Pricer() for name, module in modules.items()}
        costs = {str(pricer.price(usage, model, provider, AT)[0]) for pricer in pricers.values()}
        assert len(costs) == 1, f"{label}: the modules disagree: {costs}"
        best = dict.fromkeys(pricers, float("inf"))
        for _ in range(ROUNDS):
            for name, pricer in pricers.items():
                price = pricer.price
                start = time.perf_counter()
                for _ in range(CALLS):
                    price(usage, model, provider, AT)
                best[name] = min(best[name], (time.perf_counter() - start) / CALLS * 1e6)
        results[label] = best
    return results


def run() -> list[tuple[str, str, str, str]]:
    """Rows for benchmarks/RESULTS.md."""
    found = measure({"pricing": pricing})
    note = f"min of {ROUNDS} x {CALLS} calls"
    return [
        ("pricing", f"Pricer.price {label}, µs/call", f"{best['pricing']:.2f}", note)
        for label, best in found.items()
    ]


def main(paths: list[str]) -> None:
    modules = {Path(path).name: _load(path, f"pricing_{n}") for n, path in enumerate(paths)}
    for label, best in measure(modules or {"pricing": pricing}).items():
        print(label, "  ".join(f"{name} {micros:.3f} µs" for name, micros in best.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
