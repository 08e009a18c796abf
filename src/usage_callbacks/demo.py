"""The offline demo behind ``usage-callbacks demo``: real framework calls, fake models.

It drives LangChain and LlamaIndex (when installed) through the library's handlers and
sessions, records into a fresh SQLite file (or ``--db``), trips the budget of alice's
session, and prints what this run recorded. Models are the frameworks' own fakes, so it
needs no network and no API key, and every run tells the same story.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import tempfile
import uuid
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

from usage_callbacks import BudgetExceededError, TokenUsage, UsageSummary, UsageTracker

#: alice's demo session may spend this much: her fourth question does not fit. Each call
#: reserves its prompt plus 256 output tokens (fake models have no max_tokens) first.
ALICE_SESSION_USD = Decimal("0.0006")

QUESTIONS = (
    "What does usage-callbacks record for each call?",
    "How do budgets stop a call before the provider is paid?",
    "Which databases can hold the ledger?",
)


def _langchain_calls(tracker: UsageTracker) -> None:
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage

    from usage_callbacks.langchain import UsageCallbackHandler

    def reply(text: str, prompt: int, completion: int, cached: int = 0) -> AIMessage:
        return AIMessage(
            content=text,
            response_metadata={"model_name": "gpt-4o-mini"},
            usage_metadata={
                "input_tokens": prompt,
                "output_tokens": completion,
                "total_tokens": prompt + completion,
                "input_token_details": {"cache_read": cached},
            },
        )

    class FakeGPT(GenericFakeChatModel):
        """A fake chat model that names its model, as real integrations do."""

        model_name: str = "gpt-4o-mini"

    model = FakeGPT(
        messages=iter(
            [
                reply("Prompt, completion, cached and reasoning tokens, and the cost.", 812, 96),
                reply("It reserves the worst case and raises if that does not fit.", 954, 120, 512),
                reply("SQLite by default, PostgreSQL for many workers.", 640, 48),
                reply("Unreachable: the budget refused this call.", 10, 10),
            ]
        )
    )
    alice = UsageCallbackHandler(tracker, user_id="alice", tags=["demo"])
    name = f"alice-{uuid.uuid4().hex[:8]}"
    with tracker.session(name, user_id="alice", max_cost_usd=ALICE_SESSION_USD):
        for question in (*QUESTIONS, "One more, please."):
            try:
                answer = model.invoke(question, config={"callbacks": [alice]})
            except BudgetExceededError as refused:
                print(f"  langchain  alice  refused before the call: {refused}")
                continue
            print(f"  langchain  alice  {question[:44]:<44} -> {str(answer.content)[:40]}...")


def _llamaindex_calls(tracker: UsageTracker) -> None:
    from llama_index.core import Document, Settings, VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.llms import LLMMetadata, MockLLM

    class FakeGPT(MockLLM):
        """LlamaIndex's fake LLM, naming its model as real integrations do (an unnamed
        model has no price: a $ budget would count it at ``unpriced_usd_per_mtok``)."""

        @property
        def metadata(self) -> LLMMetadata:
            return super().metadata.model_copy(update={"model_name": "gpt-4o-mini"})

    Settings.llm = FakeGPT(max_tokens=64)
    Settings.embed_model = MockEmbedding(embed_dim=8, model_name="text-embedding-3-small")
    documents = [
        Document(text="usage-callbacks records prompt, completion and embedding tokens."),
        Document(text="Budgets are checked before the provider is called."),
        Document(text="The ledger lives in SQLite or PostgreSQL through SQLModel."),
    ]
    with tracker.session(f"rag-{uuid.uuid4().hex[:8]}", user_id="bob") as session:
        index = VectorStoreIndex.from_documents(documents)
        answer = index.as_query_engine(similarity_top_k=len(documents)).query(QUESTIONS[1])
    print(f"  llamaindex bob    RAG query -> {str(answer)[:40]!r}")
    print(
        f"  session {session.session_id}: {session.calls} calls, "
        f"{session.usage.embedding_tokens} embedding + {session.usage.prompt_tokens} prompt + "
        f"{session.usage.completion_tokens} completion tokens"
    )


def _manual_calls(tracker: UsageTracker) -> None:
    usage = TokenUsage(prompt_tokens=1200, completion_tokens=300, cache_read_tokens=1024)
    tracker.record(usage, model="claude-sonnet-4-5", provider="anthropic", user_id="carol")
    print("  manual     carol  tracker.record(TokenUsage(...)) for claude-sonnet-4-5")


def print_summary(summary: UsageSummary) -> None:
    """A compact table of the summary, by group."""
    header = f"  {'model':<22}{'calls':>6}{'prompt':>9}{'compl.':>8}{'embed':>7}{'cost $':>12}"
    print(header)
    for group in summary.groups:
        usage = group.usage
        print(
            f"  {group.key or '-':<22}{group.calls:>6}{usage.prompt_tokens:>9}"
            f"{usage.completion_tokens:>8}{usage.embedding_tokens:>7}"
            f"{usage.cost_estimate_usd:>12.6f}"
        )
    total = summary.usage
    print(
        f"  {'total':<22}{summary.calls:>6}{total.prompt_tokens:>9}{total.completion_tokens:>8}"
        f"{total.embedding_tokens:>7}{total.cost_estimate_usd:>12.6f}"
        f"   p50/p95 tokens per call: {summary.stats.p50}/{summary.stats.p95}"
    )


def main(url: str | None = None) -> int:
    """Record the demo into ``url``, or into a fresh database of its own."""
    if url is None:
        folder = Path(tempfile.mkdtemp(prefix="usage-callbacks-demo-"))
        url = f"sqlite:///{folder / 'usage.db'}"
    # LangChain logs every exception a handler raises, the refusals included.
    logging.getLogger("langchain_core.callbacks.manager").setLevel(logging.ERROR)
    started = datetime.now(timezone.utc)
    with UsageTracker(url, durable=True, default_output_allowance=256) as tracker:
        print(f"usage-callbacks demo: recording into {url}")
        if importlib.util.find_spec("langchain_core"):
            _langchain_calls(tracker)
        if importlib.util.find_spec("llama_index.core"):
            _llamaindex_calls(tracker)
        _manual_calls(tracker)
        print("\nWhat this run recorded:")
        print_summary(tracker.summary(group_by="model", since=started))
    print(f"\nMore: usage-callbacks summary --db {url} --by user")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None))
