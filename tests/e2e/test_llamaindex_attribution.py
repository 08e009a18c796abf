"""Real LlamaIndex workflows and agents on llama-index-llms-openai over the loopback
provider: what each step, agent and tenant spent equals what it was billed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from llama_index.core.agent.workflow import AgentWorkflow, FunctionAgent
from llama_index.core.callbacks import CallbackManager
from llama_index.core.workflow import Event, StartEvent, StopEvent, Workflow, step
from llama_index.llms.openai import OpenAI
from llama_index_instrumentation.dispatcher import instrument_tags

from tests.e2e.provider_server import Bill, ProviderServer
from usage_callbacks import UsageTracker
from usage_callbacks.integrations.llamaindex_spans import span_tree
from usage_callbacks.llamaindex import UsageCallbackHandler, instrument
from usage_callbacks.store.models import UsageRecord


def _llm(server: ProviderServer, handler: UsageCallbackHandler, model: str) -> OpenAI:
    return OpenAI(
        model=model,
        api_base=f"{server.base_url}/v1",
        api_key="test",
        callback_manager=CallbackManager([handler]),
    )


def _agent(
    server: ProviderServer, handler: UsageCallbackHandler, name: str, model: str, **kwargs: Any
) -> FunctionAgent:
    """A FunctionAgent on the loopback provider, without tools, not streaming."""
    return FunctionAgent(
        name=name,
        description=f"The {name}.",
        llm=_llm(server, handler, model),
        tools=[],
        streaming=False,
        **kwargs,
    )


def _tokens(records: list[UsageRecord]) -> tuple[int, int]:
    return sum(r.prompt_tokens for r in records), sum(r.completion_tokens for r in records)


def _billed(bills: list[Bill]) -> tuple[int, int]:
    return sum(b.prompt for b in bills), sum(b.completion for b in bills)


class Planned(Event):
    plan: str


class TripFlow(Workflow):
    """Two steps on two models."""

    def __init__(self, planner: OpenAI, writer: OpenAI) -> None:
        super().__init__(timeout=60)
        self.planner = planner
        self.writer = writer

    @step
    async def plan(self, ev: StartEvent) -> Planned:
        response = await self.planner.acomplete(f"Plan: {ev.question}")
        return Planned(plan=response.text)

    @step
    async def answer(self, ev: Planned) -> StopEvent:
        response = await self.writer.acomplete(f"Answer from the plan: {ev.plan}")
        return StopEvent(result=response.text)


def test_a_workflow_breaks_down_by_step_and_tenant(server: ProviderServer) -> None:
    with UsageTracker("memory://", dimensions=["tenant", "feature"]) as tracker:
        handler = UsageCallbackHandler(tracker, dimensions={"feature": "trips"})
        flow = TripFlow(_llm(server, handler, "gpt-4o-mini"), _llm(server, handler, "gpt-4o"))

        async def run() -> None:
            for tenant in ("acme", "globex"):
                with instrument_tags({"tenant": tenant, "email": "someone@example.com"}):
                    assert await flow.run(question="Paris in a day?")

        asyncio.run(run())
        bills = server.billed
        assert [bill.model for bill in bills] == ["gpt-4o-mini", "gpt-4o"] * 2
        records = tracker.records()
        by_node = {g.key: g for g in tracker.summary(group_by="node").groups}
        assert (by_node["plan"].usage.prompt_tokens, by_node["plan"].usage.completion_tokens) == (
            _billed(bills[0::2])
        )
        assert _tokens([r for r in records if r.node == "answer"]) == _billed(bills[1::2])
        assert {(r.node, r.run_name, r.root_run_name, r.agent) for r in records} == {
            ("plan", "TripFlow.plan", "TripFlow.run", None),
            ("answer", "TripFlow.answer", "TripFlow.run", None),
        }
        by_tenant = {g.key: g.calls for g in tracker.summary(group_by="dimension:tenant").groups}
        assert by_tenant == {"acme": 2, "globex": 2}
        assert {r.dimensions["feature"] for r in records if r.dimensions} == {"trips"}
        assert all("email" not in (r.dimensions or {}) for r in records)
        nested = tracker.summary(group_by="node,model")
        assert {g.key: [i.key for i in g.groups] for g in nested.groups} == {
            "plan": ["gpt-4o-mini"],
            "answer": ["gpt-4o"],
        }
    assert not span_tree().open_spans  # every span was forgotten at its exit


def test_a_function_agent_is_attributed_to_its_name(server: ProviderServer) -> None:
    with UsageTracker("memory://") as tracker:
        handler = UsageCallbackHandler(tracker)
        agent = _agent(server, handler, "researcher", "gpt-4o-mini")

        async def run() -> Any:
            return await agent.run(user_msg="What is the capital of France?")

        assert "Paris" in str(asyncio.run(run()))
        [record] = tracker.records()
        [bill] = server.billed
        assert (record.agent, record.node) == ("researcher", "run_agent_step")
        assert (record.prompt_tokens, record.completion_tokens) == (bill.prompt, bill.completion)
        assert record.root_run_name == "FunctionAgent.run"


def test_an_agent_workflow_bills_each_agent_what_it_spent(server: ProviderServer) -> None:
    with UsageTracker("memory://") as tracker:
        handler = UsageCallbackHandler(tracker)
        triage = _agent(server, handler, "triage", "gpt-4o-mini", can_handoff_to=["writer"])
        writer = _agent(server, handler, "writer", "gpt-4o")
        workflow = AgentWorkflow(agents=[triage, writer], root_agent="triage")
        server.tool_calls.append(("handoff", {"to_agent": "writer", "reason": "needs prose"}))

        async def run() -> Any:
            return await workflow.run(user_msg="Describe Paris.")

        assert "Paris" in str(asyncio.run(run()))
        bills = server.billed
        assert [bill.model for bill in bills] == ["gpt-4o-mini", "gpt-4o"]
        by_agent = {g.key: g.usage for g in tracker.summary(group_by="agent").groups}
        assert {key: (u.prompt_tokens, u.completion_tokens) for key, u in by_agent.items()} == {
            "triage": _billed(bills[:1]),
            "writer": _billed(bills[1:]),
        }
        assert {r.root_run_name for r in tracker.records()} == {"AgentWorkflow.run"}


def test_the_event_handler_attributes_calls_too(server: ProviderServer) -> None:
    with UsageTracker("memory://", dimensions=["tenant"]) as tracker:
        instrumentation = instrument(tracker, dimensions={"tenant": "acme"})
        try:
            llm = OpenAI(model="gpt-4o-mini", api_base=f"{server.base_url}/v1", api_key="test")

            class OneStep(Workflow):
                @step
                async def ask(self, ev: StartEvent) -> StopEvent:
                    return StopEvent(result=(await llm.acomplete("Hello?")).text)

            async def run() -> Any:
                return await OneStep(timeout=60).run()

            asyncio.run(run())
        finally:
            instrumentation.detach()
        [record] = tracker.records()
        assert (record.node, record.dimensions) == ("ask", {"tenant": "acme"})
        assert record.total_tokens == server.billed[0].prompt + server.billed[0].completion


def test_a_failing_step_leaves_no_span_behind(server: ProviderServer) -> None:
    with UsageTracker("memory://") as tracker:
        llm = _llm(server, UsageCallbackHandler(tracker), "gpt-4o-mini")

        class Failing(Workflow):
            @step
            async def ask(self, ev: StartEvent) -> StopEvent:
                await llm.acomplete("Hello?")
                raise RuntimeError("the step broke")

        async def run() -> Any:
            return await Failing(timeout=60).run()

        with pytest.raises(RuntimeError, match="the step broke"):
            asyncio.run(run())
        [record] = tracker.records()
        assert record.node == "ask"
    assert not span_tree().open_spans
