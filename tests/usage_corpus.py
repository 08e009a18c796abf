"""Provider payloads as the providers send them, with the usage each one bills.

Built from the installed SDK types (openai, anthropic) where they exist, else from the
providers' API references (field names and which counts include which). Each case names
the reader source an integration would pick, the whole response, what it bills, and the
genai-prices extractor (provider, flavor) that reads the same body, when there is one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from anthropic.types import Message
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion
from openai.types.realtime import RealtimeResponseUsage
from openai.types.responses import Response


@dataclass(frozen=True)
class Case:
    name: str
    source: str
    response: Any
    #: The TokenUsage fields the provider billed (absent fields: 0).
    bills: dict[str, Any]
    model: str
    provider: str | None = None
    #: genai-prices (provider_id, api_flavor) reading the same body, if it has one.
    extractor: tuple[str, str] | None = None
    call_type: str = "chat"
    tags: tuple[str, ...] = field(default=())


def _chat(usage: dict[str, Any], model: str = "gpt-4o", **extra: Any) -> ChatCompletion:
    return ChatCompletion.model_validate(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1_760_000_000,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "hi"},
                }
            ],
            "usage": usage,
            **extra,
        }
    )


def _anthropic(usage: dict[str, Any], model: str = "claude-sonnet-4-5") -> Message:
    return Message.model_validate(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": "hi"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }
    )


def _response(usage: dict[str, Any], model: str = "gpt-5", **extra: Any) -> Response:
    return Response.model_validate(
        {
            "id": "resp_1",
            "object": "response",
            "created_at": 1_760_000_000,
            "model": model,
            "output": [],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "status": "completed",
            "usage": usage,
            **extra,
        }
    )


OPENAI = [
    Case(
        "openai chat with cache and reasoning",
        "openai",
        _chat(
            {
                "prompt_tokens": 2_000,
                "completion_tokens": 500,
                "total_tokens": 2_500,
                "prompt_tokens_details": {"cached_tokens": 1_536, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 320, "audio_tokens": 0},
            },
            model="o4-mini",
        ),
        {
            "prompt_tokens": 2_000,
            "completion_tokens": 500,
            "cache_read_tokens": 1_536,
            "reasoning_tokens": 320,
        },
        "o4-mini",
        "openai",
        ("openai", "chat"),
    ),
    Case(
        "openai chat audio in and out (gpt-audio)",
        "openai",
        _chat(
            {
                "prompt_tokens": 1_200,
                "completion_tokens": 900,
                "total_tokens": 2_100,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 1_000},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 800},
            },
            model="gpt-audio",
        ),
        {
            "prompt_tokens": 1_200,
            "completion_tokens": 900,
            "input_audio_tokens": 1_000,
            "output_audio_tokens": 800,
        },
        "gpt-audio",
        "openai",
        ("openai", "chat"),
    ),
    Case(
        "openai chat served at the flex tier",
        "openai",
        _chat(
            {
                "prompt_tokens": 10_000,
                "completion_tokens": 2_000,
                "total_tokens": 12_000,
                "prompt_tokens_details": {"cached_tokens": 4_096},
                "completion_tokens_details": {"reasoning_tokens": 1_024},
            },
            model="o3",
            service_tier="flex",
        ),
        {
            "prompt_tokens": 10_000,
            "completion_tokens": 2_000,
            "cache_read_tokens": 4_096,
            "reasoning_tokens": 1_024,
            "service_tier": "flex",
        },
        "o3",
        "openai",
        ("openai", "chat"),
    ),
    Case(
        "openrouter chat with cache writes",
        "openai",
        _chat(
            {
                "prompt_tokens": 3_000,
                "completion_tokens": 100,
                "total_tokens": 3_100,
                "prompt_tokens_details": {"cached_tokens": 1_000, "cache_write_tokens": 1_500},
            },
            model="anthropic/claude-sonnet-4.5",
        ),
        {
            "prompt_tokens": 3_000,
            "completion_tokens": 100,
            "cache_read_tokens": 1_000,
            "cache_write_tokens": 1_500,
        },
        "anthropic/claude-sonnet-4.5",
        "openrouter",
        ("openrouter", "chat"),
    ),
    Case(
        "openai responses with cache and reasoning",
        "openai",
        _response(
            {
                "input_tokens": 5_000,
                "input_tokens_details": {"cached_tokens": 2_048, "cache_write_tokens": 0},
                "output_tokens": 1_500,
                "output_tokens_details": {"reasoning_tokens": 1_200},
                "total_tokens": 6_500,
            }
        ),
        {
            "prompt_tokens": 5_000,
            "completion_tokens": 1_500,
            "cache_read_tokens": 2_048,
            "reasoning_tokens": 1_200,
        },
        "gpt-5",
        "openai",
        ("openai", "responses"),
    ),
    Case(
        "openai realtime response.done usage",
        "openai",
        {
            "object": "realtime.response",
            "id": "resp_rt",
            "status": "completed",
            "usage": RealtimeResponseUsage.model_validate(
                {
                    "total_tokens": 1_700,
                    "input_tokens": 1_200,
                    "output_tokens": 500,
                    "input_token_details": {
                        "text_tokens": 200,
                        "audio_tokens": 1_000,
                        "image_tokens": 0,
                        "cached_tokens": 600,
                        "cached_tokens_details": {
                            "text_tokens": 100,
                            "audio_tokens": 500,
                            "image_tokens": 0,
                        },
                    },
                    "output_token_details": {"text_tokens": 100, "audio_tokens": 400},
                }
            ),
        },
        {
            "prompt_tokens": 1_200,
            "completion_tokens": 500,
            "cache_read_tokens": 600,
            "input_audio_tokens": 500,
            "output_audio_tokens": 400,
        },
        "gpt-realtime",
        "openai",
    ),
    Case(
        "openai embeddings",
        "openai",
        CreateEmbeddingResponse.model_validate(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}],
                "model": "text-embedding-3-small",
                "usage": {"prompt_tokens": 812, "total_tokens": 812},
            }
        ),
        {"embedding_tokens": 812},
        "text-embedding-3-small",
        "openai",
        call_type="embedding",
    ),
]

ANTHROPIC = [
    Case(
        "anthropic cache read and writes split by TTL",
        "anthropic",
        _anthropic(
            {
                "input_tokens": 50,
                "output_tokens": 300,
                "cache_read_input_tokens": 10_000,
                "cache_creation_input_tokens": 3_000,
                "cache_creation": {
                    "ephemeral_5m_input_tokens": 1_000,
                    "ephemeral_1h_input_tokens": 2_000,
                },
            }
        ),
        {
            "prompt_tokens": 13_050,
            "completion_tokens": 300,
            "cache_read_tokens": 10_000,
            "cache_write_tokens": 3_000,
            "cache_write_1h_tokens": 2_000,
        },
        "claude-sonnet-4-5",
        "anthropic",
        ("anthropic", "default"),
    ),
    Case(
        "anthropic thinking",
        "anthropic",
        _anthropic(
            {
                "input_tokens": 400,
                "output_tokens": 2_000,
                "output_tokens_details": {"thinking_tokens": 1_500},
            }
        ),
        {"prompt_tokens": 400, "completion_tokens": 2_000, "reasoning_tokens": 1_500},
        "claude-sonnet-4-5",
        "anthropic",
        ("anthropic", "default"),
    ),
    Case(
        "anthropic web search",
        "anthropic",
        _anthropic(
            {
                "input_tokens": 9_000,
                "output_tokens": 700,
                "server_tool_use": {"web_search_requests": 3, "web_fetch_requests": 0},
            }
        ),
        {"prompt_tokens": 9_000, "completion_tokens": 700, "web_search_requests": 3},
        "claude-sonnet-4-5",
        "anthropic",
        ("anthropic", "default"),
    ),
]

# google-genai's GenerateContentResponse.model_dump() (snake_case) and the REST body
# (camelCase), per ai.google.dev/api/generate-content#UsageMetadata: thoughts and
# tool-use prompt tokens are reported beside, not inside, the candidate/prompt counts.
GOOGLE = [
    Case(
        "google-genai SDK object with modalities, thoughts and tool use",
        "gemini",
        {
            "model_version": "gemini-2.5-flash",
            "usage_metadata": {
                "prompt_token_count": 1_500,
                "candidates_token_count": 200,
                "thoughts_token_count": 800,
                "tool_use_prompt_token_count": 300,
                "cached_content_token_count": 512,
                "total_token_count": 2_800,
                "prompt_tokens_details": [
                    {"modality": "TEXT", "token_count": 700},
                    {"modality": "AUDIO", "token_count": 800},
                ],
                "cache_tokens_details": [
                    {"modality": "TEXT", "token_count": 312},
                    {"modality": "AUDIO", "token_count": 200},
                ],
                "candidates_tokens_details": [{"modality": "TEXT", "token_count": 200}],
            },
        },
        {
            "prompt_tokens": 1_800,
            "completion_tokens": 1_000,
            "cache_read_tokens": 512,
            "reasoning_tokens": 800,
            "tool_prompt_tokens": 300,
            "input_audio_tokens": 600,
        },
        "gemini-2.5-flash",
        "google",
    ),
    Case(
        "gemini REST body, image output (gemini-2.5-flash-image)",
        "gemini",
        {
            "modelVersion": "gemini-2.5-flash-image",
            "usageMetadata": {
                "promptTokenCount": 20,
                "candidatesTokenCount": 1_290,
                "totalTokenCount": 1_310,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 20}],
                "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1_290}],
            },
        },
        {"prompt_tokens": 20, "completion_tokens": 1_290, "output_image_tokens": 1_290},
        "gemini-2.5-flash-image",
        "google",
        ("google", "default"),
    ),
]

# AWS: Converse (docs.aws.amazon.com/bedrock/latest/APIReference/API_runtime_TokenUsage)
# and InvokeModel's invocation metrics; input excludes the cached parts in both.
BEDROCK = [
    Case(
        "bedrock converse with cache TTLs",
        "bedrock-converse",
        {
            "output": {"message": {"role": "assistant", "content": [{"text": "hi"}]}},
            "stopReason": "end_turn",
            "usage": {
                "inputTokens": 100,
                "outputTokens": 50,
                "totalTokens": 2_650,
                "cacheReadInputTokens": 1_000,
                "cacheWriteInputTokens": 1_500,
                "cacheDetails": [{"ttl": "1h", "inputTokens": 1_500}],
            },
        },
        {
            "prompt_tokens": 2_600,
            "completion_tokens": 50,
            "cache_read_tokens": 1_000,
            "cache_write_tokens": 1_500,
            "cache_write_1h_tokens": 1_500,
        },
        "anthropic.claude-sonnet-4-5-20250929-v1:0",
        "aws",
        ("aws", "default"),
    ),
    Case(
        "bedrock invoke invocation metrics",
        "bedrock-invoke",
        {
            "amazon-bedrock-invocationMetrics": {
                "inputTokenCount": 300,
                "outputTokenCount": 40,
                "invocationLatency": 900,
                "firstByteLatency": 300,
                "cacheReadInputTokenCount": 100,
                "cacheWriteInputTokenCount": 0,
            }
        },
        {"prompt_tokens": 400, "completion_tokens": 40, "cache_read_tokens": 100},
        "anthropic.claude-3-haiku-20240307-v1:0",
        "aws",
    ),
]

OTHERS = [
    Case(
        "ollama chat",
        "ollama",
        {
            "model": "llama3.2",
            "done": True,
            "message": {"role": "assistant", "content": "hi"},
            "prompt_eval_count": 26,
            "eval_count": 290,
            "total_duration": 5_000_000_000,
        },
        {"prompt_tokens": 26, "completion_tokens": 290},
        "llama3.2",
    ),
    Case(
        # LiteLLM ModelResponse for an Anthropic model: prompt_tokens includes the
        # cached parts; cache_*_input_tokens are always present (0 when none).
        "litellm usage for anthropic with cache",
        "litellm",
        {
            "model": "claude-sonnet-4-5",
            "object": "chat.completion",
            "usage": {
                "prompt_tokens": 2_100,
                "completion_tokens": 80,
                "total_tokens": 2_180,
                "prompt_tokens_details": {"cached_tokens": 1_500, "audio_tokens": None},
                "completion_tokens_details": {"reasoning_tokens": 0},
                "cache_creation_input_tokens": 500,
                "cache_read_input_tokens": 1_500,
            },
        },
        {
            "prompt_tokens": 2_100,
            "completion_tokens": 80,
            "cache_read_tokens": 1_500,
            "cache_write_tokens": 500,
        },
        "claude-sonnet-4-5",
        "anthropic",
    ),
    Case(
        "litellm usage without cache (still carries cache_* = 0)",
        "litellm",
        {
            "model": "gpt-4o-mini",
            "usage": {
                "prompt_tokens": 900,
                "completion_tokens": 60,
                "total_tokens": 960,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        },
        {"prompt_tokens": 900, "completion_tokens": 60},
        "gpt-4o-mini",
        "openai",
    ),
    Case(
        "cohere v2 chat billed units",
        "cohere",
        {
            "id": "c1",
            "finish_reason": "COMPLETE",
            "usage": {
                "billed_units": {"input_tokens": 120, "output_tokens": 40},
                "tokens": {"input_tokens": 300, "output_tokens": 42},
            },
        },
        {"prompt_tokens": 120, "completion_tokens": 40},
        "command-r-plus",
        "cohere",
        ("cohere", "default"),
    ),
    Case(
        "xai chat: reasoning beside completion",
        "xai",
        {
            "model": "grok-4",
            "object": "chat.completion",
            "usage": {
                "prompt_tokens": 700,
                "completion_tokens": 100,
                "total_tokens": 1_400,
                "prompt_tokens_details": {"cached_tokens": 600},
                "completion_tokens_details": {"reasoning_tokens": 600},
            },
        },
        {
            "prompt_tokens": 700,
            "completion_tokens": 700,
            "cache_read_tokens": 600,
            "reasoning_tokens": 600,
        },
        "grok-4",
        "x-ai",
        ("x-ai", "chat"),
    ),
    Case(
        "perplexity sonar with citations and searches",
        "perplexity",
        {
            "model": "sonar-deep-research",
            "usage": {
                "prompt_tokens": 20,
                "completion_tokens": 3_000,
                "citation_tokens": 8_000,
                "reasoning_tokens": 20_000,
                "num_search_queries": 12,
                "total_tokens": 31_020,
            },
        },
        {
            "prompt_tokens": 20,
            "completion_tokens": 31_000,
            "reasoning_tokens": 20_000,
            "web_search_requests": 12,
        },
        "sonar-deep-research",
        "perplexity",
        ("perplexity", "default"),
    ),
]

CASES = [*OPENAI, *ANTHROPIC, *GOOGLE, *BEDROCK, *OTHERS]
