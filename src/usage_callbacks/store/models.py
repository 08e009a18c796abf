"""SQLModel tables: the usage ledger and the schema version.

Costs are stored as integer pico-USD (10^-12 USD) so that sums are exact on SQLite,
which has no decimal type; they come back as ``Decimal`` USD.
"""

from __future__ import annotations

import itertools
import logging
import os
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, ClassVar

import sqlalchemy as sa
from pydantic import ConfigDict
from sqlmodel import Field, SQLModel

from usage_callbacks.usage import TokenUsage, trusted_instance

logger = logging.getLogger("usage_callbacks")

PICO = Decimal(10) ** 12
#: Bumped when tables change; a database without a version row is v0 (pre-release builds).
#: 2: audio/image/tool/1h-cache counts, web searches, service tier; 3: attribution;
#: 4: the partial index of rows outside TokenUsage's rules (store/sql.py)
SCHEMA_VERSION = 4


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def usd_to_pico(value: Decimal) -> int:
    return int((value * PICO).to_integral_value())


def pico_to_usd(value: Any) -> Decimal:
    return (Decimal(value or 0) / PICO).normalize() if value else Decimal(0)


class PicoUSD(sa.TypeDecorator[Decimal]):
    """Decimal USD in Python, BIGINT pico-USD in the database."""

    impl = sa.BigInteger
    cache_ok = True

    def process_bind_param(self, value: Decimal | None, dialect: sa.Dialect) -> int | None:
        return None if value is None else usd_to_pico(Decimal(value))

    def process_result_value(self, value: int | None, dialect: sa.Dialect) -> Decimal | None:
        return None if value is None else pico_to_usd(value)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the offset)."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware datetime")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)

    def bind_processor(self, dialect: sa.Dialect) -> Callable[[Any], Any] | None:
        """On SQLite, one step to the text SQLAlchemy's DATETIME stores: the generic chain
        (to naive UTC, then a %-format of seven fields) cost ~3.5 µs a value on ingest."""
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)
        return _sqlite_utc_text


def _sqlite_utc_text(value: datetime | None) -> str | None:
    """``YYYY-MM-DD HH:MM:SS.ffffff`` in UTC, exactly as sqlite.DATETIME writes it."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}: pass a timezone-aware datetime")
    if value.tzinfo is not timezone.utc:
        value = value.astimezone(timezone.utc)
    # %-formatting the fields is a third faster than isoformat() of an aware datetime
    return _SQLITE_DATETIME % (
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
    )


_SQLITE_DATETIME = "%04d-%02d-%02d %02d:%02d:%02d.%06d"


class _RecordIds:
    """Unique 32-hex ids without a syscall per record: a random 64-bit prefix per process
    (renewed in forked children) and a counter. uuid4() cost ~10 µs of a ~30 µs hot path."""

    def __init__(self) -> None:
        self._reseed()
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._prefix = uuid.uuid4().hex[:16]
        self._counter = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"


new_record_id = _RecordIds()


class _RecordColumns(SQLModel):
    """The columns of one tracked call, declared once for the value and the table row."""

    id: str = Field(default_factory=new_record_id, primary_key=True, max_length=32)
    started_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    ended_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    latency_ms: float | None = None
    framework: str = Field(default="manual", max_length=32)
    provider: str | None = Field(default=None, max_length=128)
    model: str | None = Field(default=None, max_length=256)
    call_type: str = Field(default="chat", max_length=16)
    run_id: str | None = Field(default=None, max_length=64)
    parent_run_id: str | None = Field(default=None, max_length=64)
    session_id: str | None = Field(default=None, max_length=256)
    user_id: str | None = Field(default=None, max_length=256)
    tags: list[str] = Field(default_factory=list, sa_type=sa.JSON)
    status: str = Field(default="ok", max_length=16)
    error_type: str | None = Field(default=None, max_length=256)
    cache_hit: bool = False
    cost_known: bool = False
    # attribution (see attribution.py): None when unknown
    node: str | None = Field(default=None, max_length=256)
    agent: str | None = Field(default=None, max_length=256)
    thread_id: str | None = Field(default=None, max_length=256)
    run_name: str | None = Field(default=None, max_length=256)
    root_run_name: str | None = Field(default=None, max_length=256)
    dimensions: dict[str, str] | None = Field(default=None, sa_type=sa.JSON)

    prompt_tokens: int = Field(default=0, sa_type=sa.BigInteger)
    completion_tokens: int = Field(default=0, sa_type=sa.BigInteger)
    total_tokens: int = Field(default=0, sa_type=sa.BigInteger)
    embedding_tokens: int = Field(default=0, sa_type=sa.BigInteger)
    cache_read_tokens: int = Field(default=0, sa_type=sa.BigInteger)
    cache_write_tokens: int = Field(default=0, sa_type=sa.BigInteger)
    reasoning_tokens: int = Field(default=0, sa_type=sa.BigInteger)
    cache_write_1h_tokens: int = Field(default=0, sa_type=sa.BigInteger)
    input_audio_tokens: int = Field(default=0, sa_type=sa.BigInteger)
    output_audio_tokens: int = Field(default=0, sa_type=sa.BigInteger)
    input_image_tokens: int = Field(default=0, sa_type=sa.BigInteger)
    output_image_tokens: int = Field(default=0, sa_type=sa.BigInteger)
    tool_prompt_tokens: int = Field(default=0, sa_type=sa.BigInteger)
    web_search_requests: int = Field(default=0, sa_type=sa.BigInteger)
    cost_estimate_usd: Decimal = Field(default=Decimal(0), sa_type=PicoUSD)
    estimated: bool = False
    service_tier: str | None = Field(default=None, max_length=32)


class UsageRecord(_RecordColumns):
    """One tracked call: its TokenUsage plus who, what, when and how it went.

    A plain immutable value (reads, copies, pickles, ``==``; assigning a field raises):
    what ``record()``, ``records()`` and exporters hand out. The database row is
    ``UsageRow``, built only by the stores. ``UsageRow(**record.model_dump())`` turns a
    record into one for an ORM session of your own.
    """

    # SQLModel types its config as its own TypedDict, which it does not export
    model_config = ConfigDict(frozen=True)  # type: ignore[assignment]

    def __hash__(self) -> int:
        # the id is unique per call, and equal records have equal ids; the fields
        # themselves include a list and a dict, which pydantic's frozen hash cannot take
        return hash(self.id)

    @property
    def usage(self) -> TokenUsage:
        return trusted_instance(TokenUsage, {name: self.__dict__[name] for name in USAGE_COLUMNS})

    def row(self) -> dict[str, Any]:
        """Column values for a bulk insert."""
        return dict(self.__dict__)

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> UsageRecord:
        """A record from complete, already valid column values, which it takes as its own
        ``__dict__``: ~10x cheaper than ``UsageRecord(**values)``, for the hot path and
        rows read back from the database. Validates nothing but the set of names."""
        if len(values) != len(_COLUMN_SET):  # cheap; the set difference only on error
            names = set(values)
            raise ValueError(
                f"from_values needs exactly the columns; missing {sorted(_COLUMN_SET - names)}, "
                f"unknown {sorted(names - _COLUMN_SET)}"
            )
        return trusted_instance(cls, values)


class UsageRow(_RecordColumns, table=True):
    """The ``usage_records`` table: only the stores build and read rows of it."""

    __tablename__: ClassVar[str] = "usage_records"
    __table_args__ = (
        sa.Index("ix_usage_records_ended_at", "ended_at"),
        sa.Index("ix_usage_records_user_ended", "user_id", "ended_at"),
        sa.Index("ix_usage_records_session_ended", "session_id", "ended_at"),
        sa.Index("ix_usage_records_model_ended", "model", "ended_at"),
        # attribution: partial, so calls without one cost their index nothing
        *(
            sa.Index(
                f"ix_usage_records_{name}_ended",
                name,
                "ended_at",
                sqlite_where=sa.text(f"{name} IS NOT NULL"),
                postgresql_where=sa.text(f"{name} IS NOT NULL"),
            )
            for name in ("node", "agent", "thread_id", "run_name", "root_run_name")
        ),
    )


#: The TokenUsage columns: token counts, then cost, then the estimated flag and tier.
USAGE_COLUMNS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "embedding_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "cache_write_1h_tokens",
    "input_audio_tokens",
    "output_audio_tokens",
    "input_image_tokens",
    "output_image_tokens",
    "tool_prompt_tokens",
    "web_search_requests",
    "cost_estimate_usd",
    "estimated",
    "service_tier",
)
RECORD_COLUMNS = tuple(UsageRecord.model_fields)
#: The table the stores read and write.
records_table: sa.Table = UsageRow.__table__  # type: ignore[attr-defined]
#: Text columns and their widths: PostgreSQL refuses a longer value, and one refused row
#: would fail its whole batch on every retry. (The id is ours.)
_TEXT_WIDTHS: tuple[tuple[str, int], ...] = tuple(
    (column.name, length)
    for column in records_table.columns
    if (length := getattr(column.type, "length", None)) and column.name != "id"
)


def fit_text_columns(values: dict[str, Any]) -> None:
    """Make the caller's text values text every store and the spill file can take: UTF-8
    (lone surrogates escaped) that fits its column (cut, with a warning)."""
    for name, width in _TEXT_WIDTHS:
        value = values[name]
        if value is None:
            continue
        if type(value) is not str:
            values[name] = value = str(value)
        if not value.isascii():
            values[name] = value = utf8_text(value, name)
        if len(value) > width:
            logger.warning("%s is %d characters; storing its first %d", name, len(value), width)
            values[name] = value[:width]
    tags = values["tags"]
    if tags and not all(tag.isascii() for tag in tags):
        values["tags"] = [utf8_text(tag, "tags") for tag in tags]


def utf8_text(value: str, name: str) -> str:
    """``value``, with any lone surrogate (``json.loads('"\\ud800"')``: not UTF-8, it used to
    kill the writer thread) escaped as ``\\ud800``."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        escaped = value.encode("utf-8", "backslashreplace").decode("utf-8")
        logger.warning("%s is not UTF-8 text; storing it escaped as %r", name, escaped)
        return escaped
    return value


_COLUMN_SET = frozenset(RECORD_COLUMNS)


class SchemaInfo(SQLModel, table=True):
    """One row: the schema version the tables were written with."""

    __tablename__: ClassVar[str] = "usage_schema"

    id: int = Field(default=1, primary_key=True)
    version: int = SCHEMA_VERSION
