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

Wiring both is safe: a call is one entry in ``runs.CALLS`` whichever system starts it,
found by its span and its CallbackManager event id; the first end of either records it
for every tracker following it (see ``_Call``). Calls are paired by span, not by model:
an LLM call inside another's span is part of it (``CustomLLM``'s chat -> complete,
``as_structured_llm``'s wrapped LLM: one record, with the inner provider usage), while
interleaved streams and calls made during a stream are each their own. A call ends with
its end event, its exception, its span's drop (a failed non-streaming call, or batched
async embeddings, send nothing else), a refusal, or, for a stream handed out and never
read, its garbage collection (nothing billed, budget hold released; but
llama-index-llms-anthropic sent the request already: its input is billed). A stream
that fails while read keeps what was streamed, estimated. Inside
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

from pydantic import ConfigDict, Field

from usage_callbacks.attribution import Dimensions, check_given_dimensions, merge_dimensions
from usage_callbacks.budgets import BudgetExceededError
from usage_callbacks.integrations.llamaindex_reach import budget_reach
from usage_callbacks.integrations.llamaindex_spans import listen_to_span_ends, span_tree
from usage_callbacks.integrations.routing import session_trackers
from usage_callbacks.readers import BILLED_ONCE_STARTED, UsageSource, normalize_usage
from usage_callbacks.runs import CALLS, Call, RunState
from usage_callbacks.sessions import (
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


def _start_run(
    tracker: UsageTracker,
    call: Call,
    name: str,
    by: UsageCallbackHandler | UsageEventHandler,
    *,
    enforce: bool,
) -> None:
    """``tracker``'s state of ``call``, started by the handler ``by`` (its user, session,
    tags and dimensions); a budget's reservation when ``enforce``."""
    detail: _Call = call.detail
    user_id, session_id, tags = by.user_id, by.session_id, by.tags
    attribution = span_tree().attribution(detail.span_id, tracker.declared_dimensions)
    if by.dimensions:  # the handler's, overridden by the run's instrument tags
        attribution = attribution._replace(
            dimensions=merge_dimensions(by.dimensions, attribution.dimensions)
        )
    state = RunState(
        run_id=detail.event_id or name,
        started_at=utcnow(),
        framework="llamaindex",
        call_type=detail.call_type,
        model=_model_name(detail.payload),
        provider=_provider(detail.payload),
        parent_run_id=detail.parent_id,
        user_id=user_id,
        session_id=session_id,
        tags=list(tags),
        attribution=attribution,
        sessions=sessions_of(tracker),
        inputs=detail.inputs,
        extra={"usage_source": _raw_source(detail.class_name)},
    )
    state, is_new = tracker.runs.start(state)
    if not is_new:
        state.user_id = user_id or state.user_id
        state.session_id = session_id or state.session_id
        state.tags = list(dict.fromkeys([*state.tags, *tags]))
        state.attribution = attribution.merged(state.attribution)
    if not (enforce and tracker.has_budgets) or state.reservation is not None:
        return
    if detail.call_type == "embedding":
        # chunks are not in the start payload: an exhausted budget still refuses
        prompt, embedding = 0, 1
    else:
        prompt, embedding = _prompt_estimate(state), 0
    state.reservation = tracker.reserve(
        model=state.model,
        provider=state.provider,
        prompt_tokens=prompt,
        embedding_tokens=embedding,
        max_output_tokens=_max_tokens(detail.payload, detail.kwargs),
        user_id=state.user_id,
        session_id=state.session_id,
        sessions=state.sessions,
        attribution=state.attribution,
    )


def _finish_run(
    tracker: UsageTracker,
    state: RunState,
    call: _Call,
    *,
    response: Any = None,
    chunks: Sequence[str] | None = None,
    error: BaseException | None = None,
) -> None:
    model = _response_model(response) or state.model or UNKNOWN_MODEL
    usage: TokenUsage | None
    if state.call_type == "embedding":
        texts = [chunk for chunk in (chunks or []) if isinstance(chunk, str)]
        usage = build_usage(embedding=count_texts_tokens(texts, model), estimated=True)
    else:
        usage = _reported_usage(response, state) or call.nested_usage
        if usage is None and error is not None:
            usage = _failed_usage(state, call)
        elif usage is None:
            usage = _estimate(state, _response_text(response) or call.streamed_text)
    tracker.record_run(state, usage, model=model, error=error)


def _abandon_run(tracker: UsageTracker, state: RunState, call: _Call) -> None:
    """A stream handed out and garbage-collected unread: its state and budget hold end
    here. Nothing was billed, unless the LLM class sent the request as it handed the
    stream out and the provider bills a started stream (llama-index-llms-anthropic):
    then the input, estimated, recorded as a stream closed unread (``GeneratorExit``,
    as when one is closed half-read)."""
    if state.extra.get("usage_source") in BILLED_ONCE_STARTED:
        _finish_run(tracker, state, call, error=GeneratorExit())
    else:
        tracker.release(state.reservation)


def _estimate(state: RunState, text: str, prompt: int = 0) -> TokenUsage:
    """tiktoken over the prompt (unless the provider reported it) and ``text``."""
    completion = count_text_tokens(text, state.model)  # 0 for no text
    prompt = prompt or _prompt_estimate(state)
    return build_usage(prompt=prompt, completion=completion, estimated=True)


def _failed_usage(state: RunState, call: _Call) -> TokenUsage:
    """A failed call bills nothing, unless it was a stream that had started: then what
    was streamed, flagged estimated, with the input as the provider reported it where
    the LLM class passed that on before the end. A stream handed out has started for
    llama-index-llms-anthropic, which opens it (HTTP status checked) before handing out
    the generator: a failure while that is read comes after ``message_start``."""
    reported = _reported_usage(call.last, state)  # the failure came after the final usage
    if reported is not None:
        return reported
    text = call.streamed_text
    source = state.extra.get("usage_source", "openai")
    if not text and not (call.handed_out and source in BILLED_ONCE_STARTED):
        return TokenUsage()  # refused, or failed before anything came back
    return _estimate(state, text, prompt=_started_input(call.last, source))


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


# -------------------------------------------------------------------- the call


@dataclass
class _Inner:
    """An LLM call made inside another's span (``CustomLLM``'s chat -> complete,
    ``StructuredLLM``'s wrapped LLM): part of that call, found by its span and, once a
    CallbackManager handler saw its start, by that event id."""

    class_name: str
    event_id: str | None = None


@dataclass
class _Call:
    """What a start event said of a call (``runs.Call.detail``, shared by the trackers
    following it), and what happened to it since.

    One call is one entry in ``runs.CALLS``, found by the span it runs in (all that the
    instrumentation's end events name) and by the CallbackManager's event id: whichever
    event system starts it first makes the entry, the other joins it (the dispatcher's
    start event comes just before the CallbackManager's, in the same span), and the first
    end of either ends it for every tracker."""

    call_type: CallType
    payload: dict[str, Any]
    inputs: Any
    kwargs: dict[str, Any]
    span_id: str | None
    #: the CallbackManager's event id and parent, once one of its handlers saw the start
    event_id: str | None = None
    parent_id: str | None = None
    #: provider usage of the LLM calls made inside this one (StructuredLLM's wrapped LLM)
    nested_usage: TokenUsage | None = None
    #: a stream was handed out: a failure after this one came while it was read
    handed_out: bool = False
    #: what the stream handed out: its latest chunk and the text of its deltas
    #: (llama-index-llms-anthropic's chunks carry a text block's words only in ``delta``
    #: until the block ends)
    last: Any = None
    deltas: list[str] = field(default_factory=list)
    #: the LLM calls made inside this one, by their spans
    inner: dict[str, _Inner] = field(default_factory=dict)

    @property
    def class_name(self) -> str:
        return str(self.payload.get("class_name") or "")

    @property
    def streamed_text(self) -> str:
        return "".join(self.deltas) or _response_text(self.last)

    def remember(self, chunk: Any) -> None:
        self.last = chunk
        delta = getattr(chunk, "delta", None)
        if isinstance(delta, str) and delta:
            self.deltas.append(delta)

    def add_nested(self, response: Any, class_name: str) -> None:
        """Count the provider usage of a call made inside this one."""
        usage = _provider_usage(response, _raw_source(class_name))
        if usage is not None:
            self.nested_usage = usage if self.nested_usage is None else self.nested_usage + usage


def _own(span: str | None) -> Call | None:
    """The oldest call running in ``span`` itself (not one it is a part of)."""
    return next((call for call in CALLS.in_span(span) if call.detail.span_id == span), None)


def _part_of(span: str | None, trackers: Sequence[UsageTracker]) -> Call | None:
    """The call an LLM call in ``span`` is part of: registered already (by the other event
    system), or the call of the nearest span above, if it serves ``trackers``."""
    calls = CALLS.in_span(span)
    if calls:
        return calls[-1] if calls[-1].detail.span_id != span else None
    above = span_tree().enclosing(span, CALLS.spans())
    outer = next(iter(CALLS.in_span(above)), None)
    if outer is None or not all(tracker in outer.states for tracker in trackers):
        return None
    return outer


def _join_inner(outer: Call, span: str, class_name: str, event_id: str | None) -> None:
    inner = outer.detail.inner.setdefault(span, _Inner(class_name))
    if event_id is not None and inner.event_id is None:
        inner.event_id = event_id
    else:
        event_id = None  # named already
    CALLS.name(outer, event_id, None if span in outer.spans else span)


def _end_inner(outer: Call, span: str, response: Any = None) -> None:
    """A call made inside ``outer`` ended (or failed): its usage counts in ``outer``'s."""
    inner = outer.detail.inner.pop(span, None)
    if inner is not None:  # the first end of the two event systems; its names go with outer
        outer.detail.add_nested(response, inner.class_name)


def _end(
    call: Call,
    *,
    response: Any = None,
    chunks: Sequence[str] | None = None,
    error: BaseException | None = None,
) -> None:
    """The call ended, whichever event system said so first: record it for each tracker."""
    for tracker, state in CALLS.end(call).items():
        if isinstance(tracker, UsageTracker):
            _finish_run(tracker, state, call.detail, response=response, chunks=chunks, error=error)


def _end_in_span(
    span: str | None,
    *,
    response: Any = None,
    chunks: Sequence[str] | None = None,
    error: BaseException | None = None,
) -> None:
    """An instrumentation end event: the oldest call of ``span``, or a call inside one."""
    for call in CALLS.in_span(span):
        if call.detail.span_id == span:
            _end(call, response=response, chunks=chunks, error=error)
        elif span is not None:
            _end_inner(call, span, response)
        return


def _end_named(event_id: str, **outcome: Any) -> None:
    """A CallbackManager end event: its call, or a call inside one."""
    call = CALLS.named(event_id)
    if call is None:
        return
    detail: _Call = call.detail
    if detail.event_id == event_id:
        _end(call, **outcome)
        return
    inner = next((span for span, i in detail.inner.items() if i.event_id == event_id), None)
    if inner is not None:
        _end_inner(call, inner, outcome.get("response"))


class _SpanEnds:
    """Told of every span's end by the span tree: a failed non-streaming call gets no
    other end on the instrumentation side, a stream handed out may never be read."""

    def span_exited(self, span: str, result: Any) -> None:
        """A stream handed out ends unread when it is garbage-collected."""
        if isinstance(result, (Generator, AsyncGenerator)) and (call := _own(span)) is not None:
            call.detail.handed_out = True
            when_collected(result, _abandon, span)

    def span_failed(self, span: str, error: BaseException | None) -> None:
        for call in CALLS.in_span(span):
            if call.detail.span_id == span:
                _end(call, error=error)
            else:
                _end_inner(call, span)


def _abandon(span: str) -> None:
    """A stream handed out and garbage-collected unread (the calls inside it end with it)."""
    call = _own(span)
    if call is not None:
        for tracker, state in CALLS.end(call).items():
            if isinstance(tracker, UsageTracker):
                _abandon_run(tracker, state, call.detail)


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
        _watch_calls()

    def _trackers(self) -> tuple[UsageTracker, ...]:
        """The trackers a call starting here is recorded for."""
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
            trackers = self._trackers()
            call = _callback_call(event_type, payload or {}, event_id, parent_id, trackers)
            if call is None:
                return event_id
            for tracker in trackers:
                _start_run(tracker, call, event_id, self, enforce=True)
        except BudgetExceededError:
            CALLS.refuse(event_id)  # every tracker's hold for it, taken before this one
            raise
        except Exception as error:  # any failure on the way to the reservations
            logger.warning("usage tracking failed at an event start", exc_info=True)
            if any(tracker.has_budgets for tracker in trackers):
                try:
                    next(t for t in trackers if t.has_budgets).budget_check_failed(error)
                except BudgetExceededError:
                    CALLS.refuse(event_id)
                    raise
        return event_id

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
            error = payload.get(_P_EXCEPTION)
            _end_named(
                event_id,
                response=payload.get(_P_RESPONSE) or payload.get(_P_COMPLETION),
                chunks=payload.get(_P_CHUNKS),
                error=error if isinstance(error, BaseException) else None,
            )
        except Exception:  # never break the user's call from an end hook
            logger.warning("usage tracking failed at an event end", exc_info=True)


def _callback_call(
    event_type: CBEventType,
    payload: dict[str, Any],
    event_id: str,
    parent_id: str,
    trackers: tuple[UsageTracker, ...],
) -> Call | None:
    """The call a CallbackManager start event begins (None: part of another call, or
    no tracker to record it for). The instrumentation's start event, if a handler heard
    it, made it just before, in the same span: joined here and named by ``event_id``."""
    if not trackers:
        return None
    call = CALLS.named(event_id)  # another handler on this manager saw this start
    if call is not None:
        return call if call.detail.event_id == event_id else None
    serialized = payload.get(_P_SERIALIZED) or {}
    span = active_span_id.get()
    embedding = event_type == _EMBEDDING_EVENT
    outer = None if embedding else _part_of(span, trackers)
    if outer is not None and span is not None:
        _join_inner(outer, span, str(serialized.get("class_name")), event_id)
        return None
    call = next(reversed(CALLS.in_span(span)), None)  # the newest: made just before?
    if call is not None and call.detail.event_id is None and call.detail.span_id == span:
        call.detail.event_id, call.detail.parent_id = event_id, parent_id or None
        for state in call.states.values():  # the call's id is the CallbackManager's
            state.run_id, state.parent_run_id = event_id, call.detail.parent_id
        return call if CALLS.name(call, event_id) else None
    if embedding:
        call_type: CallType = "embedding"
        inputs: Any = None
    elif _P_MESSAGES in payload:
        call_type, inputs = "chat", payload.get(_P_MESSAGES)
    else:
        call_type, inputs = "completion", payload.get(_P_PROMPT)
    kwargs = payload.get(_P_ADDITIONAL_KWARGS) or {}
    detail = _Call(call_type, serialized, inputs, kwargs, span, event_id, parent_id or None)
    return CALLS.open(event_id, span, detail)


class _SessionCallbackHandler(UsageCallbackHandler):
    """Lives in Settings.callback_manager; serves the trackers of open sessions."""

    def __init__(self) -> None:
        BaseCallbackHandler.__init__(self, event_starts_to_ignore=[], event_ends_to_ignore=[])
        self.user_id = None
        self.session_id = None
        self.tags = []
        self.dimensions = ()

    def _trackers(self) -> tuple[UsageTracker, ...]:
        return session_trackers()


# -------------------------------------------------------------------- instrumentation


class UsageEventHandler(BaseEventHandler):
    """Root-dispatcher handler: records every LLM and embedding call; never refuses.
    Its calls end with the instrumentation's end events (``_CallEvents``), or with the
    CallbackManager's when one of its handlers follows the call too."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    tracker: UsageTracker | None = None
    user_id: str | None = None
    session_id: str | None = None
    tags: list[str] = Field(default_factory=list)
    #: declared dimensions given to every call (checked by instrument())
    dimensions: Dimensions = ()

    @classmethod
    def class_name(cls) -> str:
        return "UsageEventHandler"

    def model_post_init(self, context: Any) -> None:
        _watch_calls()  # calls are placed by the spans they run in, ended, streams watched

    def _trackers(self) -> tuple[UsageTracker, ...]:
        return (self.tracker,) if self.tracker is not None else ()

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        if isinstance(event, _START_EVENTS):
            try:
                self._start(event)
            except Exception:  # the dispatcher does not guard its handlers: an error would
                # break the user's call; nothing is refused here (enforce=False: budgets are
                # held by the CallbackManager enforcer), so a failure costs only this record
                logger.warning("usage tracking failed on %s", type(event).__name__, exc_info=True)

    def _start(self, event: BaseEvent) -> None:
        trackers = self._trackers()
        call = _instrumented_call(event, trackers) if trackers else None
        if call is None:
            return
        for tracker in trackers:
            _start_run(tracker, call, event.id_, self, enforce=False)


def _instrumented_call(event: BaseEvent, trackers: tuple[UsageTracker, ...]) -> Call | None:
    """The call an instrumentation start event begins (None: part of another call). Named
    by the start event's id (another event handler of the dispatcher joins it by that),
    found by its span."""
    call = CALLS.named(event.id_)
    if call is not None:
        return call
    span = event.span_id or ""  # outside any span: all such calls pair in order
    payload = dict(getattr(event, "model_dict", None) or {})
    if isinstance(event, EmbeddingStartEvent):
        call_type: CallType = "embedding"
        inputs: Any = None
    else:
        if (outer := _part_of(span, trackers)) is not None:
            _join_inner(outer, span, str(payload.get("class_name")), None)
            return None
        if isinstance(event, LLMChatStartEvent):
            call_type, inputs = "chat", event.messages
        else:
            call_type, inputs = "completion", getattr(event, "prompt", "")
    kwargs = dict(getattr(event, "additional_kwargs", None) or {})
    return CALLS.open(event.id_, span, _Call(call_type, payload, inputs, kwargs, span))


class _SessionEventHandler(UsageEventHandler):
    """On the root dispatcher while sessions exist; serves the trackers of open sessions."""

    def _trackers(self) -> tuple[UsageTracker, ...]:
        return session_trackers()


class _CallEvents(BaseEventHandler):
    """Ends the calls in flight at the instrumentation's end events, and keeps what their
    streams hand out, once for every handler of either kind."""

    @classmethod
    def class_name(cls) -> str:
        return "UsageCallbacksCallEvents"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        try:
            if isinstance(event, _CHUNK_EVENTS):
                if (call := _own(event.span_id or "")) is not None:
                    call.detail.remember(event.response)
            elif isinstance(event, _END_EVENTS):
                _end_in_span(event.span_id or "", response=event.response)
            elif isinstance(event, EmbeddingEndEvent):
                _end_in_span(event.span_id or "", chunks=event.chunks)
            elif isinstance(event, ExceptionEvent):
                _end_in_span(event.span_id or "", error=event.exception)
        except Exception:  # as in UsageEventHandler.handle: never break the user's call
            logger.warning("usage tracking failed on %s", type(event).__name__, exc_info=True)


_START_EVENTS = (LLMChatStartEvent, LLMCompletionStartEvent, EmbeddingStartEvent)
_CHUNK_EVENTS = (LLMChatInProgressEvent, LLMCompletionInProgressEvent)
_END_EVENTS = (LLMChatEndEvent, LLMCompletionEndEvent)

_wiring_lock = threading.Lock()
_call_events: _CallEvents | None = None
_watcher_lock = threading.Lock()  # its own: handlers are built under the wiring lock


def _watch_calls() -> None:
    global _call_events
    with _watcher_lock:
        if _call_events is None:
            _call_events = _CallEvents()
            get_dispatcher().add_event_handler(_call_events)
            listen_to_span_ends(_SpanEnds())
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
    _watch_calls()


@contextmanager
def _capture_in_session() -> Iterator[None]:
    _ensure_session_wiring()
    yield


register_session_hook(_capture_in_session)


__all__ = ["Instrumentation", "UsageCallbackHandler", "UsageEventHandler", "instrument"]
