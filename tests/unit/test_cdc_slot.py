"""The slot's health from pg_replication_slots rows of PostgreSQL 15, 16 and 17, and the status
section of a slot at risk; the live server is in tests/integration/cdc/test_slot_status.py."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from pgsnow.cdc.slot import SlotHealth, SlotLostError, health_from_row
from pgsnow.identifiers import TableRef
from pgsnow.runs import DrainState
from pgsnow.status import format_slot_lines, slot_status

pytestmark = pytest.mark.unit

PG15 = {
    "slot_name": "s",
    "plugin": "pgoutput",
    "slot_type": "logical",
    "database": "test",
    "active": False,
    "active_pid": None,
    "restart_lsn": "0/1000",
    "confirmed_flush_lsn": "0/2000",
    "wal_status": "reserved",
    "safe_wal_size": None,
}


@pytest.mark.parametrize(
    ("extra", "lost", "reason"),
    [
        ({}, False, None),
        ({"wal_status": "lost", "restart_lsn": None}, True, None),
        ({"conflicting": False}, False, None),
        ({"conflicting": True}, True, "conflict with recovery"),
        ({"invalidation_reason": "wal_removed", "wal_status": "lost"}, True, "wal_removed"),
        ({"invalidation_reason": None, "conflicting": None}, False, None),
    ],
    ids=["15-healthy", "15-lost", "16-healthy", "16-conflicting", "17-wal-removed", "17-healthy"],
)
def test_health_from_rows_of_each_version(extra: dict[str, Any], lost: bool, reason: str | None) -> None:
    health = health_from_row("s", {**PG15, **extra}, 4096)
    assert health.lost is lost
    assert health.invalidation_reason == reason
    assert health.confirmed_flush_lsn == 0x2000
    if lost:
        assert health.problem is not None and "invalidated" in health.problem
        error = SlotLostError(health, [TableRef("shop", "orders")])
        assert "pgsnow cdc resnapshot --slot s --tables shop.orders" in str(error)


def test_an_unreserved_slot_is_shown_at_risk() -> None:
    health = health_from_row("s", {**PG15, "wal_status": "unreserved", "active": True}, 10 * 2**30)
    status = slot_status(health=health, state=None, tables=[], now=datetime(2026, 1, 1, tzinfo=UTC))
    assert status.state == "AT RISK"
    text = "\n".join(format_slot_lines(status))
    assert "retained WAL          10.0 GiB" in text and "will be invalidated" in text


def test_a_drain_state_ahead_of_the_slot_is_explained() -> None:
    health = health_from_row("s", {**PG15, "active": True}, 0)
    state = DrainState(slot="s", confirmed_lsn=0x3000, confirmed_at="not a time", last_heartbeat="odd")
    status = slot_status(health=health, state=state, tables=[], now=datetime(2026, 1, 1, tzinfo=UTC))
    assert status.state == "OK"
    assert status.seconds_since_confirmation is None and status.lag_seconds is None
    assert status.error is not None and "has not confirmed it yet" in status.error


def test_an_invalidated_logical_slot_without_a_confirmed_position_is_lost() -> None:
    # PostgreSQL 15 shows an invalidated slot's position as NULL, with no reason column to say why.
    health = health_from_row("s", {**PG15, "confirmed_flush_lsn": None, "wal_status": None}, None)
    assert health.lost and health.problem is not None and "invalidated" in health.problem


def test_a_missing_slot_names_the_setup_and_the_resnapshot_commands() -> None:
    error = SlotLostError(SlotHealth(slot="s", exists=False), [TableRef("shop", "orders")])
    text = str(error)
    assert "'s' does not exist" in text and "pgsnow postgres-sql" in text
    assert "pgsnow cdc resnapshot --slot s --tables shop.orders" in text and not error.retryable


@pytest.mark.parametrize(
    ("extra", "current", "problem"),
    [
        ({}, "test", None),
        ({"plugin": "test_decoding"}, "test", "slot of 'test_decoding', not pgoutput"),
        ({"slot_type": "physical", "plugin": None, "database": None}, "test", "physical slot"),
        ({"database": "other"}, "test", "belongs to database 'other', not 'test'"),
    ],
    ids=["usable", "other-plugin", "physical", "other-database"],
)
def test_a_slot_pgsnow_cannot_read_is_unusable_not_lost(
    extra: dict[str, Any], current: str, problem: str | None
) -> None:
    health = health_from_row("s", {**PG15, **extra}, 0, current_database=current)
    assert not health.lost  # a set-up mistake: no change was lost, nothing to re-snapshot
    if problem is None:
        assert health.unusable is None
    else:
        assert health.unusable is not None and problem in health.unusable
