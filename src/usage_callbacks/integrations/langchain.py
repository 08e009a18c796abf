"""LangChain adapter: a callback handler, an embeddings wrapper and the session hook.

Pass ``UsageCallbackHandler(tracker)`` as ``callbacks=[handler]`` at model construction
or in ``config={"callbacks": [...]}``. It runs inline (``run_inline``), also for async
runs, so events keep their order and context; ``raise_error`` is set so that a
``BudgetExceededError`` raised in a start hook stops the call before the provider is
reached. Every other failure inside the handler is logged and swallowed.

Notes for users:
- ``ChatOpenAI`` with a custom ``base_url`` sends no usage in streams unless
  ``stream_usage=True``; without it streamed calls are estimated (``estimated=True``).
- LangChain's ``Embeddings`` fire no callbacks: wrap them in ``TrackedEmbeddings``.
- Calls inside ``with tracker.session(...)`` are tracked with no handler passed, through
  a configure hook registered once per process. A plain ``ThreadPoolExecutor`` does not
  carry the session into its workers: submit ``session.bind(fn)`` instead.
- Attribution: the LangGraph node (``langgraph_node``), thread (``thread_id``) and the
  declared dimensions come from the run metadata; the agent is ``lc_agent_name`` or the
  nearest graph compiled with a name (``create_react_agent(..., name="researcher")``);
  the run names come from the chain and tool runs this handler saw start, so a handler
  given only to the model (not in ``config``) records no run names.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Sequence
from contextvars import ContextVar
from types import FrameType
from typing import Any
from uuid import UUID

from usage_callbacks.extras import missing_extra

try:
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.callbacks.manager import AsyncCallbackManager
    from langchain_core.embeddings import Embeddings
    from langchain_core.messages import AIMessage, BaseMessage
    from langchain_core.outputs import LLMResult
    from langchain_core.tracers.context import register_configure_hook
except ModuleNotFoundError as error:  # say which extra installs it
    raise missing_extra(error, "langchain") from error

from usage_callbacks.attribution import (
    NO_ATTRIBUTION,
    Attribution,
    check_given_dimensions,
    declared_dimensions,
    merge_dimensions,
)
from usage_callbacks.budgets import BudgetExceededError
from usage_callbacks.integrations.routing import call_trackers, session_trackers
from usage_callbacks.readers import (
    BILLED_ONCE_STARTED,
    UsageSource,
    normalize_usage,
    usage_from_langchain,
)
from usage_callbacks.runs import CALLS, RunState
from usage_callbacks.sessions import register_session_hook, sessions_of
from usage_callbacks.store.models import utcnow
from usage_callbacks.tokens import (
    count_message_tokens,
    count_schema_tokens,
    count_texts_tokens,
    message_text,
)
from usage_callbacks.tracker import UsageTracker
from usage_callbacks.usage import (
    MAX_TOKENS_PER_CALL,
    CallType,
    TokenUsage,
    build_usage,
    with_estimated_prompt,
)

logger = logging.getLogger("usage_callbacks")

UNKNOWN_MODEL = "unknown"
_MAX_TOKEN_PARAMS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "num_predict")
_MODEL_PARAMS = ("model", "model_name", "model_id", "deployment_name")
#: The name LangGraph gives a graph compiled without one.
_DEFAULT_GRAPH_NAME = "LangGraph"
#: LangChain's names for unnamed compositions (RunnableSequence, RunnableLambda, ...).
_UNNAMED_PREFIX = "Runnable"
#: Metadata keys that attribute a call on their own (dimensions are checked apart).
_ATTRIBUTION_KEYS = frozenset(("langgraph_node", "lc_agent_name", "thread_id"))


#: The async callback manager's start methods (langchain_core callbacks/manager.py) make
#: one coroutine per handler and prompt, then await them in turn: a refusal raised from
#: one leaves the later ones never awaited ("coroutine 'ahandle_event' was never awaited").
_ASYNC_STARTS = frozenset(
    {
        AsyncCallbackManager.on_chat_model_start.__code__,
        AsyncCallbackManager.on_llm_start.__code__,
    }
)


def _close_skipped_callbacks() -> None:
    """A refusal ends an async run at its start: close the coroutines LangChain made for the
    other handlers (and prompts) and will now never await, so none warns when collected.
    They are in the manager's frame under the names its source gives them; a sync run has
    no such frame, and made nothing ahead."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code not in _ASYNC_STARTS:
        frame = frame.f_back
    if frame is None:
        return
    for name in ("inline_tasks", "non_inline_tasks"):
        for task in frame.f_locals.get(name, ()):
            if inspect.iscoroutine(task) and inspect.getcoroutinestate(task) == "CORO_CREATED":
                task.close()


class _ParentRun:
    """A chain or tool run above model calls: its name and parent, until it ends."""

    __slots__ = ("is_graph", "name", "parent")

    def __init__(self, name: str | None, parent: UUID | None) -> None:
        self.name = name
        self.parent = parent
        #: a LangGraph graph: its node runs start under it
        self.is_graph = False


class _RunTree:
    """The chain and tool runs in flight, so a model call can name what it runs in.

    One entry per run, from its start event to its end or error event. Keyed by the
    UUIDs themselves: str() of each cost ~1 µs of every chain event.
    """

    def __init__(self) -> None:
        self._runs: dict[UUID, _ParentRun] = {}

    def start(
        self, run_id: UUID, parent_run_id: UUID | None, name: Any, metadata: dict[str, Any] | None
    ) -> None:
        text = name if isinstance(name, str) and name else None
        self._runs[run_id] = _ParentRun(text, parent_run_id)
        node = metadata.get("langgraph_node") if metadata else None
        if node is not None and node == text and parent_run_id is not None:
            graph = self._runs.get(parent_run_id)  # a node's task runs right under its graph
            if graph is not None:
                graph.is_graph = True

    def end(self, run_id: UUID) -> None:
        self._runs.pop(run_id, None)

    def __len__(self) -> int:
        return len(self._runs)

    def names(self, parent_run_id: UUID | None) -> tuple[str | None, str | None, str | None]:
        """(nearest named run, root run name, nearest named graph) above a model call."""
        nearest = root = graph = None
        key = parent_run_id
        runs = self._runs
        while key is not None:
            run = runs.get(key)
            if run is None:
                break
            name = run.name
            if name is not None:
                root = name
                if nearest is None and not name.startswith(_UNNAMED_PREFIX):
                    nearest = name
                if graph is None and run.is_graph and name != _DEFAULT_GRAPH_NAME:
                    graph = name
            key = run.parent
        return nearest, root, graph


class UsageCallbackHandler(BaseCallbackHandler):
    """Records every LLM and chat-model run it sees into ``tracker``."""

    raise_error = True  # BudgetExceededError from a start hook must stop the call
    run_inline = True  # async runs call us inline: ordering and context preserved

    def __init__(
        self,
        tracker: UsageTracker,
        *,
        user_id: str | None = None,
        session_id: str | None = None,
        tags: Sequence[str] | None = None,
        dimensions: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(tracker, UsageTracker):
            raise TypeError(f"UsageCallbackHandler needs a UsageTracker, not {tracker!r}")
        self.tracker = tracker
        self.user_id = user_id
        self.session_id = session_id
        self.tags = list(tags or [])
        #: given to every call this handler sees; run metadata overrides them
        self.dimensions = check_given_dimensions(tracker.declared_dimensions, dimensions)
        self._tree = _RunTree()

    # ---------------------------------------------------------------- routing

    def _start_trackers(self, run_id: str) -> tuple[UsageTracker, ...]:
        return (self.tracker,)

    def _end_trackers(self, run_id: str) -> tuple[UsageTracker, ...]:
        return (self.tracker,)

    # ---------------------------------------------------------------- run tree

    def on_chain_start(
        self,
        serialized: dict[str, Any] | None,
        inputs: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._tree.start(run_id, parent_run_id, kwargs.get("name"), metadata)

    def on_tool_start(
        self,
        serialized: dict[str, Any] | None,
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # a tool's run name is only set when the caller gave one; its own name is in
        # the serialized {"name", "description"} LangChain passes
        name = kwargs.get("name") or (serialized or {}).get("name")
        self._tree.start(run_id, parent_run_id, name, metadata)

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._tree.end(run_id)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._tree.end(run_id)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._tree.end(run_id)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._tree.end(run_id)

    def _attribution(
        self, tracker: UsageTracker, parent_run_id: UUID | None, metadata: dict[str, Any]
    ) -> Attribution:
        """Where the call runs: LangGraph metadata, the run tree, declared dimensions."""
        run_name, root_run_name, graph = self._tree.names(parent_run_id)
        if (
            root_run_name is None
            and not self.dimensions
            and _ATTRIBUTION_KEYS.isdisjoint(metadata)
            and tracker.declared_dimensions.isdisjoint(metadata)
        ):
            return NO_ATTRIBUTION  # a model called on its own: nothing to build
        return Attribution(
            node=_text(metadata.get("langgraph_node")),
            agent=_text(metadata.get("lc_agent_name")) or graph,
            thread_id=_text(metadata.get("thread_id")),
            run_name=run_name,
            root_run_name=root_run_name,
            dimensions=merge_dimensions(
                self.dimensions, declared_dimensions(tracker.declared_dimensions, metadata)
            ),
        )

    # ---------------------------------------------------------------- start

    def on_chat_model_start(
        self,
        serialized: dict[str, Any] | None,
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        flat = [message for batch in messages for message in batch]
        self._start("chat", flat, serialized, run_id, parent_run_id, tags, metadata, kwargs)

    def on_llm_start(
        self,
        serialized: dict[str, Any] | None,
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._start(
            "completion", prompts, serialized, run_id, parent_run_id, tags, metadata, kwargs
        )

    def _start(
        self,
        call_type: CallType,
        inputs: list[Any],
        serialized: dict[str, Any] | None,
        run_id: UUID,
        parent_run_id: UUID | None,
        tags: list[str] | None,
        metadata: dict[str, Any] | None,
        kwargs: dict[str, Any],
    ) -> None:
        key = str(run_id)
        for tracker in self._start_trackers(key):
            try:
                try:
                    self._start_one(
                        tracker, call_type, inputs, serialized, key, parent_run_id, metadata, kwargs
                    )
                except BudgetExceededError:
                    raise
                except Exception as error:  # any failure on the way to the reservation
                    if not tracker.has_budgets:
                        logger.warning(
                            "usage tracking failed at the start of run %s", key, exc_info=True
                        )
                        continue
                    logger.warning("could not reserve run %s", key, exc_info=True)
                    tracker.budget_check_failed(error)  # raises unless fail-open
            except BudgetExceededError:
                CALLS.refuse(key)  # every tracker's hold for it, taken before this one
                _close_skipped_callbacks()
                raise

    def _start_one(
        self,
        tracker: UsageTracker,
        call_type: CallType,
        inputs: list[Any],
        serialized: dict[str, Any] | None,
        run_id: str,
        parent_run_id: UUID | None,
        metadata: dict[str, Any] | None,
        kwargs: dict[str, Any],
    ) -> None:
        params = kwargs.get("invocation_params") or {}
        meta = metadata or {}
        state = RunState(
            run_id=run_id,
            started_at=utcnow(),
            framework="langchain",
            call_type=call_type,
            model=_model_name(params, meta, serialized),
            provider=_provider(params, meta),
            parent_run_id=None if parent_run_id is None else str(parent_run_id),
            user_id=self.user_id,
            session_id=self.session_id,
            tags=list(self.tags),
            attribution=self._attribution(tracker, parent_run_id, meta),
            sessions=sessions_of(tracker),
            inputs=inputs,
            extra={"schemas": _request_schemas(params, meta)},
            started_by=self,
        )
        state, is_new = tracker.runs.start(state)
        if not is_new:  # a session's handler got here first: explicit settings win
            state.user_id = self.user_id or state.user_id
            state.session_id = self.session_id or state.session_id
            state.tags = list(dict.fromkeys([*state.tags, *self.tags]))
            state.attribution = self._attribution(tracker, parent_run_id, meta).merged(
                state.attribution
            )
            return
        if tracker.has_budgets:
            state.prompt_estimate = _estimate_prompt(state)
            state.reservation = tracker.reserve(
                model=state.model,
                provider=state.provider,
                prompt_tokens=state.prompt_estimate.prompt_tokens,
                max_output_tokens=_max_tokens(params),
                user_id=state.user_id,
                session_id=state.session_id,
                sessions=state.sessions,
                attribution=state.attribution,
            )

    # ---------------------------------------------------------------- stream

    def on_llm_new_token(
        self, token: str | list[str | dict[str, Any]], *, run_id: UUID, **kwargs: Any
    ) -> None:
        try:
            for tracker in self._end_trackers(str(run_id)):
                state = tracker.runs.get(str(run_id))
                if state is not None and state.started_by is self and isinstance(token, str):
                    state.streamed.append(token)
        except Exception:
            logger.warning("usage tracking failed on a streamed token", exc_info=True)

    # ---------------------------------------------------------------- end

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(str(run_id), response, None)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(str(run_id), kwargs.get("response"), error)

    def _end(self, run_id: str, response: LLMResult | None, error: BaseException | None) -> None:
        for tracker in self._end_trackers(run_id):
            try:
                state = tracker.runs.finish(run_id)
                if state is not None:
                    _record(tracker, state, response, error)
            except Exception:  # end hooks never raise: later handlers must see the event
                logger.warning("usage tracking failed at the end of run %s", run_id, exc_info=True)


class _SessionHandler(UsageCallbackHandler):
    """Injected by the configure hook while sessions are open; serves their trackers."""

    def __init__(self) -> None:
        BaseCallbackHandler.__init__(self)
        self.user_id = None
        self.session_id = None
        self.tags = []
        self.dimensions = ()
        self._tree = _RunTree()

    def _start_trackers(self, run_id: str) -> tuple[UsageTracker, ...]:
        return session_trackers()

    def _end_trackers(self, run_id: str) -> tuple[UsageTracker, ...]:
        return call_trackers(run_id)


_session_handler = _SessionHandler()
_session_var: ContextVar[UsageCallbackHandler | None] = ContextVar(
    "usage_callbacks_langchain_session", default=None
)
# One hook per process, whatever the number of sessions (langchain #32300 leaks one per use).
register_configure_hook(_session_var, inheritable=True)


class _CaptureInSession:
    """Entered with each session: LangChain calls made inside get the session handler.

    A class, not a generator: a session never exited is garbage-collected, and closing a
    generator then would reset the variable under sessions entered after it.
    """

    def __enter__(self) -> None:
        self._token = _session_var.set(_session_handler)

    def __exit__(self, *exc_info: object) -> None:
        _session_var.reset(self._token)


register_session_hook(_CaptureInSession)


# -------------------------------------------------------------------- extraction


def _model_name(
    params: dict[str, Any], metadata: dict[str, Any], serialized: dict[str, Any] | None
) -> str | None:
    """The requested model: invocation params, then LangSmith metadata, then the
    serialized constructor arguments."""
    found = _first_string(params, _MODEL_PARAMS) or _first_string(metadata, ("ls_model_name",))
    if found is None and serialized:
        found = _first_string(serialized.get("kwargs") or {}, _MODEL_PARAMS)
    return found


def _text(value: Any) -> str | None:
    """A metadata value as text; None when absent or empty."""
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else str(value)


def _first_string(source: dict[str, Any], keys: Sequence[str]) -> str | None:
    for key in keys:
        value = source.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _provider(params: dict[str, Any], metadata: dict[str, Any]) -> str | None:
    provider = metadata.get("ls_provider")
    if isinstance(provider, str) and provider:
        return provider
    kind = params.get("_type")
    if isinstance(kind, str) and kind:
        return kind.split("-")[0]
    return None


def _max_tokens(params: dict[str, Any]) -> int | None:
    """The request's output limit; one beyond any real call is held at the per-call
    maximum (still more than any budget), not refused as a bad count."""
    for key in _MAX_TOKEN_PARAMS:
        value = params.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return min(value, MAX_TOKENS_PER_CALL)
    return None


def _request_schemas(params: dict[str, Any], metadata: dict[str, Any]) -> list[Any]:
    """What a request sends beside its messages: tool and function definitions
    (``bind_tools``) and the structured-output schema (``with_structured_output``)."""
    schemas = [*(params.get("tools") or ()), *(params.get("functions") or ())]
    response_format = params.get("response_format")
    if response_format is None and not schemas:  # structured output by its metadata alone
        structured = metadata.get("ls_structured_output_format")
        response_format = structured.get("schema") if isinstance(structured, dict) else None
    if response_format is not None:
        schemas.append(response_format)
    return schemas


def _estimate_prompt(state: RunState) -> TokenUsage:
    """The prompt as sent: messages (with their tool calls) and the request's schemas."""
    inputs = state.inputs or []
    if state.call_type == "chat":
        tokens = count_message_tokens(inputs, state.model)
    else:
        tokens = count_texts_tokens([str(prompt) for prompt in inputs], state.model)
    tokens += count_schema_tokens(state.extra.get("schemas") or (), state.model)
    return build_usage(prompt=tokens, estimated=True)


def _generations(response: LLMResult | None) -> list[Any]:
    if response is None:
        return []
    batches = response.generations
    if len(batches) == 1:  # the usual single prompt: no flattening
        return batches[0]
    return [generation for batch in batches for generation in batch]


def _response_model(response: LLMResult | None, generations: list[Any]) -> str | None:
    for generation in generations:
        message = getattr(generation, "message", None)
        metadata = getattr(message, "response_metadata", None) or {}
        for key in ("model_name", "model", "model_id"):
            if isinstance(metadata.get(key), str) and metadata[key]:
                return str(metadata[key])
    llm_output = (response.llm_output if response else None) or {}
    value = llm_output.get("model_name") or llm_output.get("model")
    return value if isinstance(value, str) and value else None


def _usage_metadata(generation: Any) -> dict[str, Any] | None:
    """The ``usage_metadata`` of a chat generation's AIMessage, if it has one."""
    message = getattr(generation, "message", None)
    if not isinstance(message, AIMessage):
        return None
    usage: Any = message.usage_metadata
    return usage if isinstance(usage, dict) else None


def _is_cache_hit(metadatas: list[dict[str, Any]]) -> bool:
    """langchain-core marks replayed cached generations with ``total_cost: 0``."""
    return any(usage.get("total_cost") == 0 for usage in metadatas)


#: What LangChain integrations put in ``llm_output`` (and generation info), by their
#: ``ls_provider``: OpenAI-compatible ``token_usage`` unless listed here.
_LLM_OUTPUT_SOURCES: dict[str, UsageSource] = {
    "anthropic": "anthropic",
    "xai": "xai",
    "perplexity": "perplexity",
    "google_genai": "gemini",
    "google_vertexai": "gemini",
    "amazon_bedrock": "bedrock-converse",
    "bedrock": "bedrock-converse",
    "ollama": "ollama",
    "cohere": "cohere",
    "litellm": "litellm",
}


def _source(provider: str | None) -> UsageSource:
    return _LLM_OUTPUT_SOURCES.get(provider or "", "openai-chat")


#: Providers whose reasoning is billed beside the completion count LangChain reports.
_REASONING_ADDITIVE = frozenset(("xai",))


def _reported_usage(
    response: LLMResult | None,
    generations: list[Any],
    metadatas: list[dict[str, Any]],
    state: RunState,
) -> TokenUsage | None:
    """Provider numbers; a prompt the provider reported as 0 tokens is estimated."""
    usage = _provider_usage(response, generations, metadatas, state.provider)
    if usage is not None and not usage.prompt_tokens and usage.completion_tokens:
        prompt = (state.prompt_estimate or _estimate_prompt(state)).prompt_tokens
        usage = with_estimated_prompt(usage, prompt, state.model)
    return usage


def _provider_usage(
    response: LLMResult | None,
    generations: list[Any],
    metadatas: list[dict[str, Any]],
    provider: str | None,
) -> TokenUsage | None:
    """Provider numbers, from the most specific place LangChain put them: the messages'
    ``usage_metadata`` (``metadatas``), the LLM output, the generations' metadata."""
    llm_output = (response.llm_output if response else None) or {}
    source = _source(provider)
    # n > 1: every generation carries the same whole-request usage; count it once.
    distinct: list[dict[str, Any]] = []
    for usage in metadatas:
        if usage not in distinct:
            distinct.append(usage)
    if distinct:
        additive = provider in _REASONING_ADDITIVE
        first, *rest = (usage_from_langchain(usage, additive) for usage in distinct)
        total: TokenUsage = sum(rest, first)
        if source == "anthropic" and (searches := _anthropic_web_searches(llm_output, generations)):
            total = total.model_copy(update={"web_search_requests": searches})
        return total
    for key in ("token_usage", "usage"):
        place = llm_output.get(key)
        found = normalize_usage(place, source=source, whole=False) if place else None
        if found is not None:
            return found
    for generation in generations:
        for place in (
            getattr(generation, "generation_info", None),
            getattr(getattr(generation, "message", None), "response_metadata", None),
        ):
            found = normalize_usage(place, source=source) if place else None
            if found is not None:
                return found
    return None


def _anthropic_web_searches(llm_output: dict[str, Any], generations: list[Any]) -> int:
    """Anthropic's billed web searches, which ``usage_metadata`` leaves out: the raw
    usage's ``server_tool_use`` beside it (``llm_output``); a stream has none (its
    ``message_delta`` usage is reduced to ``usage_metadata``), so there the search results
    it streamed count, one per search (a failed search, whose result is an error, is not
    billed)."""
    raw_usage = llm_output.get("usage")
    if isinstance(raw_usage, dict) and raw_usage.get("server_tool_use"):
        raw = normalize_usage(raw_usage, source="anthropic", whole=False)
        return raw.web_search_requests if raw is not None else 0
    return sum(
        1
        for generation in generations
        for block in _content_blocks(generation)
        if block.get("type") == "web_search_tool_result" and isinstance(block.get("content"), list)
    )


def _content_blocks(generation: Any) -> list[dict[str, Any]]:
    content = getattr(getattr(generation, "message", None), "content", None)
    if not isinstance(content, list):  # plain text: no blocks
        return []
    return [block for block in content if isinstance(block, dict)]


def _returned_texts(state: RunState, generations: list[Any]) -> list[str]:
    """The text that came back: the generations', else what was streamed."""
    texts = [
        message_text(getattr(getattr(g, "message", None), "content", None)) or g.text
        for g in generations
    ]
    return texts if any(texts) else ["".join(state.streamed)]


def _estimate(state: RunState, texts: list[str]) -> TokenUsage:
    """tiktoken over the prompt and whatever text came back or was streamed."""
    prompt = state.prompt_estimate or _estimate_prompt(state)
    completion = count_texts_tokens(texts, state.model)
    return build_usage(prompt=prompt.prompt_tokens, completion=completion, estimated=True)


def _record(
    tracker: UsageTracker,
    state: RunState,
    response: LLMResult | None,
    error: BaseException | None,
) -> None:
    generations = _generations(response)
    metadatas = [usage for usage in map(_usage_metadata, generations) if usage]
    cache_hit = error is None and _is_cache_hit(metadatas)
    usage = _reported_usage(response, generations, metadatas, state)
    if usage is None and not cache_hit:
        texts = _returned_texts(state, generations)
        # a refused request (an error before any text: HTTP 4xx/5xx, retries, fallbacks)
        # bills nothing; langchain-openai attaches an empty generation to such errors.
        # A stream whose first chunk came (langchain-anthropic's for message_start) was
        # billed its input by providers that bill a started stream.
        started = bool(state.streamed) and _source(state.provider) in BILLED_ONCE_STARTED
        if error is None or any(texts) or started:
            usage = _estimate(state, texts)  # a broken stream keeps what was streamed
    model = _response_model(response, generations) or state.model or UNKNOWN_MODEL
    tracker.record_run(state, usage or TokenUsage(), model=model, error=error, cache_hit=cache_hit)


# -------------------------------------------------------------------- embeddings


class TrackedEmbeddings(Embeddings):
    """Wraps any LangChain ``Embeddings``: records embedding tokens and honours budgets.

    Token counts come from tiktoken with the embedding model's encoding (what OpenAI's
    client itself sends as token ids), flagged ``estimated`` since the provider's own
    count is not exposed through the ``Embeddings`` interface.
    """

    def __init__(
        self,
        embeddings: Embeddings,
        tracker: UsageTracker,
        *,
        model: str | None = None,
        provider: str | None = None,
        user_id: str | None = None,
        session_id: str | None = None,
        tags: Sequence[str] | None = None,
    ) -> None:
        self.embeddings = embeddings
        self.tracker = tracker
        self.model = model or _embedding_model(embeddings)
        self.provider = provider or _embedding_provider(embeddings)
        self.user_id = user_id
        self.session_id = session_id
        self.tags = list(tags or [])

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        state = self._begin(texts)
        try:
            vectors = self.embeddings.embed_documents(texts)
        except BaseException as error:
            self._finish(state, error)
            raise
        self._finish(state, None)
        return vectors

    def embed_query(self, text: str) -> list[float]:
        state = self._begin([text])
        try:
            vector = self.embeddings.embed_query(text)
        except BaseException as error:
            self._finish(state, error)
            raise
        self._finish(state, None)
        return vector

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        state = self._begin(texts)
        try:
            vectors = await self.embeddings.aembed_documents(texts)
        except BaseException as error:
            self._finish(state, error)
            raise
        self._finish(state, None)
        return vectors

    async def aembed_query(self, text: str) -> list[float]:
        state = self._begin([text])
        try:
            vector = await self.embeddings.aembed_query(text)
        except BaseException as error:
            self._finish(state, error)
            raise
        self._finish(state, None)
        return vector

    def _begin(self, texts: list[str]) -> RunState | None:
        """Count and reserve before the provider is called; None if tracking failed."""
        try:
            tokens = count_texts_tokens(texts, self.model)
            sessions = sessions_of(self.tracker)
            state = RunState(
                run_id="",
                started_at=utcnow(),
                framework="langchain",
                call_type="embedding",
                model=self.model,
                provider=self.provider,
                user_id=self.user_id,
                session_id=self.session_id,
                tags=self.tags,
                sessions=sessions,
                prompt_estimate=build_usage(embedding=tokens, estimated=True),
            )
            state.reservation = self.tracker.reserve(
                model=self.model,
                provider=self.provider,
                embedding_tokens=tokens,
                user_id=self.user_id,
                session_id=self.session_id,
                sessions=sessions,
            )
            return state
        except BudgetExceededError:
            raise
        except Exception as error:  # any failure on the way to the reservation
            logger.warning("usage tracking failed before an embedding call", exc_info=True)
            if self.tracker.has_budgets:
                self.tracker.budget_check_failed(error)  # raises unless fail-open
            return None

    def _finish(self, state: RunState | None, error: BaseException | None) -> None:
        if state is None:
            return
        try:
            billed = state.prompt_estimate if error is None else None
            state.model = self.model or UNKNOWN_MODEL
            self.tracker.record_run(state, billed or TokenUsage(), error=error)
        except Exception:
            logger.warning("usage tracking failed after an embedding call", exc_info=True)


def _embedding_model(embeddings: Embeddings) -> str | None:
    for attribute in ("model", "model_name", "model_id", "deployment"):
        value = getattr(embeddings, attribute, None)
        if isinstance(value, str) and value:
            return value
    return None


def _embedding_provider(embeddings: Embeddings) -> str | None:
    module = type(embeddings).__module__.split(".")[0]
    return module.removeprefix("langchain_") if module.startswith("langchain_") else None


__all__ = ["TrackedEmbeddings", "UsageCallbackHandler"]
