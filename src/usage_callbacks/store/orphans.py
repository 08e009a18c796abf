"""Spill files left by processes that died: found and written by the next one.

A process killed with records in its spill file (SIGKILL at saturation, an outage that
outlasted it) left them on disk. Each tracker's own spill file sits in a folder named
after its database and is claimed by an ``flock`` held for the life of the process: the
kernel releases it however the process ends. A tracker starting on the same database
writes the files whose claim it can take, then deletes them.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from usage_callbacks.store.models import UsageRecord
from usage_callbacks.store.spill import SpillFile, ingest_file, spill_base


class _Writable(Protocol):
    def write(self, records: Sequence[UsageRecord]) -> None: ...


def spill_folder(store_identity: str) -> Path:
    """Where the spill files of one database go (its name, hashed: it may hold a host)."""
    digest = hashlib.sha256(store_identity.encode()).hexdigest()[:16]
    return spill_base() / digest


def _claim_path(spill: SpillFile) -> Path:
    return spill.path.with_name(f"{spill.path.name}.lock")


class Claim:
    """This process's hold on its spill file: while it is held, no other process takes
    the file for an orphan."""

    def __init__(self, spill: SpillFile) -> None:
        self._spill = spill
        path = _claim_path(spill)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        while True:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(descriptor, fcntl.LOCK_EX)  # waits only for one adopting a dead namesake
            if _same_file(descriptor, path):
                break
            os.close(descriptor)  # that adopter deleted the file we locked: make it anew
        self._descriptor: int | None = descriptor

    def drop(self) -> None:
        """Close this copy (a forked child's copy of its parent's claim; the parent keeps
        the claim while it lives)."""
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None

    def end(self) -> None:
        """At the writer's close: the claim file goes too, unless the spill file holds
        records for the next tracker on the database."""
        if self._descriptor is not None and not self._spill.exists():
            _claim_path(self._spill).unlink(missing_ok=True)
        self.drop()


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        named = path.stat()
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def adopt_orphans(own: SpillFile, store: _Writable, batch_size: int) -> int:
    """Write to ``store`` the spill files in ``own``'s folder whose process has died,
    then delete them; returns the records written. A file whose process lives (its
    claim held) is left alone; one the store cannot take now stays for the next start."""
    written = 0
    for claim_path in sorted(own.path.parent.glob("spill-*.jsonl.lock")):
        if claim_path == _claim_path(own):
            continue
        try:
            descriptor = os.open(claim_path, os.O_RDWR)
        except FileNotFoundError:  # another process adopted it meanwhile
            continue
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its process is alive
                continue
            orphan = SpillFile(claim_path.with_name(claim_path.name.removesuffix(".lock")))
            for path in (orphan.draining, orphan.path):
                if path.exists():
                    written += ingest_file(path, store, batch_size)
                    path.unlink()
            claim_path.unlink(missing_ok=True)
        finally:
            os.close(descriptor)
    return written
