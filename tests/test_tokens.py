"""tiktoken counting: encodings per model, chat framing, and no network ever."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from llama_index.core.llms import ChatMessage

from usage_callbacks import count_message_tokens, count_text_tokens
from usage_callbacks.tokens import encoding_name_for_model, get_encoding


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("gpt-4.1", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("openai/gpt-4o", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("claude-sonnet-4-5", "cl100k_base"),
        (None, "cl100k_base"),
    ],
)
def test_encoding_per_model(model: str | None, encoding: str) -> None:
    assert encoding_name_for_model(model) == encoding


def test_text_counts_match_tiktoken() -> None:
    text = "Tokens <|endoftext|> are counted as text, naïvely or not. 12345"
    for model, name in (("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base")):
        expected = len(get_encoding(name).encode(text, disallowed_special=()))
        assert count_text_tokens(text, model) == expected
    assert count_text_tokens("", "gpt-4o") == 0


def test_chat_framing_follows_the_openai_cookbook() -> None:
    encoding = get_encoding("o200k_base")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there", "name": "alice"},
    ]
    by_hand = 3  # reply primer
    for message in messages:
        by_hand += (
            3 + len(encoding.encode(message["role"])) + len(encoding.encode(message["content"]))
        )
        if "name" in message:
            by_hand += 1 + len(encoding.encode(message["name"]))
    assert count_message_tokens(messages, "gpt-4o") == by_hand
    assert count_message_tokens([], "gpt-4o") == 0


def test_framework_messages_and_content_parts() -> None:
    as_dicts = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    langchain = [SystemMessage("Be brief."), HumanMessage("Hi")]
    llama = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Hi"),
    ]
    parts = [
        {
            "role": "system",
            "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
        },
        {"role": "user", "content": "Hi"},
    ]
    expected = count_message_tokens(as_dicts, "gpt-4o")
    assert count_message_tokens(parts, "gpt-4o") == expected
    assert count_message_tokens(llama, "gpt-4o") == expected
    # LangChain's roles are "system"/"human": same framing, the role word differs
    assert abs(count_message_tokens(langchain, "gpt-4o") - expected) <= 2
    assert count_message_tokens([AIMessage("")], "gpt-4o") > 0


OFFLINE = """
import socket, sys
def no_network(*args, **kwargs):
    raise OSError("network is off in this test")
socket.socket.connect = no_network
socket.create_connection = no_network
sys.modules["llama_index"] = None  # a langchain-only install: no llama-index copies either
from usage_callbacks import count_text_tokens
print(count_text_tokens("hello world", "gpt-4o"), count_text_tokens("hello world", "gpt-4"))
"""


def test_encodings_ship_with_the_package_no_network_no_llama_index(tmp_path: Path) -> None:
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache")}
    result = subprocess.run(
        [sys.executable, "-c", OFFLINE], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "2"]
    assert not (tmp_path / "empty-cache").exists()  # nothing written to the user's cache


def test_the_callers_tiktoken_cache_setting_is_left_as_it_was(tmp_path: Path) -> None:
    own = str(tmp_path / "mine")
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": own}
    code = OFFLINE + "import os; print(os.environ['TIKTOKEN_CACHE_DIR'])\n"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == own


def test_tool_calls_and_their_arguments_are_part_of_the_prompt() -> None:
    from langchain_core.messages import ToolMessage

    query = "weather in Reykjavik next week, hourly, with wind and air quality " * 5
    plain = count_message_tokens([AIMessage("")], "gpt-4o")
    with_call = count_message_tokens(
        [AIMessage("", tool_calls=[{"name": "search", "args": {"query": query}, "id": "1"}])],
        "gpt-4o",
    )
    as_openai = count_message_tokens(
        [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "1",
                        "type": "function",
                        "function": {"name": "search", "arguments": json.dumps({"query": query})},
                    }
                ],
            }
        ],
        "gpt-4o",
    )
    query_tokens = count_text_tokens(query, "gpt-4o")
    assert with_call - plain >= query_tokens
    assert abs(as_openai - with_call) <= 3
    result = count_message_tokens([ToolMessage(query, tool_call_id="1")], "gpt-4o")
    assert result >= query_tokens


def test_a_history_sent_again_is_counted_from_memory_within_a_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A chat resends its history every turn: each text is encoded once, the counts are
    tiktoken's, and the memory of them stays within its bound (it holds no text)."""
    from usage_callbacks import tokens

    monkeypatch.setattr(tokens, "_prompt_counts", {})
    monkeypatch.setattr(tokens, "_PROMPT_COUNTS_BOUND", 8)
    encoding = get_encoding("o200k_base")
    history = [HumanMessage(f"turn {i}: " + "word " * (50 + i)) for i in range(6)]
    first = count_message_tokens(history, "gpt-4o")
    encoded: list[str] = []
    real_encode = encoding.encode
    monkeypatch.setattr(
        encoding, "encode", lambda text, **kw: encoded.append(text) or real_encode(text, **kw)
    )
    turn = [*history, HumanMessage("and one more question")]
    expected = sum(3 + 1 + len(real_encode(str(m.content))) for m in turn) + 3
    assert count_message_tokens(turn, "gpt-4o") == expected == first + 3 + 1 + 4
    assert encoded == ["and one more question"]  # the history came from memory
    for i in range(20):
        count_message_tokens([HumanMessage(f"question {i}")], "gpt-4o")
    assert len(tokens._prompt_counts) <= 8
    assert all(isinstance(key, tuple) and "question" not in key for key in tokens._prompt_counts)
