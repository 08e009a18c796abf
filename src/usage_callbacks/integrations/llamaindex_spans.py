"""LlamaIndex attribution: which workflow step and agent an LLM call runs in.

A span handler on the root instrumentation dispatcher keeps the spans in flight (one
entry from span enter to exit or drop). An LLM call's span walks up to find:
- the workflow step (a span directly under a workflow's ``run`` span), as ``node``;
- the agent: the ``current_agent_name`` of the step's agent event in an
  ``AgentWorkflow``, or the ``name`` of a ``FunctionAgent``/``ReActAgent`` run;
- ``run_name``, the nearest span that is not the model's own, and the root span's name.
Dimensions come from ``instrument_tags({...})``, LlamaIndex's metadata for a run.
LlamaIndex has no conversation id, so ``thread_id`` stays empty.

The tree also pairs calls: an LLM call inside an open call's span is part of it, and
a listener hears when a span fails (the only end LlamaIndex gives a failed non-streaming
call on the instrumentation side) or exits (handing out a stream that may never be read).
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Container
from typing import Any, NamedTuple, Protocol

from llama_index.core.agent.workflow import BaseWorkflowAgent
from llama_index.core.agent.workflow.workflow_events import AgentInput, AgentOutput, AgentSetup
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.llms.base import BaseLLM
from llama_index.core.instrumentation import get_dispatcher  # type: ignore[attr-defined]
from llama_index.core.instrumentation.span_handlers import BaseSpanHandler
from llama_index.core.workflow import Workflow
from llama_index_instrumentation.dispatcher import active_instrument_tags

from usage_callbacks.attribution import Attribution, Dimensions, declared_dimensions

logger = logging.getLogger("usage_callbacks")

#: Span ids are ``<qualified name>-<uuid4>``.
_UUID_SUFFIX = 37
_AGENT_EVENTS = (AgentInput, AgentSetup, AgentOutput)


class _PlacedSpan(NamedTuple):
    """A span in flight, with what attribution needs of it. A plain tuple, not a
    ``BaseSpan`` model: building and validating one of those took ~5 µs of every span."""

    id_: str
    parent_id: str | None
    name: str
    workflow: bool = False
    model: bool = False
    agent: str | None = None


class SpanEndListener(Protocol):
    def span_exited(self, span: str, result: Any) -> None: ...

    def span_failed(self, span: str, error: BaseException | None) -> None: ...


#: told of every span's end (the calls in flight: one listener for every handler)
_listener: SpanEndListener | None = None


def listen_to_span_ends(listener: SpanEndListener) -> None:
    global _listener
    _listener = listener


def _tell_listener(method: str, span: str, detail: Any) -> None:
    if _listener is None:
        return
    try:
        getattr(_listener, method)(span, detail)
    except Exception:  # the dispatcher does not guard span handlers: never break the call
        logger.warning("usage tracking failed at the end of span %s", span, exc_info=True)


class SpanTree(BaseSpanHandler[Any]):  # holds _PlacedSpan, not BaseSpan models
    """The spans in flight under the root dispatcher; each is forgotten at its exit.

    It sees every span of the process, so its enter, exit and drop are the base class's
    without its lock (a pydantic private attribute, slow to reach; one dict store or pop
    needs no lock). With plain span objects, our
    dispatcher handlers cost a LlamaIndex call (MockLLM chat + embedding batch) ~70 µs
    instead of ~136 µs, tracked or not (benchmarks/RESULTS.md).
    """

    @classmethod
    def class_name(cls) -> str:
        return "UsageCallbacksSpanTree"

    def new_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        parent_span_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> _PlacedSpan | None:
        name = id_[:-_UUID_SUFFIX] if len(id_) > _UUID_SUFFIX else id_
        try:
            agent = instance.name if isinstance(instance, BaseWorkflowAgent) else None
            event = bound_args.arguments.get("ev")
            if isinstance(event, _AGENT_EVENTS):
                agent = event.current_agent_name
            return _PlacedSpan(
                id_=id_,
                parent_id=parent_span_id,
                name=name,
                workflow=isinstance(instance, Workflow),
                model=isinstance(instance, (BaseLLM, BaseEmbedding)),
                agent=agent,
            )
        except Exception:  # the dispatcher does not guard span handlers: never break the call
            logger.warning("could not place span %s", id_, exc_info=True)
            return _PlacedSpan(id_=id_, parent_id=parent_span_id, name=name)

    def span_enter(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        parent_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if id_ not in self.open_spans:
            span = self.new_span(id_, bound_args, instance, parent_id, tags)
            if span is not None:
                self.open_spans[id_] = span

    def span_exit(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        result: Any | None = None,
        **kwargs: Any,
    ) -> None:
        self.prepare_to_exit_span(id_, bound_args, instance, result)
        self.open_spans.pop(id_, None)

    def span_drop(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        err: BaseException | None = None,
        **kwargs: Any,
    ) -> None:
        self.prepare_to_drop_span(id_, bound_args, instance, err)
        self.open_spans.pop(id_, None)

    def prepare_to_exit_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        result: Any | None = None,
        **kwargs: Any,
    ) -> _PlacedSpan | None:
        _tell_listener("span_exited", id_, result)
        return self.open_spans.get(id_)  # as the base class expects; span_exit forgets it

    def prepare_to_drop_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        err: BaseException | None = None,
        **kwargs: Any,
    ) -> _PlacedSpan | None:
        _tell_listener("span_failed", id_, err)
        return self.open_spans.get(id_)  # as the base class expects; span_exit forgets it

    def enclosing(self, span_id: str | None, spans: Container[str]) -> str | None:
        """The nearest span above ``span_id`` that is in ``spans``, if any."""
        open_spans: dict[str, _PlacedSpan] = self.open_spans
        span = open_spans.get(span_id) if span_id else None
        while span is not None and span.parent_id is not None:
            if span.parent_id in spans:
                return span.parent_id
            span = open_spans.get(span.parent_id)
        return None

    def attribution(self, span_id: str | None, declared: frozenset[str]) -> Attribution:
        """Where the call in span ``span_id`` runs, and the declared instrument tags."""
        dimensions: Dimensions = declared_dimensions(declared, active_instrument_tags.get())
        node = agent = run_name = root = None
        spans: dict[str, _PlacedSpan] = self.open_spans
        span = spans.get(span_id) if span_id else None
        while span is not None:
            parent = spans.get(span.parent_id) if span.parent_id else None
            if run_name is None and not span.model:
                run_name = span.name
            if agent is None:
                agent = span.agent
            if node is None and parent is not None and parent.workflow:
                node = span.name.rpartition(".")[2]
            root = span.name
            span = parent
        return Attribution(
            node=node, agent=agent, run_name=run_name, root_run_name=root, dimensions=dimensions
        )


_tree_lock = threading.Lock()
_tree: SpanTree | None = None


def span_tree() -> SpanTree:
    """The process's span tree, on the root dispatcher from the first use."""
    global _tree
    with _tree_lock:
        if _tree is None:
            _tree = SpanTree()
            get_dispatcher().add_span_handler(_tree)
        return _tree
