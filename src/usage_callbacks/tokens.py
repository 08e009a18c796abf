"""tiktoken counting for text, chat messages and embedding inputs, working offline.

tiktoken downloads its encodings on first use. This library never does: the two
encodings it counts with (cl100k_base, o200k_base) ship inside the package
(``tiktoken_cache/``), so counting works in every install, with any extra or none.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import tiktoken
import tiktoken.model

#: The encodings shipped with the package, in tiktoken's cache layout.
_BUNDLED_CACHE = Path(__file__).parent / "tiktoken_cache"
#: tiktoken caches each encoding file under the SHA-1 of its download URL.
_CACHE_KEYS = {
    "cl100k_base": "9b5ad71b2ce5302211f9c61530b329a4922fc6a4",
    "o200k_base": "fb374d419588a4632f3f557e76b4b70aebbca790",
}
_FALLBACK_ENCODING = "cl100k_base"

#: The OpenAI cookbook's chat accounting: per-message framing and the reply primer.
_TOKENS_PER_MESSAGE = 3
_TOKENS_PER_NAME = 1
_REPLY_PRIMER_TOKENS = 3

_env_lock = threading.Lock()


class EncodingUnavailableError(RuntimeError):
    """No offline copy of a tiktoken encoding could be found."""


@cache
def get_encoding(name: str) -> tiktoken.Encoding:
    """The named encoding from the copy shipped with the package; never a download."""
    key = _CACHE_KEYS.get(name)
    if key is None or not (_BUNDLED_CACHE / key).exists():
        raise EncodingUnavailableError(
            f"tiktoken encoding {name!r} is not shipped with usage-callbacks (it has "
            f"{', '.join(_CACHE_KEYS)}); reinstall the package if those files are missing"
        )
    # tiktoken reads its cache location from the environment, at load time only
    with _env_lock:
        previous = os.environ.get("TIKTOKEN_CACHE_DIR")
        os.environ["TIKTOKEN_CACHE_DIR"] = str(_BUNDLED_CACHE)
        try:
            return tiktoken.get_encoding(name)
        finally:
            if previous is None:
                del os.environ["TIKTOKEN_CACHE_DIR"]
            else:
                os.environ["TIKTOKEN_CACHE_DIR"] = previous


@lru_cache(maxsize=1024)
def encoding_name_for_model(model: str | None) -> str:
    """o200k for gpt-4o/4.1/5/o-series, cl100k for older and unknown models."""
    if not model:
        return _FALLBACK_ENCODING
    bare = model.rsplit("/", 1)[-1].lower()
    try:
        name = tiktoken.model.encoding_name_for_model(bare)
    except KeyError:
        return _FALLBACK_ENCODING
    return name if name in _CACHE_KEYS else _FALLBACK_ENCODING


def encoding_for_model(model: str | None) -> tiktoken.Encoding:
    return get_encoding(encoding_name_for_model(model))


def count_text_tokens(text: str, model: str | None = None) -> int:
    """Tokens in ``text`` under ``model``'s encoding (special tokens counted as text)."""
    if not text:
        return 0
    return len(encoding_for_model(model).encode(text, disallowed_special=()))


def count_texts_tokens(texts: Iterable[str], model: str | None = None) -> int:
    """Tokens over many texts, as an embedding request of those chunks is billed."""
    encoding = encoding_for_model(model)
    # not encode_batch: it starts a thread pool per call, ~0.5 ms on the hot path
    return sum(len(encoding.encode(text, disallowed_special=())) for text in texts if text)


def message_text(content: Any) -> str:
    """The text of a message's content: a string, or a list of parts with text in them."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        text = content.get("text")
        return text if isinstance(text, str) else ""
    if isinstance(content, Sequence):
        return "".join(message_text(part) for part in content)
    text = getattr(content, "text", None)
    return text if isinstance(text, str) else ""


def _message_fields(message: Any) -> tuple[str, str, str | None]:
    """Role, text (with the tool calls it makes, as they are sent) and name of a message."""
    if isinstance(message, str):
        return "user", message, None
    if isinstance(message, Mapping):
        role, content, name = message.get("role"), message.get("content"), message.get("name")
        calls = message.get("tool_calls")
    else:
        # pydantic messages keep their fields in __dict__: asking getattr for a field a
        # model lacks goes through pydantic's __getattr__ and an exception (~3 µs)
        fields = getattr(message, "__dict__", None) or {}
        role = fields.get("role") or fields.get("type")
        if role is None:
            role = getattr(message, "role", None) or getattr(message, "type", None)
        content = getattr(message, "content", None)
        if content is None:
            content = getattr(message, "blocks", None)
        name = fields["name"] if "name" in fields else getattr(message, "name", None)
        calls = fields.get("tool_calls") or (fields.get("additional_kwargs") or {}).get(
            "tool_calls"
        )
        if not calls and isinstance(content, Sequence) and not isinstance(content, str):
            calls = [part for part in content if _field(part, "tool_name")]  # tool-call blocks
    text = message_text(content)
    if calls:
        text += "".join(_tool_call_text(call) for call in calls)
    return str(getattr(role, "value", role) or ""), text, name or None


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def _tool_call_text(call: Any) -> str:
    """A tool call as the request carries it: the function's name and JSON arguments
    (OpenAI ``function.arguments``, LangChain ``args``, LlamaIndex ``tool_kwargs``)."""
    function = _field(call, "function") or call
    name = _field(function, "name") or _field(call, "tool_name") or ""
    arguments = _field(function, "arguments")
    if arguments is None:
        arguments = _field(call, "args") or _field(call, "tool_kwargs") or {}
    return f"{name}{arguments if isinstance(arguments, str) else schema_text(arguments)}"


def schema_text(schema: Any) -> str:
    """A tool, function or response-format schema as compact JSON, the way requests send
    it; a pydantic model class as its JSON schema."""
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        schema = schema.model_json_schema()
    return json.dumps(schema, separators=(",", ":"), default=str, ensure_ascii=False)


def count_schema_tokens(schemas: Iterable[Any], model: str | None = None) -> int:
    """Tokens of the tool definitions and output schemas a request sends beside its
    messages (an estimate: providers render them in their own framing)."""
    encoding = encoding_for_model(model)
    return sum(
        _TOKENS_PER_MESSAGE + len(encoding.encode(schema_text(schema), disallowed_special=()))
        for schema in schemas
        if schema
    )


#: Token counts of prompt texts seen: (encoding, hash, length) -> tokens. A chat sends its
#: whole history again every turn, and encoding it again cost ~190 ns a token (3.1 ms
#: for a 40-message, 16,000-token conversation, against 0.08 ms from here). Keyed by
#: hash, so no prompt text is kept; emptied when full, so it never outgrows its bound.
_prompt_counts: dict[tuple[str, int, int], int] = {}
_PROMPT_COUNTS_BOUND = 4096


def _prompt_text_tokens(encoding: tiktoken.Encoding, text: str) -> int:
    key = (encoding.name, hash(text), len(text))
    count = _prompt_counts.get(key)
    if count is None:
        if len(_prompt_counts) >= _PROMPT_COUNTS_BOUND:
            _prompt_counts.clear()
        count = _prompt_counts[key] = len(encoding.encode(text, disallowed_special=()))
    return count


@lru_cache(maxsize=64)
def _role_tokens(encoding: tiktoken.Encoding, role: str) -> int:
    """Roles are a handful of words, encoded on every message: count each once."""
    return len(encoding.encode(role, disallowed_special=()))


def count_message_tokens(messages: Iterable[Any], model: str | None = None) -> int:
    """Prompt tokens of a chat request, framed the way OpenAI chat models bill them.

    Messages may be dicts (``role``/``content``/``name``) or objects with those
    attributes (``type`` is accepted for the role, as LangChain messages have it).
    """
    encoding = encoding_for_model(model)
    total = 0
    for message in messages:
        role, content, name = _message_fields(message)
        total += _TOKENS_PER_MESSAGE + _role_tokens(encoding, role)
        total += _prompt_text_tokens(encoding, content)
        if name:
            total += _TOKENS_PER_NAME + len(encoding.encode(name, disallowed_special=()))
    return total + _REPLY_PRIMER_TOKENS if total else 0
