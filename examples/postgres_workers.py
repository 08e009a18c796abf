"""Several worker processes sharing one PostgreSQL ledger and one global budget.

Four workers record calls concurrently into PostgreSQL; a shared $ budget is enforced
atomically across them, so together they never overspend.

    USAGE_CALLBACKS_DB=postgresql+psycopg://user@host/db python examples/postgres_workers.py
(default: the local server at postgresql+psycopg://postgres@127.0.0.1:5432/test)
"""

import os
import uuid
from concurrent.futures import ProcessPoolExecutor
from decimal import Decimal

from usage_callbacks import Budget, BudgetExceededError, TokenUsage, UsageTracker

URL = os.environ.get("USAGE_CALLBACKS_DB", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
RUN = uuid.uuid4().hex[:8]
BUDGET = Budget(limit_usd=Decimal("0.002"), name=f"workers-{RUN}")


def worker(index: int) -> tuple[int, int]:
    done = refused = 0
    with UsageTracker(URL, budgets=[BUDGET]) as tracker:
        for _ in range(20):
            try:
                reservation = tracker.reserve(
                    model="gpt-4o-mini", prompt_tokens=800, max_output_tokens=200
                )
            except BudgetExceededError:
                refused += 1
                continue
            tracker.record(
                TokenUsage(prompt_tokens=800, completion_tokens=150),
                model="gpt-4o-mini",
                session_id=f"workers-{RUN}",
                user_id=f"worker-{index}",
                reservation=reservation,
            )
            done += 1
    return done, refused


def main() -> None:
    UsageTracker(URL).close()  # create the tables once
    with ProcessPoolExecutor(4) as pool:
        results = list(pool.map(worker, range(4)))
    with UsageTracker(URL) as tracker:
        summary = tracker.summary(session_id=f"workers-{RUN}")
    print(f"calls made {sum(d for d, _ in results)}, refused {sum(r for _, r in results)}")
    print(f"spent ${summary.usage.cost_estimate_usd} of ${BUDGET.limit_usd} across 4 processes")


if __name__ == "__main__":
    main()
