"""Budgets that cannot be bypassed through the LangChain handler (issue 15): every path
shows the fake provider was not called when the budget refuses."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import FakeListLLM
from langchain_core.messages import HumanMessage

from tests.integrations.lc_models import CountingChatModel
from usage_callbacks import (
    Budget,
    BudgetExceededError,
    BudgetUnavailableError,
    UnpricedModelError,
    UsageTracker,
)
from usage_callbacks.integrations import langchain as lc_adapter
from usage_callbacks.langchain import UsageCallbackHandler
from usage_callbacks.runs import CALLS

QUESTION = [HumanMessage("What is six times seven?")]

LANGCHAIN_ONLY = """
import sys
sys.modules["llama_index"] = None  # pip install "usage-callbacks[langchain]": no llama-index
from langchain_core.messages import HumanMessage
from tests.integrations.lc_models import CountingChatModel
from usage_callbacks import Budget, BudgetExceededError, UsageTracker
from usage_callbacks.langchain import UsageCallbackHandler
tracker = UsageTracker("memory://", budgets=[Budget(limit_tokens=100, period="day")])
model = CountingChatModel(max_tokens=20, callbacks=[UsageCallbackHandler(tracker)])
refused = 0
for _ in range(10):
    try:
        model.invoke([HumanMessage("What is six times seven?")])
    except BudgetExceededError:
        refused += 1
print(model.calls, refused, tracker.summary().usage.total_tokens)
"""


def test_a_langchain_only_install_offline_enforces_the_budget(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache"),
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), *sys.path]),
    }
    result = subprocess.run(
        [sys.executable, "-c", LANGCHAIN_ONLY], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    calls, refused, spent = map(int, result.stdout.split())
    assert calls + refused == 10 and refused > 0
    assert spent <= 100 and spent == 28 * calls  # every call that ran was recorded


@pytest.fixture
def broken_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> int:
        raise RuntimeError("the tokenizer broke")

    monkeypatch.setattr(lc_adapter, "count_message_tokens", fail)


@pytest.mark.usefixtures("broken_estimate")
def test_an_error_before_the_reservation_refuses_when_fail_closed() -> None:
    with UsageTracker("memory://", budgets=[Budget(limit_tokens=10_000)]) as tracker:
        model = CountingChatModel(callbacks=[UsageCallbackHandler(tracker)])
        with pytest.raises(BudgetUnavailableError, match="tokenizer broke"):
            model.invoke(QUESTION)
        assert model.calls == 0
        assert len(tracker.runs) == 0 and not len(CALLS)


@pytest.mark.usefixtures("broken_estimate")
def test_an_error_before_the_reservation_warns_and_allows_when_fail_open(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracker = UsageTracker(
        "memory://", budgets=[Budget(limit_tokens=10_000)], budget_failure_mode="open"
    )
    with tracker, caplog.at_level(logging.WARNING, "usage_callbacks"):
        model = CountingChatModel(callbacks=[UsageCallbackHandler(tracker)])
        model.invoke(QUESTION)
        assert model.calls == 1
        assert "fail-open" in caplog.text
        assert tracker.summary().usage.total_tokens == 28  # still recorded


def test_a_max_tokens_beyond_any_call_is_refused_not_waved_through() -> None:
    with UsageTracker("memory://", budgets=[Budget(limit_tokens=10_000)]) as tracker:
        model = CountingChatModel(max_tokens=10**13, callbacks=[UsageCallbackHandler(tracker)])
        with pytest.raises(BudgetExceededError) as refused:
            model.invoke(QUESTION)
        assert not isinstance(refused.value, BudgetUnavailableError)
        assert model.calls == 0


def test_unpriced_models_are_bounded_under_a_usd_budget() -> None:
    # 28 tokens a call at the default $150/MTok bound: $0.0042 a call
    limit = Decimal("0.03")
    with UsageTracker("memory://", budgets=[Budget(limit_usd=limit)]) as tracker:
        model = CountingChatModel(
            model="my-azure-deployment", max_tokens=7, callbacks=[UsageCallbackHandler(tracker)]
        )
        refused = 0
        for _ in range(20):
            try:
                model.invoke(QUESTION)
            except BudgetExceededError:
                refused += 1
        assert refused > 0 and model.calls + refused == 20
        assert model.calls * 28 * Decimal(150) / 1_000_000 <= limit
        records = tracker.records()
        assert all(not record.cost_known for record in records)  # the record stays honest


def test_unpriced_models_are_refused_with_advice_when_asked() -> None:
    tracker = UsageTracker("memory://", budgets=[Budget(limit_usd=5)], unpriced_usd_per_mtok=None)
    with tracker:
        model = CountingChatModel(model="my-deployment", callbacks=[UsageCallbackHandler(tracker)])
        with pytest.raises(UnpricedModelError, match="prices=") as refused:
            model.invoke(QUESTION)
        assert "my-deployment" in str(refused.value)
        assert model.calls == 0
        # a token budget alone needs no price: the same call goes through
    with UsageTracker(
        "memory://", budgets=[Budget(limit_tokens=1000)], unpriced_usd_per_mtok=None
    ) as tokens_only:
        model = CountingChatModel(
            model="my-deployment", max_tokens=50, callbacks=[UsageCallbackHandler(tokens_only)]
        )
        model.invoke(QUESTION)
        assert model.calls == 1


def test_a_refusal_leaves_no_state_in_a_tracker_without_a_budget() -> None:
    """A call refused by one tracker's handler is never made: a tracker without a budget
    that saw its start (an earlier handler) used to keep its state until the TTL."""
    plain = UsageTracker("memory://")
    tight = UsageTracker("memory://", budgets=[Budget(limit_tokens=10)])
    with plain, tight:
        model = CountingChatModel(
            max_tokens=400,
            callbacks=[UsageCallbackHandler(plain), UsageCallbackHandler(tight)],
        )
        with pytest.raises(BudgetExceededError):
            model.invoke(QUESTION)
        assert model.calls == 0
        assert len(plain.runs) == len(tight.runs) == len(CALLS) == 0
        assert plain.records() == []


def test_a_refusal_by_a_second_trackers_handler_releases_the_first_trackers_hold() -> None:
    roomy = UsageTracker("memory://", budgets=[Budget(limit_tokens=2_000)])
    tight = UsageTracker("memory://", budgets=[Budget(limit_tokens=10)])
    with roomy, tight:
        model = CountingChatModel(
            max_tokens=400,
            callbacks=[UsageCallbackHandler(roomy), UsageCallbackHandler(tight)],
        )
        for _ in range(6):  # each would hold ~420 of roomy's 2,000 if not released
            with pytest.raises(BudgetExceededError):
                model.invoke(QUESTION)
        assert model.calls == 0
        assert len(roomy.runs) == 0 and len(tight.runs) == 0 and not len(CALLS)
        [status] = roomy.budget_status()
        assert status.reserved_tokens == 0 and status.spent_tokens == 0
        alone = CountingChatModel(max_tokens=400, callbacks=[UsageCallbackHandler(roomy)])
        alone.invoke(QUESTION)  # roomy's budget is intact
        assert alone.calls == 1


def test_llamaindex_two_trackers_a_refusal_releases_the_others_hold() -> None:
    from llama_index.core.callbacks import CallbackManager

    from tests.integrations.test_llamaindex import BilledLLM
    from usage_callbacks.llamaindex import UsageCallbackHandler as LlamaHandler

    roomy = UsageTracker("memory://", budgets=[Budget(limit_tokens=2_000)])
    tight = UsageTracker("memory://", budgets=[Budget(limit_tokens=10)])
    with roomy, tight:
        llm = BilledLLM(
            callback_manager=CallbackManager([LlamaHandler(roomy), LlamaHandler(tight)])
        )
        for _ in range(6):
            with pytest.raises(BudgetExceededError):
                llm.complete("What does the quarterly report say?")
        assert llm.calls == 0 and len(roomy.runs) == 0
        [status] = roomy.budget_status()
        assert status.reserved_tokens == 0


def test_llamaindex_an_error_before_the_reservation_refuses_when_fail_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from llama_index.core.callbacks import CallbackManager

    from tests.integrations.test_llamaindex import BilledLLM
    from usage_callbacks.integrations import llamaindex as li_adapter
    from usage_callbacks.llamaindex import UsageCallbackHandler as LlamaHandler

    def fail(*args: object, **kwargs: object) -> int:
        raise RuntimeError("the tokenizer broke")

    monkeypatch.setattr(li_adapter, "count_texts_tokens", fail)
    with UsageTracker("memory://", budgets=[Budget(limit_tokens=10_000)]) as tracker:
        llm = BilledLLM(callback_manager=CallbackManager([LlamaHandler(tracker)]))
        with pytest.raises(BudgetUnavailableError):
            llm.complete("What does the quarterly report say?")
        assert llm.calls == 0 and len(tracker.runs) == 0


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather, hourly forecast and air quality for a city. " * 8,
        "parameters": {
            "type": "object",
            "properties": {
                name: {"type": "string", "description": f"The {name} to report on, in full."}
                for name in ("city", "country", "region", "units", "language", "detail")
            },
            "required": ["city"],
        },
    },
}


def test_tool_schemas_are_reserved_before_the_call() -> None:
    """The request sends the tool definitions: they are part of what a call can cost."""
    from langchain_openai import ChatOpenAI

    from tests.e2e.provider_server import ProviderServer
    from usage_callbacks.tokens import count_schema_tokens

    assert count_schema_tokens([WEATHER_TOOL], "gpt-4o-mini") > 200
    server = ProviderServer().start()
    try:
        with UsageTracker("memory://", budgets=[Budget(limit_tokens=200)]) as tracker:
            model = ChatOpenAI(
                model="gpt-4o-mini",
                base_url=f"{server.base_url}/v1",
                api_key="test",
                max_tokens=10,
                callbacks=[UsageCallbackHandler(tracker)],
            )
            model.invoke(QUESTION)  # without tools, ~25 tokens + 10 fit
            assert server.requests == 1
            with pytest.raises(BudgetExceededError):
                model.bind_tools([WEATHER_TOOL]).invoke(QUESTION)
            assert server.requests == 1  # refused before the provider
    finally:
        server.stop()


def test_structured_output_schemas_are_reserved_before_the_call() -> None:
    from pydantic import BaseModel, Field

    class Forecast(BaseModel):
        """A weather forecast for one city, with every detail a traveller could need."""

        city: str = Field(description="The city the forecast is for, spelled in full.")
        summary: str = Field(description="One sentence on the day's weather, morning to night.")
        hourly: list[str] = Field(description="Twenty-four hourly conditions, in order.")
        warnings: list[str] = Field(description="Any official weather warnings in force.")

    with UsageTracker("memory://", budgets=[Budget(limit_tokens=120)]) as tracker:
        model = CountingChatModel(max_tokens=10, callbacks=[UsageCallbackHandler(tracker)])
        model.invoke(QUESTION)
        config = {"metadata": {"ls_structured_output_format": {"schema": Forecast}}}
        with pytest.raises(BudgetExceededError):
            model.invoke(QUESTION, config=config)  # type: ignore[arg-type]
        assert model.calls == 1


def _own_manager_llm() -> Any:
    """A LlamaIndex LLM built with a CallbackManager of its own (or before
    Settings.callback_manager was set): handlers added to Settings never meet it."""
    from llama_index.core.callbacks import CallbackManager

    from tests.integrations.test_llamaindex import BilledLLM

    return BilledLLM(callback_manager=CallbackManager([]))


def _call_until_refused(llm: Any, attempts: int = 10) -> int:
    refused = 0
    for _ in range(attempts):
        try:
            llm.complete("What does the quarterly report say?")
        except BudgetExceededError:
            refused += 1
    return refused


def test_llamaindex_instrument_alone_refuses_over_budget_calls() -> None:
    from usage_callbacks.llamaindex import instrument

    with UsageTracker("memory://", budgets=[Budget(limit_tokens=300)]) as tracker:
        handle = instrument(tracker)
        try:
            llm = _own_manager_llm()
            refused = _call_until_refused(llm)
        finally:
            handle.detach()
        assert refused > 0 and llm.calls + refused == 10
        assert tracker.summary().usage.total_tokens == 49 * llm.calls <= 300
        assert tracker.summary().calls == llm.calls  # counted once, not by both handlers
        assert handle.enforcer not in llm.callback_manager.handlers  # detach took it off


def test_llamaindex_detach_takes_the_enforcer_off_settings_shared_handler_list() -> None:
    """A ``CallbackManager()`` made with no handlers once Settings has one shares Settings'
    handler list: the enforcer put on it stayed there after ``detach()`` when that manager
    was gone first, and once its tracker closed it refused every later call
    (BudgetUnavailableError: fail-closed on a closed ledger)."""
    from llama_index.core import Settings
    from llama_index.core.llms import MockLLM

    from usage_callbacks.llamaindex import instrument

    Settings.callback_manager  # noqa: B018 (made now, as by any earlier use of Settings)
    with UsageTracker("memory://", budgets=[Budget(limit_tokens=10**6)]) as tracker:
        handle = instrument(tracker)
        try:
            MockLLM(max_tokens=8).complete("hi")  # its manager shares Settings' list, and goes
            gc.collect()
        finally:
            handle.detach()
    assert handle.enforcer not in Settings.callback_manager.handlers
    assert MockLLM(max_tokens=8).complete("after").text  # not refused by a closed tracker


def test_llamaindex_session_budget_reaches_an_llm_with_its_own_manager() -> None:
    with UsageTracker("memory://") as tracker:
        llm = _own_manager_llm()
        with tracker.session("report", max_tokens=300) as session:
            refused = _call_until_refused(llm)
        assert refused > 0 and llm.calls + refused == 10
        assert session.usage.total_tokens == 49 * llm.calls <= 300


class _Listener(BaseCallbackHandler):
    """Another handler on the call (a tracer, a logger): not run inline."""


def _runtime_warnings(run: Callable[[], object]) -> list[str]:
    """RuntimeWarnings raised while ``run()`` is refused, and when its garbage goes."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(BudgetExceededError):
            run()
        gc.collect()
    return [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]


def test_an_async_refusal_leaves_no_coroutine_unawaited() -> None:
    """LangChain's async manager makes every handler's start coroutine, then awaits them in
    turn: a refusal left those after ours never awaited (a RuntimeWarning each)."""
    with UsageTracker("memory://", budgets=[Budget(limit_tokens=10)]) as tracker:
        model = CountingChatModel(max_tokens=20, callbacks=[UsageCallbackHandler(tracker)])
        with_listener = {"callbacks": [_Listener()]}
        assert _runtime_warnings(lambda: asyncio.run(model.ainvoke(QUESTION, with_listener))) == []
        assert _runtime_warnings(lambda: asyncio.run(model.agenerate([QUESTION, QUESTION]))) == []
        assert model.calls == 0
        llm = FakeListLLM(responses=["42"], callbacks=[UsageCallbackHandler(tracker)])
        assert _runtime_warnings(lambda: asyncio.run(llm.agenerate(["6 x 7?", "6 x 9?"]))) == []
        assert llm.i == 0  # the fake provider was not called either
