"""Fake LangChain chat models that put usage where real integrations put it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

_CALLS_LOCK = threading.Lock()
#: Integrations that report usage outside usage_metadata, by where they put it.
_PROVIDER_REPORTING_IN = {"generation_info": "ollama", "response_metadata": "amazon_bedrock"}


class CountingChatModel(BaseChatModel):
    """Answers ``reply``; counts the calls that reached it (the "provider").

    ``where`` decides where usage is reported: ``usage_metadata`` (modern integrations),
    ``llm_output`` (OpenAI-style ``token_usage``), ``generation_info`` (Ollama),
    ``response_metadata`` (Bedrock Converse) or ``none``.
    """

    reply: str = "The answer is forty-two."
    where: str = "usage_metadata"
    prompt_tokens: int = 21
    completion_tokens: int = 7
    n: int = 1
    model: str = "gpt-4o-mini"
    report_model: bool = True
    fail_with: str | None = None
    max_tokens: int | None = None
    calls: int = 0

    @property
    def _llm_type(self) -> str:
        return "counting-chat"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        """The provider whose integration reports usage where ``where`` says."""
        params = super()._get_ls_params(stop=stop, **kwargs)
        provider = _PROVIDER_REPORTING_IN.get(self.where)
        if provider:
            params["ls_provider"] = provider
        return params

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "max_tokens": self.max_tokens}

    def _count_call(self) -> None:
        with _CALLS_LOCK:
            object.__setattr__(self, "calls", self.calls + 1)
        if self.fail_with:
            raise RuntimeError(self.fail_with)

    def _message(self) -> AIMessage:
        usage = {
            "input_tokens": self.prompt_tokens,
            "output_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        metadata: dict[str, Any] = {"model_name": self.model} if self.report_model else {}
        if self.where == "response_metadata":
            metadata["usage"] = {
                "inputTokens": self.prompt_tokens,
                "outputTokens": self.completion_tokens,
                "totalTokens": self.prompt_tokens + self.completion_tokens,
            }
        return AIMessage(
            content=self.reply,
            response_metadata=metadata,
            usage_metadata=usage if self.where == "usage_metadata" else None,  # type: ignore[arg-type]
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        self._count_call()
        info = None
        if self.where == "generation_info":
            info = {"prompt_eval_count": self.prompt_tokens, "eval_count": self.completion_tokens}
        generations = [
            ChatGeneration(message=self._message(), generation_info=info) for _ in range(self.n)
        ]
        llm_output = None
        if self.where == "llm_output":
            llm_output = {
                "token_usage": {
                    "prompt_tokens": self.prompt_tokens,
                    "completion_tokens": self.completion_tokens,
                    "total_tokens": self.prompt_tokens + self.completion_tokens,
                },
                "model_name": self.model,
            }
        return ChatResult(generations=generations, llm_output=llm_output)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        self._count_call()
        words = self.reply.split(" ")
        for index, word in enumerate(words):
            text = word if index == 0 else " " + word
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=text))
            if run_manager:
                run_manager.on_llm_new_token(text, chunk=chunk)
            yield chunk
        if self.where == "usage_metadata":  # usage in a final, empty chunk, once
            yield ChatGenerationChunk(
                message=AIMessageChunk(
                    content="",
                    response_metadata={"model_name": self.model},
                    usage_metadata={
                        "input_tokens": self.prompt_tokens,
                        "output_tokens": self.completion_tokens,
                        "total_tokens": self.prompt_tokens + self.completion_tokens,
                    },
                )
            )
