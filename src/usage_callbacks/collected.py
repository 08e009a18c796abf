"""Work that a garbage collection sets off runs on a thread of its own.

The collector calls a finalizer on whichever thread happens to allocate (or drops the last
reference), and that thread may be in the middle of an update under one of our locks (a
session's, the calls in flight, the budget allowances'). Releasing a hold or recording a
call takes those locks again: done inline, the finalizer would wait for its own thread,
for good. On a thread of its own it waits its turn. One worker thread takes the work
from a ``SimpleQueue`` (whose ``put`` is safe inside a finalizer): a thread started for
each piece of work cost ~70 µs of CPU, and every streamed call sets some off.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("usage_callbacks")


def when_collected(
    target: object, work: Callable[..., object], *args: Any
) -> weakref.finalize[Any, Any]:
    """Run ``work(*args)`` once ``target`` is garbage-collected, off the collecting thread."""
    return weakref.finalize(target, _off_the_collector, work, args)


def collected_pending() -> int:
    """How much work set off by garbage collection has not finished yet."""
    return _pending


def wait_for_collected(timeout: float | None) -> bool:
    """Block until the work set off so far has run (``flush()`` waits for it); False on
    timeout."""
    with _running:
        return _running.wait_for(lambda: _pending == 0, timeout)


def _off_the_collector(work: Callable[..., object], args: tuple[Any, ...]) -> None:
    global _pending
    with _running:
        _pending += 1
    if _worker_running():
        _queue.put((work, args))
    else:  # the interpreter is shutting down: no new threads, no one to wait for
        _logged(work, args)


def _worker_running() -> bool:
    global _worker
    with _running:
        if _worker is None:
            worker = threading.Thread(target=_work_off, name="usage-callbacks-collected")
            worker.daemon = True
            try:
                worker.start()
            except RuntimeError:
                return False
            _worker = worker
    return True


def _work_off() -> None:
    while True:
        work, args = _queue.get()
        _logged(work, args)


def _logged(work: Callable[..., object], args: tuple[Any, ...]) -> None:
    global _pending
    try:
        work(*args)
    except Exception:  # nobody is there to catch it: say so instead of a thread traceback
        logger.warning("usage tracking failed ending a garbage-collected call", exc_info=True)
    finally:
        with _running:
            _pending -= 1
            _running.notify_all()


def _start_empty() -> None:
    """At import, and in a forked child: the parent's threads are not the child's."""
    global _pending, _running, _queue, _worker
    _pending = 0
    _running = threading.Condition()
    _queue = queue.SimpleQueue()
    _worker = None


#: Work started and not finished yet, for ``wait_for_collected``.
_pending: int
_running: threading.Condition
#: The work waiting for the worker thread, started with the first piece.
_queue: queue.SimpleQueue[tuple[Callable[..., object], tuple[Any, ...]]]
_worker: threading.Thread | None
_start_empty()
os.register_at_fork(after_in_child=_start_empty)
