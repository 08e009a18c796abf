"""Files the library creates hold user ids and spend: they are owner-only unless asked.

``$USAGE_CALLBACKS_FILE_MODE`` (octal, e.g. ``640``) widens the mode of the files created
from then on: databases (SQLite gives its -wal and -shm the database's mode), spill and
rejected-row files, exports and reports. Existing files keep their mode.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

FILE_MODE_ENV = "USAGE_CALLBACKS_FILE_MODE"
OWNER_ONLY = 0o600


def file_mode() -> int:
    """The mode new files get: owner read/write, or what ``$USAGE_CALLBACKS_FILE_MODE`` asks."""
    text = os.environ.get(FILE_MODE_ENV, "").strip()
    if not text:
        return OWNER_ONLY
    try:
        mode = int(text, 8)
    except ValueError:
        raise ValueError(f"{FILE_MODE_ENV}={text!r} is not an octal file mode like 600") from None
    if not 0 <= mode <= 0o777:
        raise ValueError(f"{FILE_MODE_ENV}={text!r} is not a file mode (000 to 777)")
    return mode


def _open_flags(append: bool) -> int:
    return os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)


def open_private(path: Path, *, append: bool = False, newline: str | None = None) -> IO[str]:
    """``path`` opened for writing text; created with :func:`file_mode` when new."""
    descriptor = os.open(path, _open_flags(append), file_mode())
    return os.fdopen(descriptor, "a" if append else "w", encoding="utf-8", newline=newline)


def create_private(path: Path) -> None:
    """Create ``path`` empty with :func:`file_mode` unless it exists (before SQLite does)."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode())
    except FileExistsError:
        return
    os.close(descriptor)
