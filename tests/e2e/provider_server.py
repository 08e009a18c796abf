"""A loopback HTTP server speaking the OpenAI, Anthropic and Ollama wire formats, and billing.

Real SDK clients (langchain-openai, langchain-anthropic, langchain-ollama,
llama-index-llms-openai, -anthropic and -ollama, llama-index-embeddings-openai) talk to it
as to the providers. Every response carries deterministic usage, and ``server.billed``
keeps what was billed per request, so tests compare what usage-callbacks recorded with
what the "provider" charged, token for token.

Billing rules (deterministic, non-trivial), reported as the current APIs report them:
- chat prompt = 11 + characters of all message text, tool schemas and tool-call
  arguments // 4; ``cached`` of it were cache reads (OpenAI
  ``prompt_tokens_details.cached_tokens``; Anthropic ``cache_read_input_tokens``) and
  ``cache_write`` were cache writes (Anthropic only; ``cache_write_1h`` of them for an
  hour, reported split under ``cache_creation``);
- completion = the words of the reply + ``reasoning`` (OpenAI reasoning tokens); a
  queued tool call (OpenAI, not streamed) is answered instead of the reply and bills
  1 + the characters of its arguments // 4;
- OpenAI echoes a requested ``service_tier`` (flex, priority) and bills at it; the
  Responses API (``/responses``) bills like chat, in its own usage shape;
- Anthropic's ``message_delta`` usage is cumulative; ``web_searches`` server-side
  searches are reported under ``server_tool_use`` (and streamed as ``server_tool_use``
  blocks with their results before the reply); ``web_search_errors`` more searches
  failed (their result is an error) and bill nothing;
- ``stream_error_after``: the next Anthropic stream sends an ``error`` event
  (``overloaded_error``, as Anthropic's streaming docs show) after ``message_start`` and
  that many words; the started message bills its whole input and the words sent;
- Ollama's ``/api/chat`` reports ``prompt_eval_count`` and ``eval_count`` in its last
  object (streamed as NDJSON unless ``stream`` is false);
- embeddings: the number of token ids sent, or tiktoken's count of the texts sent.
"""

from __future__ import annotations

import base64
import json
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from usage_callbacks.tokens import count_text_tokens

REPLY = "Paris is the capital of France, on the Seine."


@dataclass
class Bill:
    endpoint: str
    model: str
    prompt: int = 0
    completion: int = 0
    cached: int = 0
    cache_write: int = 0
    cache_write_1h: int = 0
    reasoning: int = 0
    embedding: int = 0
    web_searches: int = 0
    service_tier: str | None = None


@dataclass
class ProviderServer:
    """Start with ``start()``; ``base_url`` is ``http://127.0.0.1:PORT``."""

    cached: int = 0
    cache_write: int = 0
    cache_write_1h: int = 0
    reasoning: int = 0
    web_searches: int = 0
    web_search_errors: int = 0
    reply: str = REPLY
    #: (function name, arguments) to answer the next OpenAI chat requests with, in order
    tool_calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    billed: list[Bill] = field(default_factory=list)
    requests: int = 0
    #: HTTP statuses to answer the next requests with, in order (a refusal bills nothing)
    failures: list[int] = field(default_factory=list)
    #: the next Anthropic stream fails after message_start and this many words
    stream_error_after: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _httpd: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ProviderServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                with server._lock:
                    server.requests += 1
                    failure = server.failures.pop(0) if server.failures else None
                if failure is not None:
                    _refuse(self, failure)
                    return
                route = self.path.split("?")[0].rstrip("/")
                if route.endswith("/chat/completions"):
                    server._openai_chat(self, body)
                elif route.endswith("/responses"):
                    server._openai_responses(self, body)
                elif route.endswith("/embeddings"):
                    server._openai_embeddings(self, body)
                elif route.endswith("/messages"):
                    server._anthropic(self, body)
                elif route == "/api/chat":
                    server._ollama_chat(self, body)
                elif route == "/api/show":  # model details, asked for the context window
                    _json(self, {"model_info": {"llama.context_length": 131072}})
                else:
                    self.send_error(404)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def reset(self) -> None:
        with self._lock:
            self.billed.clear()
            self.tool_calls.clear()
            self.requests = 0
            self.failures.clear()
            self.stream_error_after = None

    # ------------------------------------------------------------------ billing

    def _bill(self, bill: Bill) -> Bill:
        with self._lock:
            self.billed.append(bill)
        return bill

    def _prompt(self, body: dict[str, Any]) -> int:
        messages = body.get("messages") or []
        if isinstance(body.get("input"), str):  # the Responses API
            messages = [{"content": body["input"]}]
        elif isinstance(body.get("input"), list):
            messages = body["input"]
        texts = [_text(m.get("content")) for m in messages]
        texts += [
            call["function"]["arguments"] for m in messages for call in m.get("tool_calls") or ()
        ]
        texts += [_text(body.get("system")), _text(body.get("instructions"))]
        if body.get("tools"):
            texts.append(json.dumps(body["tools"], sort_keys=True))
        return 11 + sum(len(text) for text in texts) // 4

    def _completion_words(self) -> list[str]:
        words = self.reply.split(" ")
        return [word if i == 0 else " " + word for i, word in enumerate(words)]

    def _tier(self, body: dict[str, Any]) -> str | None:
        tier = body.get("service_tier")
        return tier if tier in ("flex", "priority") else None

    # ------------------------------------------------------------------ OpenAI

    def _openai_chat(self, handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        with self._lock:
            tool_call = self.tool_calls.pop(0) if self.tool_calls else None
        if tool_call is not None and not body.get("stream"):
            self._openai_tool_call(handler, body, *tool_call)
            return
        prompt = self._prompt(body)
        words = self._completion_words()
        bill = self._bill(
            Bill(
                endpoint="openai.chat",
                model=body["model"],
                prompt=prompt,
                completion=len(words) + self.reasoning,
                cached=min(self.cached, prompt),
                reasoning=self.reasoning,
                service_tier=self._tier(body),
            )
        )
        usage = {
            "prompt_tokens": bill.prompt,
            "completion_tokens": bill.completion,
            "total_tokens": bill.prompt + bill.completion,
            "prompt_tokens_details": {"cached_tokens": bill.cached, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": bill.reasoning, "audio_tokens": 0},
        }
        base = {"id": "chatcmpl-test", "created": int(time.time()), "model": body["model"]}
        if bill.service_tier:
            base["service_tier"] = bill.service_tier
        if not body.get("stream"):
            _json(
                handler,
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": self.reply},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                },
            )
            return

        def events() -> Iterator[dict[str, Any]]:
            chunk = {**base, "object": "chat.completion.chunk"}
            yield {
                **chunk,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
            }
            for word in words:
                yield {**chunk, "choices": [{"index": 0, "delta": {"content": word}}]}
            yield {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            if (body.get("stream_options") or {}).get("include_usage"):
                yield {**chunk, "choices": [], "usage": usage}

        _sse(handler, ((None, event) for event in events()), done=True)

    def _openai_tool_call(
        self, handler: BaseHTTPRequestHandler, body: dict[str, Any], name: str, arguments: Any
    ) -> None:
        encoded = json.dumps(arguments)
        bill = self._bill(
            Bill(
                endpoint="openai.chat",
                model=body["model"],
                prompt=self._prompt(body),
                completion=1 + len(encoded) // 4,
            )
        )
        call = {"id": f"call_{len(self.billed)}", "type": "function"}
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [{**call, "function": {"name": name, "arguments": encoded}}],
        }
        _json(
            handler,
            {
                "id": "chatcmpl-tool",
                "created": int(time.time()),
                "model": body["model"],
                "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
                "usage": {
                    "prompt_tokens": bill.prompt,
                    "completion_tokens": bill.completion,
                    "total_tokens": bill.prompt + bill.completion,
                },
            },
        )

    def _openai_responses(self, handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        prompt = self._prompt(body)
        words = self._completion_words()
        bill = self._bill(
            Bill(
                endpoint="openai.responses",
                model=body["model"],
                prompt=prompt,
                completion=len(words) + self.reasoning,
                cached=min(self.cached, prompt),
                reasoning=self.reasoning,
                service_tier=self._tier(body),
            )
        )
        text = {"type": "output_text", "text": self.reply, "annotations": [], "logprobs": []}
        item = {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [text],
        }
        response = {
            "id": "resp_test",
            "object": "response",
            "created_at": int(time.time()),
            "model": body["model"],
            "status": "completed",
            "output": [item],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "service_tier": bill.service_tier or "default",
            "usage": {
                "input_tokens": bill.prompt,
                "input_tokens_details": {"cached_tokens": bill.cached},
                "output_tokens": bill.completion,
                "output_tokens_details": {"reasoning_tokens": bill.reasoning},
                "total_tokens": bill.prompt + bill.completion,
            },
        }
        if not body.get("stream"):
            _json(handler, response)
            return

        def events() -> Iterator[tuple[str | None, dict[str, Any]]]:
            started = {**response, "status": "in_progress", "output": [], "usage": None}
            yield "response.created", {"type": "response.created", "response": started}
            yield (
                "response.output_item.added",
                {
                    "type": "response.output_item.added",
                    "output_index": 0,
                    "item": {**item, "status": "in_progress", "content": []},
                },
            )
            part = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
            yield (
                "response.content_part.added",
                {"type": "response.content_part.added", **part, "part": {**text, "text": ""}},
            )
            for word in words:
                yield (
                    "response.output_text.delta",
                    {"type": "response.output_text.delta", **part, "delta": word, "logprobs": []},
                )
            yield (
                "response.output_text.done",
                {"type": "response.output_text.done", **part, "text": self.reply, "logprobs": []},
            )
            yield (
                "response.content_part.done",
                {"type": "response.content_part.done", **part, "part": text},
            )
            yield (
                "response.output_item.done",
                {"type": "response.output_item.done", "output_index": 0, "item": item},
            )
            yield "response.completed", {"type": "response.completed", "response": response}

        _sse(
            handler,
            ((name, {**event, "sequence_number": n}) for n, (name, event) in enumerate(events())),
            done=False,
        )

    def _openai_embeddings(self, handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        tokens = sum(
            len(item) if isinstance(item, list) else count_text_tokens(item, body["model"])
            for item in inputs
        )
        self._bill(Bill(endpoint="openai.embeddings", model=body["model"], embedding=tokens))
        vector = [0.1, 0.2, 0.3, 0.4]
        encoded: Any = vector
        if body.get("encoding_format") == "base64":
            encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        _json(
            handler,
            {
                "object": "list",
                "model": body["model"],
                "data": [
                    {"object": "embedding", "index": i, "embedding": encoded}
                    for i in range(len(inputs))
                ],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )

    # ------------------------------------------------------------------ Anthropic

    def _anthropic(self, handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        prompt = self._prompt(body)
        cached = min(self.cached, prompt)
        cache_write = min(self.cache_write, prompt - cached)
        words = self._completion_words()
        write_1h = min(self.cache_write_1h, cache_write)
        bill = self._bill(
            Bill(
                endpoint="anthropic.messages",
                model=body["model"],
                prompt=prompt,
                completion=len(words),
                cached=cached,
                cache_write=cache_write,
                cache_write_1h=write_1h,
                web_searches=self.web_searches,
            )
        )
        usage = {
            "input_tokens": prompt - cached - cache_write,  # Anthropic leaves the cache out
            "output_tokens": bill.completion,
            "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": cache_write,
            "cache_creation": {
                "ephemeral_5m_input_tokens": cache_write - write_1h,
                "ephemeral_1h_input_tokens": write_1h,
            },
            "server_tool_use": {"web_search_requests": self.web_searches, "web_fetch_requests": 0},
            "service_tier": "standard",
        }
        message = {
            "id": "msg_test",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "stop_reason": "end_turn",
            "stop_sequence": None,
        }
        searches = _web_search_blocks(self.web_searches, self.web_search_errors)
        if not body.get("stream"):
            content = [*searches, {"type": "text", "text": self.reply}]
            _json(handler, {**message, "content": content, "usage": usage})
            return
        with self._lock:
            error_after, self.stream_error_after = self.stream_error_after, None
        if error_after is not None:  # the words sent before the error are billed
            bill.completion = min(error_after, len(words))
            words = words[:error_after]

        def events() -> Iterator[tuple[str, dict[str, Any]]]:
            start_usage = {**usage, "output_tokens": 1}
            yield (
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        **message,
                        "content": [],
                        "stop_reason": None,
                        "usage": start_usage,
                    },
                },
            )
            for index, block in enumerate(searches):
                yield from _anthropic_block(index, block)
            text_index = len(searches)
            yield (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": text_index,
                    "content_block": {"type": "text", "text": ""},
                },
            )
            for word in words:
                yield (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": text_index,
                        "delta": {"type": "text_delta", "text": word},
                    },
                )
            if error_after is not None:
                yield (
                    "error",
                    {
                        "type": "error",
                        "error": {"type": "overloaded_error", "message": "Overloaded"},
                    },
                )
                return
            yield "content_block_stop", {"type": "content_block_stop", "index": text_index}
            yield (
                "message_delta",
                {  # Anthropic's message_delta usage is cumulative
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": usage,
                },
            )
            yield "message_stop", {"type": "message_stop"}

        _sse(handler, events(), done=False)

    # ------------------------------------------------------------------ Ollama

    def _ollama_chat(self, handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        """``/api/chat``: the counts come with the last (``done``) object only, the prompt
        in full whether or not Ollama's cache held it (ollama#5371)."""
        words = self._completion_words()
        bill = self._bill(
            Bill("ollama.chat", body["model"], prompt=self._prompt(body), completion=len(words))
        )
        done = {
            "model": body["model"],
            "created_at": "2026-12-02T10:00:00Z",
            "done": True,
            "done_reason": "stop",
            "total_duration": 5_191_566_416,
            "load_duration": 2_154_458,
            "prompt_eval_count": bill.prompt,
            "prompt_eval_duration": 383_809_000,
            "eval_count": bill.completion,
            "eval_duration": 4_799_921_000,
        }
        if body.get("stream", True):  # Ollama streams unless told not to
            _ndjson(
                handler,
                iter(
                    [
                        *(
                            {
                                "model": body["model"],
                                "created_at": "2026-12-02T10:00:00Z",
                                "message": {"role": "assistant", "content": word},
                                "done": False,
                            }
                            for word in words
                        ),
                        {**done, "message": {"role": "assistant", "content": ""}},
                    ]
                ),
            )
        else:
            _json(handler, {**done, "message": {"role": "assistant", "content": self.reply}})


def _ndjson(handler: BaseHTTPRequestHandler, lines: Iterator[dict[str, Any]]) -> None:
    """Ollama's stream: one JSON object per line."""
    handler.send_response(200)
    handler.send_header("content-type", "application/x-ndjson")
    handler.end_headers()
    for line in lines:
        handler.wfile.write(json.dumps(line).encode() + b"\n")
        handler.wfile.flush()
    handler.close_connection = True


def _web_search_blocks(searches: int, errors: int) -> list[dict[str, Any]]:
    """A ``server_tool_use`` block and its result for each search, as Anthropic returns
    them; the failed ones' results are errors."""
    blocks: list[dict[str, Any]] = []
    for n in range(searches + errors):
        blocks.append(
            {
                "type": "server_tool_use",
                "id": f"srvtoolu_{n}",
                "name": "web_search",
                "input": {"query": f"capital of France {n}"},
            }
        )
        result: Any = [
            {
                "type": "web_search_result",
                "title": "Paris",
                "url": "https://example.com",
                "encrypted_content": "e",
                "page_age": None,
            }
        ]
        if n >= searches:
            result = {"type": "web_search_tool_result_error", "error_code": "max_uses_exceeded"}
        blocks.append(
            {"type": "web_search_tool_result", "tool_use_id": f"srvtoolu_{n}", "content": result}
        )
    return blocks


def _anthropic_block(index: int, block: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """A non-text block streamed: its start (a tool use's input follows as JSON deltas)."""
    start = {**block, "input": {}} if block["type"] == "server_tool_use" else block
    yield (
        "content_block_start",
        {"type": "content_block_start", "index": index, "content_block": start},
    )
    if block["type"] == "server_tool_use":
        delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        yield (
            "content_block_delta",
            {"type": "content_block_delta", "index": index, "delta": delta},
        )
    yield "content_block_stop", {"type": "content_block_stop", "index": index}


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_text(part.get("text")) for part in content if isinstance(part, dict))
    return ""


def _refuse(handler: BaseHTTPRequestHandler, status: int) -> None:
    """An error the way OpenAI and Anthropic send one (no retry-after wait)."""
    body = json.dumps(
        {"error": {"type": "server_error", "message": f"status {status}", "code": None}}
    ).encode()
    handler.send_response(status)
    handler.send_header("content-type", "application/json")
    handler.send_header("retry-after-ms", "1")
    handler.send_header("content-length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _json(handler: BaseHTTPRequestHandler, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode()
    handler.send_response(200)
    handler.send_header("content-type", "application/json")
    handler.send_header("content-length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _sse(
    handler: BaseHTTPRequestHandler,
    events: Iterator[tuple[str | None, dict[str, Any]]],
    *,
    done: bool,
) -> None:
    handler.send_response(200)
    handler.send_header("content-type", "text/event-stream")
    handler.send_header("cache-control", "no-cache")
    handler.end_headers()
    for name, payload in events:
        prefix = f"event: {name}\n" if name else ""
        handler.wfile.write(f"{prefix}data: {json.dumps(payload)}\n\n".encode())
        handler.wfile.flush()
    if done:
        handler.wfile.write(b"data: [DONE]\n\n")
    handler.wfile.flush()
    handler.close_connection = True
