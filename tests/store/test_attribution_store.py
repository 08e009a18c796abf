"""Attribution in the store: v1 databases upgraded in place, filters, grouping, purge."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from usage_callbacks import Budget, TokenUsage, UsageTracker
from usage_callbacks.store import UsageFilter
from usage_callbacks.store.models import SCHEMA_VERSION, records_table

#: The tables as usage-callbacks schema v1 wrote them (before attribution).
V1_SCHEMA = [
    """CREATE TABLE usage_records (
    id VARCHAR(32) PRIMARY KEY, started_at TIMESTAMP NOT NULL, ended_at TIMESTAMP NOT NULL,
    latency_ms FLOAT, framework VARCHAR(32) NOT NULL, provider VARCHAR(128),
    model VARCHAR(256), call_type VARCHAR(16) NOT NULL, run_id VARCHAR(64),
    parent_run_id VARCHAR(64), session_id VARCHAR(256), user_id VARCHAR(256),
    tags JSON NOT NULL, status VARCHAR(16) NOT NULL, error_type VARCHAR(256),
    cache_hit BOOLEAN NOT NULL, cost_known BOOLEAN NOT NULL,
    prompt_tokens BIGINT NOT NULL, completion_tokens BIGINT NOT NULL,
    total_tokens BIGINT NOT NULL, embedding_tokens BIGINT NOT NULL,
    cache_read_tokens BIGINT NOT NULL, cache_write_tokens BIGINT NOT NULL,
    reasoning_tokens BIGINT NOT NULL, cost_estimate_usd BIGINT NOT NULL,
    estimated BOOLEAN NOT NULL)""",
    "CREATE INDEX ix_usage_records_ended_at ON usage_records (ended_at)",
    "CREATE TABLE usage_schema (id INTEGER PRIMARY KEY, version INTEGER NOT NULL)",
    "INSERT INTO usage_schema VALUES (1, 1)",
    """CREATE TABLE budget_definitions (budget VARCHAR(256) PRIMARY KEY,
    limit_pico BIGINT, limit_tokens BIGINT, per VARCHAR(16) NOT NULL,
    period VARCHAR(16), rolling_seconds FLOAT)""",
    """INSERT INTO usage_records VALUES ('a1', '2026-01-01 10:00:00', '2026-01-01 10:00:01',
    1000.0, 'manual', 'openai', 'gpt-4o', 'chat', NULL, NULL, 's', 'u', '[]', 'ok', NULL,
    false, true, 100, 20, 120, 0, 0, 0, 0, 5000000, false)""",
]


def _make_v1(url: str) -> None:
    engine = sa.create_engine(url, poolclass=NullPool)
    with engine.begin() as connection:
        for statement in V1_SCHEMA:
            connection.exec_driver_sql(statement)
    engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_v1_database_gains_attribution_in_place(
    backend: str, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    url = str(request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url"))
    _make_v1(url)
    with UsageTracker(url, dimensions=["tenant", "feature_flag"]) as tracker:
        [old] = tracker.records()
        assert (old.node, old.agent, old.thread_id, old.run_name, old.dimensions) == (
            None,
            None,
            None,
            None,
            None,
        )
        tracker.record(
            TokenUsage(prompt_tokens=7),
            model="m",
            node="plan",
            dimensions={"tenant": "acme", "other": "dropped"},
        )
        # the widened budget_definitions.per takes a long dimension scope on PostgreSQL
        tracker.add_budget(Budget(limit_usd=1, per="dimension:feature_flag"))
        summary = tracker.summary(group_by="node")
        assert {group.key: group.calls for group in summary.groups} == {None: 1, "plan": 1}
        by_tenant = tracker.summary(group_by="dimension:tenant")
        assert {group.key: group.usage.total for group in by_tenant.groups} == {
            None: 120,
            "acme": 7,
        }
        [new] = tracker.records(node="plan")
        assert new.dimensions == {"tenant": "acme"}
        overview = tracker.store.ledger.overview(datetime.now(timezone.utc))
        assert [status.budget.per for status in overview] == ["dimension:feature_flag"]
    assert f"from schema v1 to v{SCHEMA_VERSION}" in caplog.text
    assert "usage_records.node" in caplog.text
    assert {"ix_usage_records_node_ended", "ix_usage_records_dim_tenant"} <= _index_names(url)


def _index_names(url: str) -> set[str]:
    engine = sa.create_engine(url, poolclass=NullPool)
    query = (
        "SELECT name FROM sqlite_master WHERE type = 'index'"
        if engine.dialect.name == "sqlite"
        else "SELECT indexname FROM pg_indexes WHERE tablename = 'usage_records'"
    )
    with engine.connect() as connection:
        names = set(connection.exec_driver_sql(query).scalars())
    engine.dispose()
    return names


def test_attribution_filters_seek_their_index(sqlite_url: str) -> None:
    with UsageTracker(sqlite_url, dimensions=["tenant"]) as tracker:
        store = tracker.store
        for where, index in [
            (UsageFilter(node="plan"), "ix_usage_records_node_ended"),
            (UsageFilter(agent="a"), "ix_usage_records_agent_ended"),
            (UsageFilter(thread_id="t"), "ix_usage_records_thread_id_ended"),
            (UsageFilter(dimensions={"tenant": "acme"}), "ix_usage_records_dim_tenant"),
        ]:
            query = store._where(sa.select(sa.func.count()).select_from(_table()), where)
            compiled = query.compile(store.engine, compile_kwargs={"literal_binds": True})
            with store.engine.connect() as connection:
                plan = " ".join(
                    str(row[-1])
                    for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}")
                )
            assert index in plan, (where, plan)


def _table() -> sa.Table:
    return records_table


def _attributed(tracker: UsageTracker) -> None:
    at = datetime(2026, 3, 1, tzinfo=timezone.utc)
    calls = [
        ("plan", "planner", "t1", "gpt-4o", {"tenant": "acme"}, 100),
        ("plan", "planner", "t2", "gpt-4o-mini", {"tenant": "globex"}, 10),
        ("act", "doer", "t1", "gpt-4o-mini", {"tenant": "acme"}, 20),
        ("act", "doer", "t1", "gpt-4o", {"tenant": "acme", "secret": "x"}, 200),
        (None, None, None, "gpt-4o", None, 1),
    ]
    for index, (node, agent, thread, model, dimensions, tokens) in enumerate(calls):
        tracker.record(
            TokenUsage(prompt_tokens=tokens, cost_estimate_usd=Decimal(tokens) / 1000),
            model=model,
            node=node,
            agent=agent,
            thread_id=thread,
            run_name=f"{node}-chain" if node else None,
            root_run_name="graph" if node else None,
            dimensions=dimensions,
            ended_at=at + timedelta(minutes=index),
        )


@pytest.fixture
def attributed(store_url: str) -> UsageTracker:
    tracker = UsageTracker(store_url, dimensions=["tenant"])
    _attributed(tracker)
    return tracker


def test_summary_groups_by_attribution_and_a_second_level(attributed: UsageTracker) -> None:
    with attributed as tracker:
        by_node = tracker.summary(group_by="node")
        assert [(g.key, g.usage.total) for g in by_node.groups] == [
            ("act", 220),
            ("plan", 110),
            (None, 1),
        ]
        for level, expected in {
            "agent": {"doer": 220, "planner": 110, None: 1},
            "thread": {"t1": 320, "t2": 10, None: 1},
            "run_name": {"act-chain": 220, "plan-chain": 110, None: 1},
            "root_run_name": {"graph": 330, None: 1},
            "dimension:tenant": {"acme": 320, "globex": 10, None: 1},
        }.items():
            summary = tracker.summary(group_by=level)
            assert {g.key: g.usage.total for g in summary.groups} == expected, level
            assert summary.group_by == level
        nested = tracker.summary(group_by="node,model")
        assert nested.group_by == "node,model"
        assert nested.usage.total == 331
        act = nested.groups[0]
        assert (act.key, act.calls, act.usage.cost_estimate_usd) == ("act", 2, Decimal("0.22"))
        assert act.stats.max == 200
        assert [(g.key, g.usage.total) for g in act.groups] == [
            ("gpt-4o", 200),
            ("gpt-4o-mini", 20),
        ]
        tenant_model = tracker.summary(group_by=("dimension:tenant", "model"))
        assert next((g.key, [i.key for i in g.groups]) for g in tenant_model.groups) == (
            "acme",
            ["gpt-4o", "gpt-4o-mini"],
        )


def test_records_filters_and_purge_by_attribution(attributed: UsageTracker) -> None:
    with attributed as tracker:
        assert [r.usage.total for r in tracker.records(node="act")] == [20, 200]
        assert [r.usage.total for r in tracker.records(agent="planner", thread_id="t2")] == [10]
        assert [r.usage.total for r in tracker.records(dimensions={"tenant": "acme"})] == [
            100,
            20,
            200,
        ]
        assert [r.usage.total for r in tracker.records(run_name="plan-chain")] == [100, 10]
        assert tracker.records(root_run_name="graph", node="plan", dimensions={"tenant": "x"}) == []
        [stored] = tracker.records(node="act", model="gpt-4o")
        assert stored.dimensions == {"tenant": "acme"}  # the undeclared key was dropped
        summary = tracker.summary(group_by="model", dimensions={"tenant": "acme"})
        assert summary.usage.total == 320
        future = datetime(2030, 1, 1, tzinfo=timezone.utc)
        assert tracker.purge(future, dimensions={"tenant": "globex"}) == 1
        assert tracker.purge(future, node="act") == 2
        assert [r.usage.total for r in tracker.records()] == [100, 1]


@pytest.mark.parametrize(
    "group_by",
    ["nodes", "node,model,user", "dimension:bad key", "node,node"],
)
def test_bad_group_by_is_refused_with_advice(group_by: str) -> None:
    with UsageTracker("memory://") as tracker, pytest.raises(ValueError, match=r"group by|key"):
        tracker.summary(group_by=group_by)


def test_bad_dimension_keys_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="identifier"):
        UsageTracker("memory://", dimensions=["tenant id"])
    with pytest.raises(ValueError, match="identifier"):
        UsageFilter(dimensions={"a'b": "x"})
