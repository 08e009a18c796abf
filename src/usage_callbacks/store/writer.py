"""Batched, off-thread writes so the callback hot path does no disk or network I/O.

A record waits at most ``max_delay`` seconds or until ``batch_size`` records are queued.
Submitting is a lock-free append (the deque is thread-safe): taking the writer's lock on
every call let the writer thread, pre-empted while holding it, stall the caller for
milliseconds. The writer polls every ``max_delay`` and is woken for full batches.
When the store refuses a batch for its values (a row it cannot take), the batch is
written record by record and the refused ones are set aside in a ``.rejected.jsonl``
file beside the spill file, so that one bad row cannot hold every later record back.
Failed batches stay queued and are retried with backoff. While the store takes writes,
at most one batch waits beside the one being written: a producer that would queue more
waits for the writer (backpressure), so a killed process loses at most those two batches
(with ``max_buffer`` waiting, SIGKILL at saturation lost 10,000). While the store fails,
up to ``max_buffer`` records wait in memory; beyond that the oldest batch is spilled to
a local JSONL file, re-ingested as soon as the store accepts writes again.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import sqlalchemy as sa

from usage_callbacks.store.models import UsageRecord
from usage_callbacks.store.spill import SpillFile, default_spill_path

logger = logging.getLogger("usage_callbacks")

#: How long record() may wait for a slow but healthy store before spilling instead.
_BACKPRESSURE_LIMIT_S = 2.0


class _Writable(Protocol):
    def write(self, records: Sequence[UsageRecord]) -> None: ...


class BatchWriter:
    """Queues records and writes them in batches from one daemon thread."""

    def __init__(
        self,
        store: _Writable,
        *,
        batch_size: int = 500,
        max_delay: float = 0.5,
        max_buffer: int = 100_000,
        spill: SpillFile | None = None,
    ) -> None:
        if batch_size < 1 or max_delay <= 0 or max_buffer < batch_size:
            raise ValueError("need batch_size >= 1, max_delay > 0 and max_buffer >= batch_size")
        self._store = store
        self._batch_size = batch_size
        self._max_delay = max_delay
        self._max_buffer = max_buffer
        self._own_spill = spill is None  # per process: renamed in a forked child
        self._closed = False
        self._start(spill or SpillFile(default_spill_path()))

    def _start(self, spill: SpillFile) -> None:
        self._spill = spill
        path = spill.path
        self._rejected = SpillFile(path.with_name(f"{path.stem}.rejected.jsonl"))
        self._pending: deque[UsageRecord] = deque()  # appended to without the lock
        self._condition = threading.Condition()
        self._written = 0  # records written or spilled so far, for flush() to wait on
        self._inflight: list[UsageRecord] = []
        self._flush_requested = False
        self._failures = 0
        #: records that may wait unwritten: one batch, or max_buffer while the store fails
        self._bound = self._batch_size
        self._spilled = False  # records went to the spill file: re-ingest once writes succeed
        self._thread = threading.Thread(
            target=self._run, name="usage-callbacks-writer", daemon=True
        )
        self._thread.start()

    def restart_in_child(self) -> None:
        """After ``fork``: the child has no writer thread and its lock may have been held
        by it mid-batch. Start afresh; what was queued is the parent's to write."""
        if not self._closed:
            self._start(SpillFile(default_spill_path()) if self._own_spill else self._spill)

    def submit(self, record: UsageRecord) -> None:
        pending = self._pending
        pending.append(record)
        queued = len(pending)
        if queued % self._batch_size == 0 or queued > self._bound:
            self._wake_or_wait()

    def _wake_or_wait(self) -> None:
        """A full batch wakes the writer; a full queue makes the caller wait or spill."""
        with self._condition:
            if len(self._pending) > self._bound:
                # A healthy but slower store pushes back on the producer; only a failing
                # one (or a stall past the limit) sends records to the spill file.
                if not self._failures:
                    self._condition.notify_all()
                    self._condition.wait_for(
                        lambda: len(self._pending) <= self._bound or self._failures > 0,
                        timeout=_BACKPRESSURE_LIMIT_S,
                    )
                if len(self._pending) > self._bound:
                    self._spill_oldest()
            if len(self._pending) >= self._batch_size:
                self._condition.notify_all()

    def _spill_oldest(self) -> None:
        """Move the oldest batch to the spill file (caller holds the condition)."""
        count = min(self._batch_size, len(self._pending))
        batch = [self._pending.popleft() for _ in range(count)]
        try:
            self._spill.append(batch)
        except OSError:
            logger.error(
                "usage buffer full and spill file %s unwritable; %d records lost",
                self._spill.path,
                count,
                exc_info=True,
            )
        else:
            self._spilled = True
            logger.warning(
                "usage buffer full (%d); spilled %d records to %s",
                self._bound,
                count,
                self._spill.path,
            )
        self._written += count

    @property
    def spill_path(self) -> Path:
        return self._spill.path

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Block until everything submitted so far is written; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            # the writer moves records between these under the lock: a consistent count
            target = self._written + len(self._inflight) + len(self._pending)
            while self._written < target:
                self._flush_requested = True
                self._condition.notify_all()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._condition.wait(remaining)
        return True

    def close(self, timeout: float | None = 30.0) -> None:
        """Drain to the store; what it cannot take within ``timeout`` is spilled to disk."""
        self.flush(timeout)
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self._thread.join(timeout)

    @property
    def pending(self) -> int:
        with self._condition:
            return len(self._pending) + len(self._inflight)

    def _next_batch(self) -> list[UsageRecord] | None:
        """Wait for a full batch, the end of a ``max_delay`` round with records queued, a
        flush or close; None means stop. A record queued during a round is written at
        its end at the latest."""
        with self._condition:
            started = time.monotonic()
            while True:
                due = time.monotonic() - started >= self._max_delay
                if self._pending and (
                    due
                    or self._closed
                    or self._flush_requested
                    or len(self._pending) >= self._batch_size
                ):
                    break
                if self._closed:
                    return None
                if not self._pending:
                    self._flush_requested = False
                if due:  # an empty round: start the next
                    started = time.monotonic()
                self._condition.wait(self._max_delay - (time.monotonic() - started))
            count = min(self._batch_size, len(self._pending))
            self._inflight = [self._pending.popleft() for _ in range(count)]
            self._condition.notify_all()  # producers held back by a full queue go on
            return self._inflight

    def _reingest_spill(self) -> None:
        self._spilled = False
        try:
            count = self._spill.drain(self._store, self._batch_size)
        except Exception:
            logger.warning("re-ingesting %s failed; will retry", self._spill.path, exc_info=True)
        else:
            logger.warning("re-ingested %d spilled records from %s", count, self._spill.path)

    def _run(self) -> None:
        self._write_batches()
        if self._spilled and not self._failures and self._spill.exists():  # after the last batch
            self._reingest_spill()

    def _write(self, batch: list[UsageRecord]) -> Exception | None:
        """Write a batch, setting aside records the store refuses; the error when the
        batch is to be retried later."""
        try:
            self._store.write(batch)
        except Exception as error:
            if _refused_values(error) and self._set_aside_refused(batch):
                return None
            return error
        return None

    def _set_aside_refused(self, batch: list[UsageRecord]) -> bool:
        """Write record by record and keep the refused ones in the rejected file. False
        when a write fails for another reason: then the store itself is failing, and the
        batch is retried whole (records already written are skipped by id)."""
        refused: list[UsageRecord] = []
        reason: Exception | None = None
        for record in batch:
            try:
                self._store.write([record])
            except Exception as error:
                if not _refused_values(error):
                    return False
                refused.append(record)
                reason = error
        if not refused:
            return True
        try:
            self._rejected.append(refused)
        except OSError:
            logger.error(
                "the store refused %d usage records (%s) and %s is unwritable; they are lost",
                len(refused),
                reason,
                self._rejected.path,
            )
        else:
            logger.error(
                "the store refused %d usage records (%s); kept in %s",
                len(refused),
                reason,
                self._rejected.path,
            )
        return True

    def _write_batches(self) -> None:
        while (batch := self._next_batch()) is not None:
            error = self._write(batch)
            if error is not None:
                self._failures += 1
                self._bound = self._max_buffer
                delay = min(0.05 * 2**self._failures, 5.0)
                logger.warning(
                    "writing %d usage records failed (attempt %d); retrying in %.2fs",
                    len(batch),
                    self._failures,
                    delay,
                    exc_info=error if self._failures == 1 else None,
                )
                with self._condition:
                    self._pending.extendleft(reversed(self._inflight))
                    self._inflight = []
                    self._condition.notify_all()  # producers waiting on a full queue spill
                    if self._closed:  # closing while the store is down: keep it on disk
                        while self._pending:
                            self._spill_oldest()
                        self._condition.notify_all()
                        return
                    self._condition.wait_for(lambda: self._closed, timeout=delay)
                continue
            if (self._failures or self._spilled) and self._spill.exists():
                self._reingest_spill()
            self._failures = 0
            self._bound = self._batch_size
            with self._condition:
                self._written += len(batch)
                self._inflight = []
                self._condition.notify_all()


def _refused_values(error: BaseException) -> bool:
    """The store refused the rows' values (too long, out of range, unconvertible), not
    the write itself (a database away, locked or full)."""
    if isinstance(error, sa.exc.DBAPIError):
        return isinstance(error, (sa.exc.DataError, sa.exc.IntegrityError))
    if isinstance(error, sa.exc.StatementError):  # a bind processor failed on a value
        return True
    return isinstance(
        error, (ValueError, TypeError, OverflowError, sqlite3.DataError, sqlite3.IntegrityError)
    )
