"""Hot-path cost per call, side by side with the frameworks' own usage handlers.

Each configuration runs in the same process, interleaved round by round so that drift
(CPU frequency, caches, GC) hits every side alike; the median round is reported and
each side is compared with the framework's own handler as a ratio.
"""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

from usage_callbacks import Budget, UsageTracker

Row = tuple[str, str, str, str]
CALLS = int(os.environ.get("BENCH_CALLS", "2000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "7"))


def _interleaved(
    sides: dict[str, Callable[[], None]], finish: dict[str, Callable[[], object]]
) -> dict[str, float]:
    """Microseconds per call for each side: median over rounds of CALLS calls each.

    ``finish[name]`` (a tracker's flush) runs inside its side's timed round, so the
    background writes a side caused are paid by that side, not by the next one.
    """
    timings: dict[str, list[float]] = {name: [] for name in sides}
    for name, call in sides.items():  # warm up every side once
        for _ in range(50):
            call()
        finish.get(name, _nothing)()
    for _ in range(ROUNDS):
        for name, call in sides.items():
            done = finish.get(name, _nothing)
            gc.collect()
            started = time.perf_counter()
            for _ in range(CALLS):
                call()
            done()
            timings[name].append((time.perf_counter() - started) / CALLS * 1e6)
    return {name: statistics.median(values) for name, values in timings.items()}


def _nothing() -> None:
    return None


def _rows(
    group: str, per_call: dict[str, float], baseline: str, targets: dict[str, str]
) -> list[Row]:
    rows = []
    for name, micros in per_call.items():
        ratio = micros / per_call[baseline]
        note = f"ratio to {baseline}: {ratio:.2f}"
        if name in targets:
            note += f" (target {targets[name]})"
        rows.append((group, f"{name}, µs/call", f"{micros:,.0f}", note))
    return rows


def bench_langchain(workdir: Path) -> list[Row]:
    from langchain_core.callbacks import UsageMetadataCallbackHandler
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage

    from usage_callbacks.langchain import UsageCallbackHandler

    reply = AIMessage(
        content="The answer is forty-two.",
        response_metadata={"model_name": "gpt-4o-mini"},
        usage_metadata={"input_tokens": 120, "output_tokens": 12, "total_tokens": 132},
    )

    class Replies:
        """An endless iterator of the same reply."""

        def __iter__(self) -> Replies:
            return self

        def __next__(self) -> AIMessage:
            return reply

    class FakeGPT(GenericFakeChatModel):
        """Names its model and output cap in the request, as real integrations do: a $
        budget prices its reservation from them (every side runs this same model)."""

        model_name: str = "gpt-4o-mini"
        max_tokens: int = 256

    model = FakeGPT(messages=Replies())
    prompt = "What is the answer to life, the universe and everything?"
    trackers = {
        "memory": UsageTracker("memory://"),
        "sqlite": UsageTracker(f"sqlite:///{workdir / 'lc.db'}"),
        "sqlite+budget": UsageTracker(
            f"sqlite:///{workdir / 'lc-budget.db'}",
            budgets=[Budget(limit_usd=Decimal(10**6), per="user", period="day")],
        ),
    }
    core_handler = UsageMetadataCallbackHandler()
    handlers = {name: UsageCallbackHandler(t, user_id="bench") for name, t in trackers.items()}

    def invoke(callbacks: list[object]) -> Callable[[], None]:
        config = {"callbacks": callbacks}
        return lambda: model.invoke(prompt, config=config)  # type: ignore[arg-type]

    per_call = _interleaved(
        {
            "(a) no callbacks": invoke([]),
            "(b) UsageMetadataCallbackHandler": invoke([core_handler]),
            "(c) ours, memory store": invoke([handlers["memory"]]),
            "(d) ours, SQLite": invoke([handlers["sqlite"]]),
            "(e) ours, SQLite + $ budget": invoke([handlers["sqlite+budget"]]),
        },
        {
            "(c) ours, memory store": trackers["memory"].flush,
            "(d) ours, SQLite": trackers["sqlite"].flush,
            "(e) ours, SQLite + $ budget": trackers["sqlite+budget"].flush,
        },
    )
    for tracker in trackers.values():
        tracker.close()
    return _rows(
        "langchain",
        per_call,
        "(b) UsageMetadataCallbackHandler",
        {"(d) ours, SQLite": "<= 1.10", "(e) ours, SQLite + $ budget": "<= 1.50"},
    )


def bench_llamaindex(workdir: Path) -> list[Row]:
    from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.llms import ChatMessage, MockLLM

    from usage_callbacks.llamaindex import UsageCallbackHandler

    messages = [ChatMessage(role="user", content="Summarise the quarterly report in one line.")]
    texts = ["The quarterly report shows growth.", "Costs fell in the third quarter."]
    tracker = UsageTracker(f"sqlite:///{workdir / 'li.db'}")

    def pipeline(handlers: list[object]) -> Callable[[], None]:
        manager = CallbackManager(handlers)  # type: ignore[arg-type]
        llm = MockLLM(max_tokens=16, callback_manager=manager)
        embed = MockEmbedding(embed_dim=8, callback_manager=manager)

        def call() -> None:
            llm.chat(messages)
            embed.get_text_embedding_batch(texts)

        return call

    per_call = _interleaved(
        {
            "(a) no handler": pipeline([]),
            "(b) TokenCountingHandler": pipeline([TokenCountingHandler()]),
            "(c) ours, SQLite": pipeline([UsageCallbackHandler(tracker)]),
        },
        {"(c) ours, SQLite": tracker.flush},
    )
    tracker.close()
    return _rows("llamaindex", per_call, "(b) TokenCountingHandler", {"(c) ours, SQLite": "<= 1.0"})


def run() -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        return bench_langchain(workdir) + bench_llamaindex(workdir)
