"""LlamaIndex configurations: a MockLLM chat plus a MockEmbedding batch through a
CallbackManager with no handler, the framework's ``TokenCountingHandler``, and ours: our
CallbackManager handler, or ``instrument()`` (our handler on the root dispatcher, attached
for its own rounds only, since it hears every call in the process)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import Side

from usage_callbacks import UsageTracker

LABELS = {
    "bare": "(a) no handler",
    "core": "(b) TokenCountingHandler",
    "sqlite": "(c) ours, SQLite",
    "instrument": "(d) ours, instrument(), SQLite",
}
BASELINE = "core"
NOTES = {"sqlite": "target <= 1.0", "instrument": "target <= 1.0"}


def _pipeline(handlers: list[Any]) -> Callable[[], object]:
    from llama_index.core.callbacks import CallbackManager
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.llms import ChatMessage, MockLLM

    messages = [ChatMessage(role="user", content="Summarise the quarterly report in one line.")]
    texts = ["The quarterly report shows growth.", "Costs fell in the third quarter."]
    manager = CallbackManager(handlers)
    llm = MockLLM(max_tokens=16, callback_manager=manager)
    embed = MockEmbedding(embed_dim=8, callback_manager=manager)

    def call() -> None:
        llm.chat(messages)
        embed.get_text_embedding_batch(texts)

    return call


def _must(condition: bool) -> None:
    if not condition:
        raise RuntimeError("the side did not do its work: no tokens counted")


def build(name: str, workdir: Path) -> Side:
    if name == "bare":
        return Side(_pipeline([]))
    if name == "core":
        from llama_index.core.callbacks import TokenCountingHandler

        counter = TokenCountingHandler()
        return Side(_pipeline([counter]), check=lambda: _must(counter.total_llm_token_count > 0))
    from usage_callbacks.llamaindex import UsageCallbackHandler, instrument

    tracker = UsageTracker(f"sqlite:///{workdir / f'li-{name}.db'}")
    check = lambda: _must(bool(tracker.records(limit=1)))  # noqa: E731
    if name == "sqlite":
        call = _pipeline([UsageCallbackHandler(tracker)])
        return Side(call, finish=tracker.flush, check=check, close=tracker.close)
    attached: list[Any] = []
    return Side(
        _pipeline([]),
        finish=tracker.flush,
        enter=lambda: attached.append(instrument(tracker)),
        leave=lambda: attached.pop().detach(),
        check=check,
        close=tracker.close,
    )
