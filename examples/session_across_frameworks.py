"""One session, two frameworks: a conversation's total whatever library made the calls.

A LangChain model drafts, a LlamaIndex model reviews; neither call is given a handler.
`tracker.session(...)` captures both and keeps the running total.

    python examples/session_across_frameworks.py
"""

import os

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from llama_index.core import Settings
from llama_index.core.llms import ChatMessage, MockLLM

from usage_callbacks import UsageTracker

#: A database of its own: examples sharing ./usage.db counted each other's rows.
DB = os.environ.get("USAGE_CALLBACKS_DB", "sqlite:///session_across_frameworks.db")


def main() -> None:
    drafter = GenericFakeChatModel(
        messages=iter(
            [
                AIMessage(
                    content="Draft: usage grew 12% this week.",
                    response_metadata={"model_name": "gpt-4o-mini"},
                    usage_metadata={"input_tokens": 140, "output_tokens": 12, "total_tokens": 152},
                )
            ]
        )
    )
    Settings.llm = MockLLM(max_tokens=20)
    with UsageTracker(DB) as tracker, tracker.session("weekly-report", user_id="ops") as session:
        draft = drafter.invoke("Summarise this week's usage.")
        Settings.llm.chat([ChatMessage(role="user", content=f"Review: {draft.content}")])
    print(f"session {session.session_id}: {session.calls} calls")
    for model, usage in session.by_model.items():
        cost = usage.cost_estimate_usd
        print(f"  {model}: {usage.prompt_tokens} in, {usage.completion_tokens} out, ${cost:.6f}")
    print(f"  total: {session.usage.total_tokens} tokens, ${session.usage.cost_estimate_usd:.6f}")


if __name__ == "__main__":
    main()
