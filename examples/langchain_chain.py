"""A LangChain chain with a handler: prompt | model | parser, usage per user.

A support bot answers two customers. One handler per customer carries the user id;
the records show exactly what each conversation cost.

    python examples/langchain_chain.py
"""

import os

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from usage_callbacks import UsageTracker
from usage_callbacks.langchain import UsageCallbackHandler

#: A database of its own: examples sharing ./usage.db counted each other's rows.
DB = os.environ.get("USAGE_CALLBACKS_DB", "sqlite:///langchain_chain.db")


def answer(text: str, prompt_tokens: int, completion_tokens: int) -> AIMessage:
    """What ChatOpenAI returns: content, the model name and the provider's usage."""
    return AIMessage(
        content=text,
        response_metadata={"model_name": "gpt-4o-mini"},
        usage_metadata={
            "input_tokens": prompt_tokens,
            "output_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    )


def main() -> None:
    model = GenericFakeChatModel(
        messages=iter(
            [
                answer("Reset it from Settings > Security.", 58, 9),
                answer("Refunds take 5 business days.", 61, 7),
                answer("Yes, exports are CSV or JSONL.", 57, 8),
            ]
        )
    )
    chain = (
        ChatPromptTemplate.from_messages(
            [("system", "You are a concise support agent."), ("human", "{question}")]
        )
        | model
        | StrOutputParser()
    )
    with UsageTracker(DB) as tracker:
        for user, question in [
            ("ana", "How do I reset my password?"),
            ("ben", "When do refunds arrive?"),
            ("ana", "Can I export my data?"),
        ]:
            handler = UsageCallbackHandler(tracker, user_id=user, tags=["support-bot"])
            reply = chain.invoke({"question": question}, config={"callbacks": [handler]})
            print(f"{user}: {question} -> {reply}")
        for group in tracker.summary(group_by="user").groups:
            tokens, cost = group.usage.total_tokens, group.usage.cost_estimate_usd
            print(f"{group.key}: {group.calls} calls, {tokens} tokens, ${cost:.6f}")


if __name__ == "__main__":
    main()
