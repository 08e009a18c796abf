"""Sessions: nested totals, threads, asyncio tasks, thread pools."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import threading
from concurrent.futures import ThreadPoolExecutor

from usage_callbacks import TokenUsage, UsageTracker, active_sessions


def _call(tracker: UsageTracker, tokens: int = 10, model: str = "gpt-4o-mini") -> None:
    tracker.record(TokenUsage(prompt_tokens=tokens, completion_tokens=tokens), model=model)


def test_nested_sessions_both_accumulate(memory_tracker: UsageTracker) -> None:
    with memory_tracker.session("outer", user_id="alice") as outer:
        _call(memory_tracker)
        with memory_tracker.session("inner") as inner:
            _call(memory_tracker, 5, model="gpt-4o")
        _call(memory_tracker)
    _call(memory_tracker)  # outside: counted by neither
    assert (outer.calls, outer.usage.total_tokens) == (3, 50)
    assert (inner.calls, inner.usage.total_tokens) == (1, 10)
    assert set(outer.by_model) == {"gpt-4o-mini", "gpt-4o"}
    assert outer.usage.cost_estimate_usd == sum(
        u.cost_estimate_usd for u in outer.by_model.values()
    )
    records = memory_tracker.records()
    assert [r.session_id for r in records] == ["outer", "inner", "outer", None]
    assert [r.user_id for r in records] == ["alice", "alice", "alice", None]
    assert active_sessions() == ()


def test_sessions_of_another_tracker_are_not_touched(memory_tracker: UsageTracker) -> None:
    with UsageTracker("memory://") as other, other.session() as foreign:
        _call(memory_tracker)
    assert foreign.calls == 0


def test_threads_each_see_their_own_session(memory_tracker: UsageTracker) -> None:
    sessions = {}
    barrier = threading.Barrier(8)

    def work(index: int) -> None:
        with memory_tracker.session(f"t{index}") as session:
            barrier.wait()
            for _ in range(index + 1):
                _call(memory_tracker)
        sessions[index] = session

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {i: s.calls for i, s in sessions.items()} == {i: i + 1 for i in range(8)}


async def test_asyncio_tasks_each_see_their_own_session(memory_tracker: UsageTracker) -> None:
    async def conversation(index: int) -> int:
        async with memory_tracker.session(f"a{index}") as session:
            for _ in range(index % 5 + 1):
                await asyncio.sleep(0)
                _call(memory_tracker)
        return session.calls

    calls = await asyncio.gather(*(conversation(i) for i in range(200)))
    assert calls == [i % 5 + 1 for i in range(200)]


def test_bare_thread_pools_need_bind(memory_tracker: UsageTracker) -> None:
    with memory_tracker.session("pool") as session, ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: _call(memory_tracker), range(4)))
        assert session.calls == 0  # workers do not inherit the context
        list(pool.map(session.bind(lambda _: _call(memory_tracker)), range(4)))
    assert session.calls == 4


def test_sessions_entered_and_never_exited_end_when_collected(
    memory_tracker: UsageTracker,
) -> None:
    """Entered per request and never exited, sessions used to pile up in the context
    (every call added to all of them: record() grew linearly, the run quadratically),
    and their budgets stayed registered."""

    def requests() -> tuple[int, int]:
        with memory_tracker.session("outer") as outer:
            for index in range(500):
                memory_tracker.session(f"request-{index}", max_tokens=10**6).__enter__()
                memory_tracker.record(TokenUsage(prompt_tokens=1))
            gc.collect()
            memory_tracker.flush()  # their budgets end on a thread of their own
            assert active_sessions() == (outer,)
            return outer.calls, len(memory_tracker.budgets)

    assert contextvars.copy_context().run(requests) == (500, 0)


def test_a_session_kept_open_by_its_owner_still_counts(memory_tracker: UsageTracker) -> None:
    def work() -> int:
        session = memory_tracker.session("kept")
        session.__enter__()
        gc.collect()
        memory_tracker.record(TokenUsage(prompt_tokens=3))
        return session.usage.prompt_tokens

    assert contextvars.copy_context().run(work) == 3
