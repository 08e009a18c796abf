"""LangChain configurations: ``GenericFakeChatModel.invoke`` with no callbacks, the
framework's own usage handler, ours (memory, SQLite, SQLite + $ budget) and the peers.

Peers export to an in-memory span exporter behind a ``BatchSpanProcessor`` (the
processor production setups use; its export thread is paid for by the peer's CPU time),
forced at the end of every round (inside its timing) and emptied before the next:

- OpenLLMetry (``opentelemetry-instrumentation-langchain``) and OpenInference
  (``openinference-instrumentation-langchain``): their instrumentors, which patch
  LangChain's callback manager to add their handler everywhere, on a private
  ``TracerProvider``.
- Langfuse: a ``Langfuse`` client given a private ``TracerProvider`` and
  ``span_exporter=InMemorySpanExporter()`` (its own span processor, media handling and
  masking still run; nothing is sent: the exporter is the only one), and its LangChain
  ``CallbackHandler``.
- langchain-community's ``OpenAICallbackHandler`` (what ``get_openai_callback`` installs).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

from harness import Missing, Side

from usage_callbacks import Budget, UsageTracker

LABELS = {
    "bare": "(a) no callbacks",
    "core": "(b) UsageMetadataCallbackHandler",
    "memory": "(c) ours, memory store",
    "sqlite": "(d) ours, SQLite",
    "budget": "(e) ours, SQLite + $ budget",
    "openai": "(f) langchain-community OpenAICallbackHandler",
    "openllmetry": "(g) OpenLLMetry LangchainInstrumentor",
    "langfuse": "(h) Langfuse CallbackHandler",
    "openinference": "(i) OpenInference LangChainInstrumentor",
}
BASELINE = "core"
NOTES = {
    "core": "has no on_chat_model_start, so LangChain builds a fallback prompt string "
    "(get_buffer_string) for it on every call",
    "sqlite": "target <= 1.10",
    "budget": "target <= 1.50",
}
PROMPT = "What is the answer to life, the universe and everything?"


@cache
def _model() -> Any:
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage

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

    return FakeGPT(messages=Replies())


def _invoke(callbacks: list[Any]) -> Callable[[], object]:
    model = _model()
    config = {"callbacks": callbacks}
    return lambda: model.invoke(PROMPT, config=config)


def _must(condition: bool, what: str) -> None:
    if not condition:
        raise RuntimeError(f"the side did not do its work: {what}")


def _ours(url: str, budgets: list[Budget]) -> Side:
    from usage_callbacks.langchain import UsageCallbackHandler

    tracker = UsageTracker(url, budgets=budgets)
    handler = UsageCallbackHandler(tracker, user_id="bench")

    def check() -> None:
        records = tracker.records(limit=1)
        _must(bool(records) and records[0].cost_known, "a priced record")

    return Side(_invoke([handler]), finish=tracker.flush, check=check, close=tracker.close)


def _memory_tracing() -> tuple[Any, Any]:
    """A private TracerProvider exporting to memory through a BatchSpanProcessor."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider, exporter


def _instrumented(instrumentor: Any) -> Side:
    """An instrumentor patches ``BaseCallbackManager.__init__`` to add its handler to every
    callback manager. It is instrumented once; its patched ``__init__`` is swapped in for
    its own rounds and out for the others' (OpenLLMetry's ``uninstrument()`` leaves its
    patch in place, so it cannot be turned off and on)."""
    from langchain_core.callbacks import BaseCallbackManager

    provider, exporter = _memory_tracing()
    original = BaseCallbackManager.__dict__["__init__"]
    instrumentor.instrument(tracer_provider=provider)
    patched = BaseCallbackManager.__dict__["__init__"]
    _must(patched is not original, "instrumented")

    def use(init: Any) -> None:
        BaseCallbackManager.__init__ = init  # type: ignore[method-assign]

    use(original)

    def enter() -> None:
        exporter.clear()
        use(patched)

    return Side(
        _invoke([]),
        finish=provider.force_flush,
        enter=enter,
        leave=lambda: use(original),
        check=lambda: _must(bool(exporter.get_finished_spans()), "spans exported"),
        close=provider.shutdown,
    )


def _peer(module: str, package: str) -> Any:
    """A peer's module, or Missing saying which package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise Missing(package) from error


def _openllmetry() -> Side:
    peer = _peer(
        "opentelemetry.instrumentation.langchain", "opentelemetry-instrumentation-langchain"
    )
    return _instrumented(peer.LangchainInstrumentor())


def _openinference() -> Side:
    peer = _peer(
        "openinference.instrumentation.langchain", "openinference-instrumentation-langchain"
    )
    return _instrumented(peer.LangChainInstrumentor())


def _langfuse() -> Side:
    langfuse = _peer("langfuse", "langfuse")
    callbacks = _peer("langfuse.langchain", "langfuse")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    client = langfuse.Langfuse(
        public_key="pk-lf-bench",
        secret_key="sk-lf-bench",
        base_url="http://127.0.0.1:9",  # never reached: the in-memory exporter is the only one
        tracer_provider=TracerProvider(),
        span_exporter=exporter,
    )
    handler = callbacks.CallbackHandler(public_key="pk-lf-bench")
    return Side(
        _invoke([handler]),
        finish=client.flush,
        enter=exporter.clear,
        check=lambda: _must(bool(exporter.get_finished_spans()), "spans exported"),
        close=client.shutdown,
    )


def _openai() -> Side:
    openai_info = _peer("langchain_community.callbacks.openai_info", "langchain-community")
    handler = openai_info.OpenAICallbackHandler()

    def check() -> None:
        _must(handler.total_tokens > 0 and handler.total_cost > 0, "tokens and cost counted")

    return Side(_invoke([handler]), check=check)


def build(name: str, workdir: Path) -> Side:
    if name == "bare":
        return Side(_invoke([]))
    if name == "core":
        from langchain_core.callbacks import UsageMetadataCallbackHandler

        core = UsageMetadataCallbackHandler()
        return Side(_invoke([core]), check=lambda: _must(bool(core.usage_metadata), "usage"))
    if name == "memory":
        return _ours("memory://", [])
    if name == "sqlite":
        return _ours(f"sqlite:///{workdir / 'lc.db'}", [])
    if name == "budget":
        budget = Budget(limit_usd=Decimal(10**6), per="user", period="day")
        return _ours(f"sqlite:///{workdir / 'lc-budget.db'}", [budget])
    peers: dict[str, Callable[[], Side]] = {
        "openai": _openai,
        "openllmetry": _openllmetry,
        "langfuse": _langfuse,
        "openinference": _openinference,
    }
    return peers[name]()
