"""Which LangGraph node, thread and tenant spent the money.

A two-node graph (a cheap model plans, a stronger one writes) serves two tenants. The
tracker declares the ``tenant`` metadata key; the summary breaks spend down by node and
model, and by tenant.

    python examples/graph_attribution.py
"""

from typing import TypedDict

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph

from usage_callbacks import UsageTracker
from usage_callbacks.cli import main as cli
from usage_callbacks.langchain import UsageCallbackHandler


def reply(model: str, text: str, prompt_tokens: int, completion_tokens: int) -> AIMessage:
    """What ChatOpenAI / ChatAnthropic return: content, model name, provider usage."""
    return AIMessage(
        content=text,
        response_metadata={"model_name": model},
        usage_metadata={
            "input_tokens": prompt_tokens,
            "output_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    )


class Trip(TypedDict):
    question: str
    plan: str
    answer: str


def main() -> None:
    planner = GenericFakeChatModel(
        messages=iter([reply("gpt-4o-mini", "1. Louvre 2. Seine", 420, 60) for _ in range(3)])
    )
    writer = GenericFakeChatModel(
        messages=iter(
            [reply("claude-sonnet-4-5", "Morning at the Louvre, ...", 910, 380) for _ in range(3)]
        )
    )

    def plan(state: Trip, config: RunnableConfig) -> dict[str, str]:
        return {"plan": str(planner.invoke(state["question"], config=config).content)}

    def write(state: Trip, config: RunnableConfig) -> dict[str, str]:
        return {"answer": str(writer.invoke(state["plan"], config=config).content)}

    builder = StateGraph(Trip)
    builder.add_node("plan", plan)
    builder.add_node("write", write)
    builder.add_edge(START, "plan")
    builder.add_edge("plan", "write")
    builder.add_edge("write", END)
    graph = builder.compile()

    with UsageTracker(dimensions=["tenant"]) as tracker:
        handler = UsageCallbackHandler(tracker)
        for thread, tenant in [("t-1", "acme"), ("t-2", "acme"), ("t-3", "globex")]:
            graph.invoke(
                {"question": "A day in Paris?", "plan": "", "answer": ""},
                config={
                    "callbacks": [handler],
                    "configurable": {"thread_id": thread},
                    "metadata": {"tenant": tenant},
                },
            )
        by_tenant = tracker.summary(group_by="dimension:tenant")
        for group in by_tenant.groups:
            print(f"tenant {group.key}: {group.calls} calls, ${group.usage.cost_estimate_usd}")
    cli(["summary", "--by", "node,model"])


if __name__ == "__main__":
    main()
