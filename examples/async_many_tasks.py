"""Many asyncio tasks, one handler: every call counted once, each conversation apart.

200 concurrent conversations share one handler; each runs in its own session, so each
gets its own total while the tracker sees them all.

    python examples/async_many_tasks.py
"""

import asyncio
import itertools
import os

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage

from usage_callbacks import UsageTracker
from usage_callbacks.langchain import UsageCallbackHandler

#: A database of its own: examples sharing ./usage.db counted each other's rows.
DB = os.environ.get("USAGE_CALLBACKS_DB", "sqlite:///async_many_tasks.db")

# The fake model calls next() from LangChain's executor threads: a Python generator would
# raise "generator already executing" under concurrency; itertools.repeat is thread-safe.
REPLY = AIMessage(
    content="ok",
    response_metadata={"model_name": "gpt-4o-mini"},
    usage_metadata={"input_tokens": 30, "output_tokens": 2, "total_tokens": 32},
)


async def conversation(model, handler, tracker, index: int) -> int:  # type: ignore[no-untyped-def]
    async with tracker.session(f"conversation-{index}") as session:
        for _ in range(index % 4 + 1):
            await model.ainvoke("ping", config={"callbacks": [handler]})
    return session.calls


async def main() -> None:
    model = GenericFakeChatModel(messages=itertools.repeat(REPLY))
    with UsageTracker(DB) as tracker:
        handler = UsageCallbackHandler(tracker)
        calls = await asyncio.gather(
            *(conversation(model, handler, tracker, i) for i in range(200))
        )
        summary = tracker.summary()
    print(
        f"{len(calls)} conversations, {sum(calls)} calls; the ledger holds {summary.calls} this run"
    )


if __name__ == "__main__":
    asyncio.run(main())
