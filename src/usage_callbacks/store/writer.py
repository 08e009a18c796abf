"""Batched, off-thread writes so the callback hot path does no disk or network I/O.

A record waits at most ``max_delay`` seconds or until ``batch_size`` records are queued.
Submitting is a lock-free append (the deque is thread-safe): taking the writer's lock on
every call let the writer thread, pre-empted while holding it, stall the caller for
milliseconds. The writer polls every ``max_delay`` and is woken for full batches.

A caller never waits for the store. While the store takes writes, at most two batches
wait beside the one being written: a full one the writer has been woken for and the one
filling. (One was too few: the writer needs the GIL to take its batch, and a caller
holding it queues on for up to 5 ms, so with one a caller spilled nearly every batch.)
A caller that would queue more moves the oldest batch to the spill file itself (a local
append: ~1 ms for 500 records), and the writer re-ingests the file before its next batch.
So a killed process loses at most the batch being written, the two queued and a batch
per thread on its way to the file; the next tracker on the database writes what its
spill file holds (``orphans.py``). With ``max_buffer`` queued, SIGKILL at saturation
lost 10,000; bounding the queue by making callers wait for the writer stalled them for
up to 2 s. While the store fails, up to ``max_buffer`` records wait in memory before
the oldest spill.

When the store refuses a batch for its values (a row it cannot take), the batch is
written record by record and the refused ones are set aside in a ``.rejected.jsonl``
file beside the spill file, so that one bad row cannot hold every later record back.
Failed batches and drains are retried with backoff.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import sqlalchemy as sa

from usage_callbacks.store.models import UsageRecord
from usage_callbacks.store.orphans import Claim, adopt_orphans, spill_folder
from usage_callbacks.store.spill import SpillFile, default_spill_path

logger = logging.getLogger("usage_callbacks")

#: The writer's next job: a batch, the spill file to re-ingest, or None to stop.
_Work = list[UsageRecord] | Literal["drain"] | None


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
        store_identity: str | None = None,
    ) -> None:
        """Without ``spill``, the spill file is this process's own: in the folder of
        ``store_identity``'s database, where the next tracker on it writes what a process
        that died left, or (None: records that do not outlive the process) the base one."""
        if batch_size < 1 or max_delay <= 0 or max_buffer < batch_size:
            raise ValueError("need batch_size >= 1, max_delay > 0 and max_buffer >= batch_size")
        self._given_store = store
        self._batch_size = batch_size
        self._max_delay = max_delay
        self._max_buffer = max_buffer
        self._healthy_bound = 2 * batch_size
        self._own_spill = spill is None  # per process: renamed in a forked child
        self._folder = spill_folder(store_identity) if self._own_spill and store_identity else None
        self._claim: Claim | None = None
        self._closed = False
        self._start(spill or SpillFile(default_spill_path(self._folder)))

    def _start(self, spill: SpillFile) -> None:
        self._spill = spill
        if self._folder is not None:
            self._claim = Claim(spill)
        path = spill.path
        rejected = SpillFile(path.with_name(f"{path.stem}.rejected.jsonl"))
        self._store = _SettingAside(self._given_store, rejected)
        self._pending: deque[UsageRecord] = deque()  # appended to without the lock
        self._condition = threading.Condition()
        #: every record submitted is in one place: queued, in flight, spilled (on its
        #: way to the spill file or in it) or done (written, or lost with an error
        #: logged); flush() waits for done to reach the others' sum
        self._done = 0
        self._inflight: list[UsageRecord] = []
        self._spilled = 0
        self._flush_requested = False
        self._failures = 0
        #: set once the spill files of ended processes are written (flush() waits for it)
        self._adopted = threading.Event()
        #: records that may wait queued: two batches, or max_buffer while the store fails
        self._bound = self._healthy_bound
        self._thread = threading.Thread(
            target=self._run, name="usage-callbacks-writer", daemon=True
        )
        self._thread.start()

    def restart_in_child(self) -> None:
        """After ``fork``: the child has no writer thread and its lock may have been held
        by it mid-batch. Start afresh; what was queued is the parent's to write."""
        if self._claim is not None:
            self._claim.drop()
        if not self._closed:
            own = SpillFile(default_spill_path(self._folder))
            self._start(own if self._own_spill else self._spill)

    def submit(self, record: UsageRecord) -> None:
        pending = self._pending
        pending.append(record)
        queued = len(pending)
        if queued > self._bound:
            self._spill_overflow()
        elif queued % self._batch_size == 0:
            with self._condition:
                self._condition.notify_all()  # a full batch: wake the writer

    def _spill_overflow(self) -> None:
        """The queue outgrew its bound: move its oldest batch to the spill file on this
        thread, which never waits for the store (the writer re-ingests the file); at
        most for another caller's append."""
        with self._condition:
            if len(self._pending) <= self._bound:
                return  # another caller spilled, or the writer took a batch
            if not self._spilled:
                logger.warning(
                    "usage records are arriving faster than the store takes them (%d queued)"
                    " or it is away; the overflow goes to %s until it catches up",
                    len(self._pending),
                    self._spill.path,
                )
            batch = self._take_oldest()
            self._spilled += len(batch)
        self._to_spill_file(batch)

    def _take_oldest(self) -> list[UsageRecord]:
        """Take the oldest batch off the queue (caller holds the condition)."""
        count = min(self._batch_size, len(self._pending))
        return [self._pending.popleft() for _ in range(count)]

    def _to_spill_file(self, batch: list[UsageRecord]) -> None:
        """Append a batch taken for the spill file. Records it cannot keep are lost with
        an error logged, and done: flush() does not wait for them."""
        try:
            kept = self._spill.append(batch)
        except OSError:
            logger.error(
                "usage spill file %s unwritable; %d records lost",
                self._spill.path,
                len(batch),
                exc_info=True,
            )
            kept = 0
        with self._condition:
            lost = len(batch) - kept
            self._spilled -= lost
            self._done += lost
            self._condition.notify_all()  # the writer re-ingests what arrived

    @property
    def spill_path(self) -> Path:
        return self._spill.path

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Block until everything submitted so far is written (and the spill files that
        ended processes left, at start); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._adopted.wait(timeout):
            return False
        with self._condition:
            # the writer moves records between these under the lock: a consistent count
            target = self._done + len(self._inflight) + len(self._pending) + self._spilled
            while self._done < target:
                self._flush_requested = True
                self._condition.notify_all()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._condition.wait(remaining)
        return True

    def close(self, timeout: float | None = 30.0) -> None:
        """Write to the store; what it cannot take within ``timeout`` is spilled to disk."""
        self.flush(timeout)
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self._thread.join(timeout)
        if self._claim is not None:  # what is left on disk is the next tracker's to write
            self._claim.end()

    @property
    def pending(self) -> int:
        """Records not written yet held in memory (queued or in flight): what a SIGKILL
        would lose."""
        with self._condition:
            return len(self._pending) + len(self._inflight)

    def _drain_due(self) -> bool:
        """Spilled records have reached the file, and the store takes writes (or nothing
        else is queued to find out whether it does)."""
        return (
            self._spilled > 0 and (not self._failures or not self._pending) and self._spill.exists()
        )

    def _next_work(self) -> _Work:
        """Wait for the spill file to re-ingest, a full batch, the end of a ``max_delay``
        round with records queued, a flush or close. A record queued during a round is
        written at its end at the latest."""
        with self._condition:
            started = time.monotonic()
            while True:
                if self._drain_due():
                    return "drain"
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
            self._inflight = self._take_oldest()
            return self._inflight

    def _drain(self) -> None:
        """Re-ingest the spill file."""
        count = self._spill.drain(self._store, self._batch_size)
        with self._condition:
            self._spilled -= count
            self._done += count
        logger.info("re-ingested %d spilled usage records from %s", count, self._spill.path)

    def _adopt_orphans(self) -> None:
        try:
            count = adopt_orphans(self._spill, self._store, self._batch_size)
        except Exception:  # the store failing, a file unreadable: left for the next start
            logger.warning(
                "writing the spill files that ended processes left in %s failed",
                self._spill.path.parent,
                exc_info=True,
            )
        else:
            if count:
                logger.warning(
                    "wrote %d usage records that ended processes left in %s",
                    count,
                    self._spill.path.parent,
                )

    def _run(self) -> None:
        if self._folder is not None:
            self._adopt_orphans()
        self._adopted.set()
        while (work := self._next_work()) is not None:
            try:
                if work == "drain":
                    self._drain()
                else:
                    self._store.write(work)
            except Exception as error:  # whatever the store raised: retried with backoff
                if self._failed(error, work):
                    return
                continue
            self._failures = 0
            self._bound = self._healthy_bound
            with self._condition:
                self._done += len(self._inflight)
                self._inflight = []
                self._condition.notify_all()

    def _failed(self, error: Exception, work: list[UsageRecord] | Literal["drain"]) -> bool:
        """Requeue what failed and wait out the backoff; True when closing, after the
        queue went to the spill file (the store is down: keep it on disk)."""
        self._failures += 1
        self._bound = self._max_buffer
        delay = min(0.05 * 2**self._failures, 5.0)
        logger.warning(
            "%s failed (attempt %d); retrying in %.2fs",
            "re-ingesting spilled usage records"
            if work == "drain"
            else f"writing {len(work)} usage records",
            self._failures,
            delay,
            exc_info=error if self._failures == 1 else None,
        )
        with self._condition:
            self._pending.extendleft(reversed(self._inflight))
            self._inflight = []
            if not self._closed:
                self._condition.wait_for(lambda: self._closed, timeout=delay)
                return False
            batches = []
            while self._pending:
                batches.append(self._take_oldest())
                self._spilled += len(batches[-1])
        for batch in batches:
            self._to_spill_file(batch)
        return True


class _SettingAside:
    """The store, with the rows it refuses for their values set aside in the rejected
    file: one bad row cannot hold back the rest of its batch or of the spill file. Raises
    when the store itself fails (away, locked, full)."""

    def __init__(self, store: _Writable, rejected: SpillFile) -> None:
        self._store = store
        self._rejected = rejected

    def write(self, records: Sequence[UsageRecord]) -> None:
        try:
            self._store.write(records)
        except Exception as error:  # classified below; anything else is re-raised
            if not (_refused_values(error) and self._set_aside_refused(records)):
                raise

    def _set_aside_refused(self, records: Sequence[UsageRecord]) -> bool:
        """Write record by record and keep the refused ones in the rejected file. False
        when a write fails for another reason: then the store itself is failing, and the
        batch is retried whole (records already written are skipped by id)."""
        refused: list[UsageRecord] = []
        reason: Exception | None = None
        for record in records:
            try:
                self._store.write([record])
            except Exception as error:  # classified below
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
