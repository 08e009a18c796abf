"""Many threads and processes against one dollar budget: never overspent, nothing lost."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from decimal import Decimal

import pytest

from usage_callbacks import Budget, BudgetExceededError, ModelPrice, TokenUsage, UsageTracker

LIMIT_USD = Decimal("0.06")  # room for 27 worst-case calls, ~40 actual ones
PRICES = {"m": ModelPrice(input_per_mtok=Decimal(10), output_per_mtok=Decimal(30))}
WORST_CASE_USD = Decimal("0.0022")  # 40 prompt tokens at $10/M + max_tokens=60 at $30/M

# Each call: reserve 40 prompt tokens + max_tokens=60, then bill 40 + a completion that
# never exceeds max_tokens. The stub provider counts its calls.
WORKER = r"""
import json, random, sys, threading
from decimal import Decimal
from usage_callbacks import (
    Budget, BudgetExceededError, BudgetUnavailableError, ModelPrice, TokenUsage, UsageTracker,
)

url, limit, threads, attempts, seed = sys.argv[1], Decimal(sys.argv[2]), *map(int, sys.argv[3:])
prices = {"m": ModelPrice(input_per_mtok=Decimal(10), output_per_mtok=Decimal(30))}
tracker = UsageTracker(url, budgets=[Budget(limit_usd=limit, name="shared")], prices=prices)
lock = threading.Lock()
outcome = {"called": 0, "refused": 0, "tokens": 0, "unavailable": 0}

def work(index):
    rng = random.Random(seed * 1000 + index)
    for _ in range(attempts):
        try:
            reservation = tracker.reserve(model="m", prompt_tokens=40, max_output_tokens=60)
        except BudgetExceededError as refused:
            with lock:
                outcome["refused"] += 1
                outcome["unavailable"] += isinstance(refused, BudgetUnavailableError)
            continue
        completion = rng.randint(1, 60)
        with lock:
            outcome["called"] += 1
            outcome["tokens"] += 40 + completion
        tracker.record(TokenUsage(prompt_tokens=40, completion_tokens=completion),
                       model="m", reservation=reservation)

pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
[t.start() for t in pool]
[t.join() for t in pool]
tracker.close()
print(json.dumps(outcome))
"""


def _run_workers(url: str, processes: int, threads: int, attempts: int) -> list[dict[str, int]]:
    UsageTracker(url).close()  # create the schema once, before the race
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                url,
                str(LIMIT_USD),
                str(threads),
                str(attempts),
                str(seed),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in range(processes)
    ]
    outcomes = []
    for worker in workers:
        out, _ = worker.communicate(timeout=300)
        assert worker.returncode == 0
        outcomes.append(json.loads(out))
    return outcomes


def _check_ledger(url: str, called: int, tokens: int) -> None:
    budget = Budget(limit_usd=LIMIT_USD, name="shared")
    with UsageTracker(url, budgets=[budget], prices=PRICES) as tracker:
        summary = tracker.summary()
        assert summary.calls == called  # no lost and no doubled records
        assert summary.usage.total_tokens == tokens
        assert summary.usage.cost_estimate_usd <= LIMIT_USD
        [status] = tracker.budget_status()
        assert status.spent_usd == summary.usage.cost_estimate_usd
        assert status.reserved_usd == 0  # every hold was settled
        # the refusals came at the limit, not before it: what is left is less than three
        # worst-case calls. (Not "less than one": a refusal is right when made, while the
        # calls in flight hold their worst case, and they settle for less afterwards. The
        # race left $0.0003-0.0021 in 58 runs under load, and about one run in ten on a busy
        # machine left room for one more.)
        assert LIMIT_USD - status.spent_usd < 3 * WORST_CASE_USD


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_four_processes_of_four_threads_never_overspend(
    backend: str, request: pytest.FixtureRequest
) -> None:
    url = str(request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url"))
    outcomes = _run_workers(url, processes=4, threads=4, attempts=8)
    called = sum(o["called"] for o in outcomes)
    refused = sum(o["refused"] for o in outcomes)
    assert called + refused == 4 * 4 * 8
    assert called > 0 and refused > 0  # the race was real: some got through, some not
    assert sum(o["unavailable"] for o in outcomes) == 0  # refused as over budget, not unchecked
    _check_ledger(url, called, sum(o["tokens"] for o in outcomes))


@pytest.mark.parametrize("backend", ["memory", "sqlite", "postgres"])
def test_sixteen_threads_in_one_process_never_overspend(
    backend: str, request: pytest.FixtureRequest
) -> None:
    url = {
        "memory": lambda: "memory://",
        "sqlite": lambda: str(request.getfixturevalue("sqlite_url")),
        "postgres": lambda: str(request.getfixturevalue("pg_url")),
    }[backend]()
    tracker = UsageTracker(url, budgets=[Budget(limit_usd=LIMIT_USD, name="shared")], prices=PRICES)
    lock = threading.Lock()
    called = refused = tokens = 0

    def work(index: int) -> None:
        nonlocal called, refused, tokens
        for attempt in range(8):
            try:
                reservation = tracker.reserve(model="m", prompt_tokens=40, max_output_tokens=60)
            except BudgetExceededError:
                with lock:
                    refused += 1
                continue
            completion = (index * 7 + attempt * 13) % 60 + 1
            with lock:
                called += 1
                tokens += 40 + completion
            tracker.record(
                TokenUsage(prompt_tokens=40, completion_tokens=completion),
                model="m",
                reservation=reservation,
            )

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert called + refused == 128 and refused > 0
    if backend == "memory":
        summary = tracker.summary()
        assert summary.calls == called and summary.usage.total_tokens == tokens
        assert summary.usage.cost_estimate_usd <= LIMIT_USD
        tracker.close()
    else:
        tracker.close()
        _check_ledger(url, called, tokens)
