"""The record a caller gets is a plain immutable value; the ORM row is the stores' business."""

from __future__ import annotations

import copy
import pickle

import pytest
from pydantic import ValidationError
from sqlmodel import Session, SQLModel, create_engine, select

from usage_callbacks import TokenUsage, UsageTracker
from usage_callbacks.store.models import UsageRecord, UsageRow


def _recorded(tracker: UsageTracker) -> UsageRecord:
    return tracker.record(
        TokenUsage(prompt_tokens=120, completion_tokens=30, cache_read_tokens=100),
        model="gpt-4o",
        provider="openai",
        user_id="alice",
        tags=["a", "b"],
        node="plan",
    )


def test_a_record_reads_copies_pickles_and_compares(memory_tracker: UsageTracker) -> None:
    record = _recorded(memory_tracker)
    assert (record.user_id, record.model, record.node, record.tags) == (
        "alice",
        "gpt-4o",
        "plan",
        ["a", "b"],
    )
    assert record.usage.total == 150 and record.usage.cost_estimate_usd == record.cost_estimate_usd
    assert copy.copy(record) == record == copy.deepcopy(record)
    assert pickle.loads(pickle.dumps(record)) == record
    assert {record: 1}[pickle.loads(pickle.dumps(record))] == 1  # hashable, by value
    assert record.model_copy(update={"user_id": "bob"}) != record


def test_assigning_a_field_says_the_record_is_frozen(memory_tracker: UsageTracker) -> None:
    """It used to raise an AttributeError about SQLAlchemy's ``_sa_instance_state``."""
    record = _recorded(memory_tracker)
    with pytest.raises(ValidationError, match="frozen"):
        record.user_id = "bob"  # type: ignore[misc]
    assert record.user_id == "alice"


def test_records_read_back_equal_what_was_recorded(tracker: UsageTracker) -> None:
    recorded = [_recorded(tracker) for _ in range(3)]
    tracker.flush()
    stored = tracker.records()
    assert all(type(record) is UsageRecord for record in stored)
    assert sorted(stored, key=lambda r: r.id) == sorted(recorded, key=lambda r: r.id)


def test_a_record_becomes_a_row_for_an_orm_session_of_ones_own(
    memory_tracker: UsageTracker,
) -> None:
    """``Session.add(record)`` used to fail on the half-ORM instance ``record()`` returned."""
    record = _recorded(memory_tracker)
    engine = create_engine("sqlite://")
    SQLModel.metadata.create_all(engine, tables=[UsageRow.__table__])  # type: ignore[attr-defined]
    with Session(engine) as session:
        session.add(UsageRow(**record.model_dump()))
        session.commit()
        [row] = session.exec(select(UsageRow)).all()
        assert UsageRecord.model_validate(row.model_dump()) == record
