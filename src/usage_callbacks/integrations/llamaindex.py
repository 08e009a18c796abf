"""LlamaIndex adapter: CallbackManager handler, instrumentation handler, session hook.

Two event systems, one count:
- ``UsageCallbackHandler`` (CallbackManager). The one that *enforces budgets*: a
  ``BudgetExceededError`` raised from ``on_event_start`` propagates out of the LLM or
  embedding call before the provider is reached. Add it with
  ``Settings.callback_manager.add_handler(handler)`` (reaches every component built from
  Settings, whenever it was built) or ``callback_manager=CallbackManager([handler])`` on a
  component. Assigning a *new* ``Settings.callback_manager`` later misses components
  built before, which keep the old manager.
- ``UsageEventHandler`` / ``instrument(tracker)`` (the root instrumentation dispatcher).
  Sees every LLM and embedding call wherever it was built, but the dispatcher swallows
  handler exceptions, so it records and never refuses.

Wiring both is safe: calls seen by a CallbackManager handler of the same tracker are
skipped by the event handler. Calls are paired by span, not by model: an LLM call inside
another's span is part of it (``CustomLLM``'s chat -> complete, ``as_structured_llm``'s
wrapped LLM: one record, with the inner provider usage), while interleaved streams and
calls made during a stream are each their own. A call ends with its end event, its
exception, its span's drop (a failed non-streaming call sends nothing else), or, for a
stream handed out and never read, its garbage collection (nothing billed, budget hold
released; but llama-index-llms-anthropic sent the request already: its input is billed).
A stream that fails while read keeps what was streamed, estimated. Inside
``with tracker.session(...)`` both are wired for you.

Attribution (workflow step, agent, run names, ``instrument_tags`` dimensions) comes from
the spans in flight: see ``llamaindex_spans``.

Usage comes from the provider first (``response.raw``, then ``additional_kwargs``). For
usage in OpenAI streams pass ``additional_kwargs={"stream_options": {"include_usage":
True}}`` to ``OpenAI(...)``; otherwise streamed calls are estimated with tiktoken.
Embedding calls report no usage: their chunks are counted with the embedding model's
encoding, and their size is not known before the call, so a budget refuses an embedding
call only once it is exhausted.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncGenerator, Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from usage_callbacks.collected import when_collected
from usage_callbacks.extras import missing_extra

try:
    from llama_index.core import Settings
    from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload
    from llama_index.core.callbacks.base_handler import BaseCallbackHandler
    from llama_index.core.instrumentation import get_dispatcher  # type: ignore[attr-defined]
    from llama_index.core.instrumentation.event_handlers import BaseEventHandler
    from llama_index.core.instrumentation.events import BaseEvent
    from llama_index.core.instrumentation.events.embedding import (
        EmbeddingEndEvent,
        EmbeddingStartEvent,
    )
    from llama_index.core.instrumentation.events.exception import ExceptionEvent
    from llama_index.core.instrumentation.events.llm import (
        LLMChatEndEvent,
        LLMChatInProgressEvent,
        LLMChatStartEvent,
        LLMCompletionEndEvent,
        LLMCompletionInProgressEvent,
        LLMCompletionStartEvent,
    )
    from llama_index.core.instrumentation.span import active_span_id
except ModuleNotFoundError as error:  # say which extra installs it
    raise missing_extra(error, "llamaindex") from error

from pydantic import ConfigDict, Field, PrivateAttr

from usage_callbacks.attribution import Dimensions, check_given_dimensions, merge_dimensions
from usage_callbacks.budgets import BudgetExceededError
from usage_callbacks.integrations.llamaindex_reach import budget_reach
from usage_callbacks.integrations.llamaindex_spans import listen_to_span_ends, span_tree
from usage_callbacks.integrations.routing import call_trackers, session_trackers
from usage_callbacks.readers import BILLED_ONCE_STARTED, UsageSource, normalize_usage
from usage_callbacks.runs import CALLS, RunState
from usage_callbacks.sessions import (
    active_sessions,
    register_session_hook,
    sessions_of,
)
from usage_callbacks.store.models import utcnow
from usage_callbacks.tokens import (
    count_message_tokens,
    count_text_tokens,
    count_texts_tokens,
    message_text,
)
from usage_callbacks.tracker import UsageTracker
from usage_callbacks.usage import CallType, TokenUsage, build_usage, with_estimated_prompt

logger = logging.getLogger("usage_callbacks")

UNKNOWN_MODEL = "unknown"
_PROVIDERS = (
    ("openai", "openai"),
    ("anthropic", "anthropic"),
    ("gemini", "google"),
    ("google", "google"),
    ("bedrock", "aws"),
    ("ollama", "ollama"),
    ("mistral", "mistral"),
    ("cohere", "cohere"),
)
#: What each LLM class puts in ``response.raw``, by a marker in its class name (first
#: match wins: the specific names before the families they belong to). OpenAI-like
#: classes (Groq, DeepSeek, OpenRouter, Mistral, ...) return OpenAI-shaped bodies.
_RAW_SOURCES: tuple[tuple[str, UsageSource], ...] = (
    ("litellm", "litellm"),
    ("anthropic", "anthropic"),
    ("bedrockconverse", "bedrock-converse"),
    ("bedrock", "bedrock-invoke"),
    ("gemini", "gemini"),
    ("googlegenai", "gemini"),
    ("vertex", "gemini"),
    ("ollama", "ollama"),
    ("cohere", "cohere"),
    ("xai", "xai"),
    ("grok", "xai"),
    ("perplexity", "perplexity"),
)

# Enum members bound once: ``CBEventType.LLM`` goes through ``EnumType.__getattr__``
# (~0.15 µs a lookup), a dozen times per call on the hot path.
_TRACKED_EVENTS = frozenset((CBEventType.LLM, CBEventType.EMBEDDING))
_EMBEDDING_EVENT = CBEventType.EMBEDDING
_P_SERIALIZED = EventPayload.SERIALIZED
_P_MESSAGES = EventPayload.MESSAGES
_P_PROMPT = EventPayload.PROMPT
_P_ADDITIONAL_KWARGS = EventPayload.ADDITIONAL_KWARGS
_P_EXCEPTION = EventPayload.EXCEPTION
_P_RESPONSE = EventPayload.RESPONSE
_P_COMPLETION = EventPayload.COMPLETION
_P_CHUNKS = EventPayload.CHUNKS


# -------------------------------------------------------------------- shared state


class _RecentSet:
    """A bounded set of recent keys (spans already counted by a CallbackManager handler)."""

    def __init__(self, size: int = 50_000) -> None:
        self._keys: OrderedDict[tuple[int, str], None] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def add(self, key: tuple[int, str]) -> None:
        with self._lock:
            keys = self._keys
            keys[key] = None
            if len(keys) > self._size:
                keys.popitem(last=False)  # one key in, at most one out

    def __contains__(self, key: tuple[int, str]) -> bool:
        with self._lock:
            return key in self._keys


_counted_spans = _RecentSet()


@dataclass
class _Streamed:
    """What a stream handed out so far: its latest chunk and the text of its deltas
    (llama-index-llms-anthropic's chunks carry a text block's words only in ``delta``
    until the block ends)."""

    last: Any = None
    deltas: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.deltas) or _response_text(self.last)


# What each open stream handed out, by span; taken when its call ends.
_streamed: OrderedDict[str, _Streamed] = OrderedDict()
_streamed_lock = threading.Lock()


def _is_stream(result: Any) -> bool:
    return isinstance(result, (Generator, AsyncGenerator))


def _remember_chunk(span_id: str | None, response: Any) -> None:
    if not span_id:
        return
    delta = getattr(response, "delta", None)
    with _streamed_lock:
        streamed = _streamed.get(span_id)
        if streamed is None:
            streamed = _streamed[span_id] = _Streamed()
            while len(_streamed) > 10_000:  # streams of calls no handler ended
                _streamed.popitem(last=False)
        streamed.last = response
        if isinstance(delta, str) and delta:
            streamed.deltas.append(delta)


def _take_streamed(span_id: str | None) -> _Streamed | None:
    """What the stream of ``span_id`` handed out; forgotten here (the call ended)."""
    if not span_id:
        return None
    with _streamed_lock:
        return _streamed.pop(span_id, None)


# -------------------------------------------------------------------- extraction


def _model_name(payload: dict[str, Any]) -> str | None:
    for key in ("model", "model_name"):
        value = payload.get(key)
        if isinstance(value, str) and value and value != UNKNOWN_MODEL:
            return value
    return None


def _provider(payload: dict[str, Any]) -> str | None:
    return _provider_of_class(str(payload.get("class_name") or ""))


@lru_cache(maxsize=256)
def _provider_of_class(class_name: str) -> str | None:
    """Cached: a process sees a handful of LLM classes, each on every call."""
    name = class_name.lower()
    for marker, provider in _PROVIDERS:
        if marker in name:
            return provider
    return None


@lru_cache(maxsize=256)
def _raw_source(class_name: str) -> UsageSource:
    """Cached like ``_provider_of_class``; OpenAI's whole-response reader by default.
    Class names as the integrations spell them: ``Bedrock_Converse_LLM``, ``GoogleGenAI``."""
    name = class_name.lower().replace("_", "")
    return next((source for marker, source in _RAW_SOURCES if marker in name), "openai")


def _max_tokens(payload: dict[str, Any] | None, kwargs: dict[str, Any] | None) -> int | None:
    for source in (kwargs or {}, payload or {}):
        for key in ("max_tokens", "max_completion_tokens", "num_output"):
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _response_text(response: Any) -> str:
    if response is None:
        return ""
    message = getattr(response, "message", None)
    if message is not None:
        return message_text(getattr(message, "content", None))
    text = getattr(response, "text", None)
    return text if isinstance(text, str) else ""


def _response_model(response: Any) -> str | None:
    raw = getattr(response, "raw", None)
    model = raw.get("model") if isinstance(raw, dict) else getattr(raw, "model", None)
    return model if isinstance(model, str) and model else None


def _reported_usage(response: Any, state: RunState) -> TokenUsage | None:
    """Provider numbers; a prompt the provider reported as 0 tokens is estimated."""
    usage = _provider_usage(response, state.extra.get("usage_source", "openai"))
    if usage is not None and not usage.prompt_tokens and usage.completion_tokens:
        usage = with_estimated_prompt(usage, _prompt_estimate(state), state.model)
    return usage


def _provider_usage(response: Any, source: UsageSource) -> TokenUsage | None:
    """Provider numbers: the raw response as its LLM class returns it, then the counts
    OpenAI-like classes copy into ``additional_kwargs`` (streams with usage)."""
    if response is None:
        return None
    raw = getattr(response, "raw", None)
    usage = normalize_usage(raw, source=source) if raw else None
    if usage is None and source == "openai":
        copied = getattr(response, "additional_kwargs", None)
        usage = normalize_usage(copied, source="openai-chat", whole=False) if copied else None
    return usage


def _prompt_estimate(state: RunState) -> int:
    inputs = state.inputs
    if state.call_type == "chat":
        return count_message_tokens(inputs or [], state.model)
    return count_texts_tokens([str(inputs or "")], state.model)


# -------------------------------------------------------------------- recording


@dataclass
class _Call:
    """What a start event said, for building the RunState of each tracker."""

    key: str
    call_type: CallType
    payload: dict[str, Any]
    model: str | None
    provider: str | None
    inputs: Any
    kwargs: dict[str, Any]
    parent_id: str | None
    span_id: str | None
    #: provider usage of the LLM calls made inside this one (StructuredLLM's wrapped LLM)
    nested_usage: TokenUsage | None = None
    #: a stream was handed out: a failure after this one came while it was read
    handed_out: bool = False

    @property
    def class_name(self) -> str:
        return str(self.payload.get("class_name") or "")

    def add_nested(self, response: Any, class_name: str) -> None:
        """Count the provider usage of a call made inside this one."""
        usage = _provider_usage(response, _raw_source(class_name))
        if usage is not None:
            self.nested_usage = usage if self.nested_usage is None else self.nested_usage + usage


def _start_run(
    tracker: UsageTracker,
    call: _Call,
    *,
    user_id: str | None,
    session_id: str | None,
    tags: Sequence[str],
    enforce: bool,
    dimensions: Dimensions = (),
) -> None:
    attribution = span_tree().attribution(call.span_id, tracker.declared_dimensions)
    if dimensions:  # the handler's, overridden by the run's instrument tags
        attribution = attribution._replace(
            dimensions=merge_dimensions(dimensions, attribution.dimensions)
        )
    state = RunState(
        run_id=call.key,
        started_at=utcnow(),
        framework="llamaindex",
        call_type=call.call_type,
        model=call.model,
        provider=call.provider,
        parent_run_id=call.parent_id,
        user_id=user_id,
        session_id=session_id,
        tags=list(tags),
        attribution=attribution,
        sessions=sessions_of(tracker),
        inputs=call.inputs,
        extra={"span_id": call.span_id, "usage_source": _raw_source(call.class_name)},
    )
    state, is_new = tracker.runs.start(state)
    if not is_new:
        state.user_id = user_id or state.user_id
        state.session_id = session_id or state.session_id
        state.tags = list(dict.fromkeys([*state.tags, *tags]))
        state.attribution = attribution.merged(state.attribution)
        return
    if not (enforce and tracker.has_budgets):
        return
    if call.call_type == "embedding":
        # chunks are not in the start payload: an exhausted budget still refuses
        prompt, embedding = 0, 1
    else:
        prompt, embedding = _prompt_estimate(state), 0
    state.reservation = tracker.reserve(
        model=state.model,
        provider=state.provider,
        prompt_tokens=prompt,
        embedding_tokens=embedding,
        max_output_tokens=_max_tokens(call.payload, call.kwargs),
        user_id=state.user_id,
        session_id=state.session_id,
        sessions=state.sessions,
        attribution=state.attribution,
    )


def _finish_run(
    tracker: UsageTracker,
    key: str,
    *,
    response: Any = None,
    chunks: Sequence[str] | None = None,
    error: BaseException | None = None,
    streamed: _Streamed | None = None,
    handed_out: bool = False,
    nested_usage: TokenUsage | None = None,
) -> None:
    state = tracker.runs.finish(key)
    if state is None:
        return
    model = _response_model(response) or state.model or UNKNOWN_MODEL
    usage: TokenUsage | None
    if state.call_type == "embedding":
        texts = [chunk for chunk in (chunks or []) if isinstance(chunk, str)]
        usage = build_usage(embedding=count_texts_tokens(texts, model), estimated=True)
    else:
        usage = _reported_usage(response, state) or nested_usage
        if usage is None and error is not None:
            usage = _failed_usage(state, streamed, handed_out)
        elif usage is None:
            text = _response_text(response) or (streamed.text if streamed else "")
            usage = _estimate(state, text)
    tracker.record_run(state, usage, model=model, error=error)


def _abandon_run(tracker: UsageTracker, key: str, *, counted: bool = False) -> None:
    """A stream handed out and garbage-collected unread: its state and budget hold end
    here. Nothing was billed, unless the LLM class sent the request as it handed the
    stream out and the provider bills a started stream (llama-index-llms-anthropic):
    then the input, estimated, recorded as a stream closed unread (``GeneratorExit``,
    as when one is closed half-read). ``counted``: a CallbackManager handler of the
    same tracker records this call."""
    state = tracker.runs.get(key)
    if not counted and state and state.extra.get("usage_source") in BILLED_ONCE_STARTED:
        _finish_run(tracker, key, error=GeneratorExit(), handed_out=True)
        return
    state = tracker.runs.finish(key)
    if state is not None:
        tracker.release(state.reservation)


def _estimate(state: RunState, text: str, prompt: int = 0) -> TokenUsage:
    """tiktoken over the prompt (unless the provider reported it) and ``text``."""
    completion = count_text_tokens(text, state.model)  # 0 for no text
    prompt = prompt or _prompt_estimate(state)
    return build_usage(prompt=prompt, completion=completion, estimated=True)


def _failed_usage(state: RunState, streamed: _Streamed | None, handed_out: bool) -> TokenUsage:
    """A failed call bills nothing, unless it was a stream that had started: then what
    was streamed, flagged estimated, with the input as the provider reported it where
    the LLM class passed that on before the end. A stream handed out has started for
    llama-index-llms-anthropic, which opens it (HTTP status checked) before handing out
    the generator: a failure while that is read comes after ``message_start``."""
    last = streamed.last if streamed is not None else None
    reported = _reported_usage(last, state)  # the failure came after the final usage
    if reported is not None:
        return reported
    text = streamed.text if streamed is not None else ""
    source = state.extra.get("usage_source", "openai")
    if not text and not (handed_out and source in BILLED_ONCE_STARTED):
        return TokenUsage()  # refused, or failed before anything came back
    return _estimate(state, text, prompt=_started_input(last, source))


def _started_input(chunk: Any, source: UsageSource) -> int:
    """The input a started stream reported before its end: llama-index-llms-anthropic
    copies ``message_start``'s usage into each chunk's ``additional_kwargs`` (without
    the cache counts, which it drops); 0 where not passed on."""
    if source != "anthropic" or chunk is None:
        return 0
    kwargs = getattr(getattr(chunk, "message", None), "additional_kwargs", None)
    usage = kwargs.get("usage") if isinstance(kwargs, dict) else None
    found = normalize_usage(usage, source="anthropic", whole=False) if usage else None
    return found.prompt_tokens if found is not None else 0


# -------------------------------------------------------------------- CallbackManager


class UsageCallbackHandler(BaseCallbackHandler):
    """CallbackManager handler: records LLM and embedding events; refuses over budget."""

    def __init__(
        self,
        tracker: UsageTracker,
        *,
        user_id: str | None = None,
        session_id: str | None = None,
        tags: Sequence[str] | None = None,
        dimensions: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(event_starts_to_ignore=[], event_ends_to_ignore=[])
        if not isinstance(tracker, UsageTracker):
            raise TypeError(f"UsageCallbackHandler needs a UsageTracker, not {tracker!r}")
        self.tracker = tracker
        self.user_id = user_id
        self.session_id = session_id
        self.tags = list(tags or [])
        #: given to every call this handler sees; instrument tags override them
        self.dimensions = check_given_dimensions(tracker.declared_dimensions, dimensions)
        self._init_state()
        _watch_streams()

    def _init_state(self) -> None:
        #: open calls by event id, and the event id of the open LLM call of each span
        self._opened: dict[str, _Call] = {}
        self._span_calls: dict[str, str] = {}
        #: LLM events inside another open call: event id -> (that call, own class name,
        #: own span)
        self._nested: dict[str, tuple[_Call, str, str | None]] = {}
        # re-entrant: a stream garbage-collected mid-update ends its call (_abandon)
        self._lock = threading.RLock()
        span_tree()  # nested calls are told by the spans they run in
        listen_to_span_ends(self)

    def _trackers(self, key: str, starting: bool) -> tuple[UsageTracker, ...]:
        return (self.tracker,)

    @property
    def raise_error(self) -> bool:
        """LangChain reads this of every handler it is given: this one is LlamaIndex's."""
        raise TypeError(
            "usage_callbacks.llamaindex.UsageCallbackHandler is the LlamaIndex handler; "
            "give LangChain usage_callbacks.langchain.UsageCallbackHandler(tracker) instead"
        )

    def start_trace(self, trace_id: str | None = None) -> None:
        return None

    def end_trace(
        self, trace_id: str | None = None, trace_map: dict[str, list[str]] | None = None
    ) -> None:
        return None

    def on_event_start(
        self,
        event_type: CBEventType,
        payload: dict[str, Any] | None = None,
        event_id: str = "",
        parent_id: str = "",
        **kwargs: Any,
    ) -> str:
        if event_type not in _TRACKED_EVENTS:
            return event_id
        trackers: tuple[UsageTracker, ...] = ()
        try:
            trackers = self._trackers(event_id, True)
            call = self._call(event_type, payload or {}, event_id, parent_id) if trackers else None
            if call is None:
                return event_id
            for tracker in trackers:
                if call.span_id:  # the event handler of this tracker must skip this span
                    _counted_spans.add((id(tracker), call.span_id))
                _start_run(
                    tracker,
                    call,
                    user_id=self.user_id,
                    session_id=self.session_id,
                    tags=self.tags,
                    enforce=True,
                    dimensions=self.dimensions,
                )
        except BudgetExceededError:
            self._refuse(event_id)
            raise
        except Exception as error:  # any failure on the way to the reservations
            logger.warning("usage tracking failed at an event start", exc_info=True)
            if any(tracker.has_budgets for tracker in trackers):
                try:
                    next(t for t in trackers if t.has_budgets).budget_check_failed(error)
                except BudgetExceededError:
                    self._refuse(event_id)
                    raise
        return event_id

    def _refuse(self, event_id: str) -> None:
        """The call will not be made: forget it and release what any tracker held for it."""
        CALLS.refuse(event_id)
        self._close(event_id)

    def _call(
        self, event_type: CBEventType, payload: dict[str, Any], event_id: str, parent_id: str
    ) -> _Call | None:
        serialized = payload.get(_P_SERIALIZED) or {}
        span_id = active_span_id.get()
        if event_type == _EMBEDDING_EVENT:
            call_type: CallType = "embedding"
            inputs: Any = None
        elif _P_MESSAGES in payload:
            call_type, inputs = "chat", payload.get(_P_MESSAGES)
        else:
            call_type, inputs = "completion", payload.get(_P_PROMPT)
        model = _model_name(serialized)
        if call_type != "embedding":
            with self._lock:
                outer = span_tree().enclosing(span_id, self._span_calls)
                if outer is not None:  # part of that call: chat -> complete, StructuredLLM
                    outer_call = self._opened[self._span_calls[outer]]
                    class_name = str(serialized.get("class_name"))
                    self._nested[event_id] = (outer_call, class_name, span_id)
                    return None
        call = _Call(
            key=event_id,
            call_type=call_type,
            payload=serialized,
            model=model,
            provider=_provider(serialized),
            inputs=inputs,
            kwargs=payload.get(_P_ADDITIONAL_KWARGS) or {},
            parent_id=parent_id or None,
            span_id=span_id,
        )
        with self._lock:
            self._opened[event_id] = call
            if span_id and call_type != "embedding":
                self._span_calls[span_id] = event_id
        return call

    def _close(self, event_id: str) -> _Call | None:
        """Forget an open call; None for unknown events."""
        with self._lock:
            call = self._opened.pop(event_id, None)
            span = call.span_id if call is not None else None
            if span and self._span_calls.get(span) == event_id:
                del self._span_calls[span]
        return call

    def span_exited(self, span: str, result: Any) -> None:
        """A stream handed out ends unread when it is garbage-collected."""
        if _is_stream(result) and (event_id := self._span_calls.get(span)) is not None:
            with self._lock:
                call = self._opened.get(event_id)
                if call is not None:
                    call.handed_out = True
            when_collected(result, self._abandon, event_id)

    def span_failed(self, span: str, error: BaseException | None) -> None:
        return None  # the CallbackManager sends the call's end, with the exception

    def _abandon(self, event_id: str) -> None:
        call = self._close(event_id)
        if call is None:
            return
        with self._lock:  # the calls inside it (CustomLLM's stream_complete) end with it
            for inner in [key for key, (outer, *_) in self._nested.items() if outer is call]:
                del self._nested[inner]
        for tracker in self._trackers(event_id, False):
            _abandon_run(tracker, event_id)

    def on_event_end(
        self,
        event_type: CBEventType,
        payload: dict[str, Any] | None = None,
        event_id: str = "",
        **kwargs: Any,
    ) -> None:
        if event_type not in _TRACKED_EVENTS:
            return
        try:
            payload = payload or {}
            response = payload.get(_P_RESPONSE) or payload.get(_P_COMPLETION)
            with self._lock:
                nested = self._nested.pop(event_id, None)
            if nested is not None:
                outer, class_name, span = nested
                outer.add_nested(response, class_name)
                _take_streamed(span)  # the inner call ended: forget what it streamed
                return
            call = self._close(event_id)
            if call is None:
                return
            error = payload.get(_P_EXCEPTION)
            streamed = _take_streamed(call.span_id)
            for tracker in self._trackers(event_id, False):
                _finish_run(
                    tracker,
                    event_id,
                    response=response,
                    chunks=payload.get(_P_CHUNKS),
                    error=error if isinstance(error, BaseException) else None,
                    streamed=streamed,
                    handed_out=call.handed_out,
                    nested_usage=call.nested_usage,
                )
        except Exception:  # never break the user's call from an end hook
            logger.warning("usage tracking failed at an event end", exc_info=True)


class _SessionCallbackHandler(UsageCallbackHandler):
    """Lives in Settings.callback_manager; serves the trackers of open sessions."""

    def __init__(self) -> None:
        BaseCallbackHandler.__init__(self, event_starts_to_ignore=[], event_ends_to_ignore=[])
        self.user_id = None
        self.session_id = None
        self.tags = []
        self.dimensions = ()
        self._init_state()

    def _trackers(self, key: str, starting: bool) -> tuple[UsageTracker, ...]:
        return session_trackers() if starting else call_trackers(key)


# -------------------------------------------------------------------- instrumentation


class UsageEventHandler(BaseEventHandler):
    """Root-dispatcher handler: records every LLM and embedding call; never refuses."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    tracker: UsageTracker | None = None
    user_id: str | None = None
    session_id: str | None = None
    tags: list[str] = Field(default_factory=list)
    #: declared dimensions given to every call (checked by instrument())
    dimensions: Dimensions = ()
    #: open calls by span: one LLM call, or the embedding batches sent at once
    _calls: dict[str, list[_Call]] = PrivateAttr(default_factory=dict)
    #: LLM spans inside another open call: span -> (that call, own class name)
    _nested: dict[str, tuple[_Call, str]] = PrivateAttr(default_factory=dict)
    #: re-entrant: a stream garbage-collected mid-update ends its call (_abandon)
    _lock: threading.RLock = PrivateAttr(default_factory=threading.RLock)

    @classmethod
    def class_name(cls) -> str:
        return "UsageEventHandler"

    def model_post_init(self, context: Any) -> None:
        # Each event reads these tables several times, and a pydantic private attribute is
        # read through BaseModel.__getattr__ (~2 µs): the same objects, never reassigned,
        # also sit in the instance dict, where a read is a plain lookup.
        for name in ("_calls", "_nested", "_lock"):
            object.__setattr__(self, name, getattr(self, name))
        _watch_streams()  # calls are placed by the spans they run in, streams watched
        listen_to_span_ends(self)

    def _trackers(self, key: str, starting: bool) -> tuple[UsageTracker, ...]:
        return (self.tracker,) if self.tracker is not None else ()

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        try:
            self._handle(event)
        except Exception:
            logger.warning("usage tracking failed on %s", type(event).__name__, exc_info=True)

    def _handle(self, event: BaseEvent) -> None:
        span = event.span_id or ""
        if isinstance(event, (LLMChatStartEvent, LLMCompletionStartEvent, EmbeddingStartEvent)):
            self._start(event, span)
        elif isinstance(event, (LLMChatEndEvent, LLMCompletionEndEvent)):
            self._end(span, response=event.response, streamed=_take_streamed(span))
        elif isinstance(event, EmbeddingEndEvent):
            self._end(span, chunks=event.chunks)
        elif isinstance(event, ExceptionEvent):
            self._end(span, error=event.exception, streamed=_take_streamed(span))

    def _start(self, event: BaseEvent, span: str) -> None:
        payload = dict(getattr(event, "model_dict", None) or {})
        if isinstance(event, EmbeddingStartEvent):
            call_type: CallType = "embedding"
            inputs: Any = None
        elif isinstance(event, LLMChatStartEvent):
            call_type, inputs = "chat", event.messages
        else:
            call_type, inputs = "completion", getattr(event, "prompt", "")
        if call_type != "embedding":
            with self._lock:
                outer = span_tree().enclosing(span, self._calls)
                if outer is not None:  # part of that call: chat -> complete, StructuredLLM
                    self._nested[span] = (self._calls[outer][0], str(payload.get("class_name")))
                    return
        key = event.id_  # the start event's uuid: one per call, even within one span
        call = _Call(
            key=key,
            call_type=call_type,
            payload=payload,
            model=_model_name(payload),
            provider=_provider(payload),
            inputs=inputs,
            kwargs=dict(getattr(event, "additional_kwargs", None) or {}),
            parent_id=None,
            span_id=span,
        )
        trackers = self._trackers(key, True)
        with self._lock:
            self._calls.setdefault(span, []).append(call)
        for tracker in trackers:
            _start_run(
                tracker,
                call,
                user_id=self.user_id,
                session_id=self.session_id,
                tags=self.tags,
                enforce=False,
                dimensions=self.dimensions,
            )

    def _end(
        self,
        span: str,
        *,
        response: Any = None,
        chunks: Sequence[str] | None = None,
        error: BaseException | None = None,
        streamed: _Streamed | None = None,
    ) -> None:
        with self._lock:
            nested = self._nested.pop(span, None)
            call = None if nested else self._pop_call(span)
        if nested is not None:
            outer, class_name = nested
            outer.add_nested(response, class_name)
        elif call is not None:
            self._finish(call, response=response, chunks=chunks, error=error, streamed=streamed)

    def _pop_call(self, span: str) -> _Call | None:
        """The oldest open call of ``span`` (caller holds the lock)."""
        calls = self._calls.get(span)
        if not calls:
            return None
        call = calls.pop(0)
        if not calls:
            del self._calls[span]
        return call

    def _finish(
        self,
        call: _Call,
        *,
        response: Any = None,
        chunks: Sequence[str] | None = None,
        error: BaseException | None = None,
        streamed: _Streamed | None = None,
    ) -> None:
        for tracker in self._trackers(call.key, False):
            if (id(tracker), call.span_id or "") in _counted_spans:
                tracker.runs.finish(call.key)  # a CallbackManager handler counted it
                continue
            _finish_run(
                tracker,
                call.key,
                response=response,
                chunks=chunks,
                error=error,
                streamed=streamed,
                handed_out=call.handed_out,
                nested_usage=call.nested_usage,
            )

    def span_failed(self, span: str, error: BaseException | None) -> None:
        """A failed non-streaming call: LlamaIndex sends no end event, only the drop."""
        with self._lock:
            self._nested.pop(span, None)
            calls = self._calls.pop(span, [])
        for call in calls:
            self._finish(call, error=error, streamed=_take_streamed(span))

    def span_exited(self, span: str, result: Any) -> None:
        """A stream handed out ends unread when it is garbage-collected."""
        if _is_stream(result) and (span in self._calls or span in self._nested):
            with self._lock:
                for call in self._calls.get(span, ()):
                    call.handed_out = True
            when_collected(result, self._abandon, span)

    def _abandon(self, span: str) -> None:
        with self._lock:
            self._nested.pop(span, None)
            calls = self._calls.pop(span, [])
        for call in calls:
            for tracker in self._trackers(call.key, False):
                counted = (id(tracker), call.span_id or "") in _counted_spans
                _abandon_run(tracker, call.key, counted=counted)


class _SessionEventHandler(UsageEventHandler):
    """On the root dispatcher while sessions exist; serves the trackers of open sessions."""

    def _trackers(self, key: str, starting: bool) -> tuple[UsageTracker, ...]:
        return session_trackers() if starting else call_trackers(key)

    def _start(self, event: BaseEvent, span: str) -> None:
        if active_sessions():
            super()._start(event, span)


class _StreamWatcher(BaseEventHandler):
    """Keeps what each stream handed out, per span, for both kinds of handler."""

    @classmethod
    def class_name(cls) -> str:
        return "UsageCallbacksStreamWatcher"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        if isinstance(event, (LLMChatInProgressEvent, LLMCompletionInProgressEvent)):
            try:
                _remember_chunk(event.span_id, event.response)
            except Exception:
                logger.warning("usage tracking failed on a streamed chunk", exc_info=True)


_wiring_lock = threading.Lock()
_stream_watcher: _StreamWatcher | None = None
_watcher_lock = threading.Lock()  # its own: handlers are built under the wiring lock


def _watch_streams() -> None:
    global _stream_watcher
    with _watcher_lock:
        if _stream_watcher is None:
            _stream_watcher = _StreamWatcher()
            get_dispatcher().add_event_handler(_stream_watcher)
    span_tree()


# -------------------------------------------------------------------- wiring


@dataclass
class Instrumentation:
    """Returned by ``instrument``: ``detach()`` removes the handler again."""

    handler: UsageEventHandler
    #: put on each LLM's and embedding model's own manager as its call starts: it refuses
    enforcer: UsageCallbackHandler

    def detach(self) -> None:
        with _wiring_lock:
            root = get_dispatcher()
            root.event_handlers = [h for h in root.event_handlers if h is not self.handler]
            _instrumented.pop(id(self.handler.tracker), None)
        budget_reach().remove(self.enforcer)


_instrumented: dict[int, Instrumentation] = {}


def instrument(
    tracker: UsageTracker,
    *,
    user_id: str | None = None,
    session_id: str | None = None,
    tags: Sequence[str] | None = None,
    dimensions: dict[str, Any] | None = None,
) -> Instrumentation:
    """Attach a UsageEventHandler for ``tracker`` to the root dispatcher, once."""
    given = check_given_dimensions(tracker.declared_dimensions, dimensions)
    # built outside the wiring lock, which its constructor takes
    enforcer = UsageCallbackHandler(
        tracker, user_id=user_id, session_id=session_id, tags=tags, dimensions=dimensions
    )
    with _wiring_lock:
        existing = _instrumented.get(id(tracker))
        if existing is not None:
            return existing
        handler = UsageEventHandler(
            tracker=tracker,
            user_id=user_id,
            session_id=session_id,
            tags=list(tags or []),
            dimensions=given,
        )
        get_dispatcher().add_event_handler(handler)
        budget_reach().add(enforcer)
        handle = Instrumentation(handler, enforcer)
        _instrumented[id(tracker)] = handle
        return handle


_session_callback_handler = _SessionCallbackHandler()
_session_event_handler = _SessionEventHandler()


def _ensure_session_wiring() -> None:
    """Put the session handlers where every call passes, whatever was built when."""
    managers = [Settings.callback_manager]
    # Settings' own LLM and embedding model keep the manager they were resolved with,
    # which is not Settings.callback_manager when that did not exist yet.
    for component in (getattr(Settings, "_llm", None), getattr(Settings, "_embed_model", None)):
        manager = getattr(component, "callback_manager", None)
        if isinstance(manager, CallbackManager):
            managers.append(manager)
    for manager in managers:
        if _session_callback_handler not in manager.handlers:
            manager.add_handler(_session_callback_handler)
    with _wiring_lock:
        root = get_dispatcher()
        if _session_event_handler not in root.event_handlers:
            root.add_event_handler(_session_event_handler)
    budget_reach().add(_session_callback_handler)  # components with managers of their own
    _watch_streams()


@contextmanager
def _capture_in_session() -> Iterator[None]:
    _ensure_session_wiring()
    yield


register_session_hook(_capture_in_session)


__all__ = ["Instrumentation", "UsageCallbackHandler", "UsageEventHandler", "instrument"]
