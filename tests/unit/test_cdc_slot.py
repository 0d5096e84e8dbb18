"""The slot's health from pg_replication_slots rows of PostgreSQL 15, 16 and 17, and the status
section of a slot at risk; the live server is in tests/integration/cdc/test_slot_status.py."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from pgsnow.cdc.slot import SlotLostError, health_from_row
from pgsnow.identifiers import TableRef
from pgsnow.status import format_slot_lines, slot_status

pytestmark = pytest.mark.unit

PG15 = {
    "slot_name": "s",
    "plugin": "pgoutput",
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
    state = {"confirmed_lsn": "0/3000", "confirmed_at": "not a time", "last_heartbeat": "odd"}
    status = slot_status(health=health, state=state, tables=[], now=datetime(2026, 1, 1, tzinfo=UTC))
    assert status.state == "OK"
    assert status.seconds_since_confirmation is None and status.lag_seconds is None
    assert status.error is not None and "has not confirmed it yet" in status.error
