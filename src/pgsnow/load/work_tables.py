"""Work tables: the transient tables a load makes for its one transaction, and the sweep of those a
load left behind.

A merge run's group COPYs into one and MERGEs from it, a run's deletes load its key list into one,
a change run COPYs its changes into one (``table_sql.WORK_TABLE_PREFIXES``). DDL commits in
Snowflake, so each is created before its transaction and dropped after it (``work_table``). They are
TRANSIENT (no Fail-safe storage is kept for them) and not TEMPORARY (fakesnow cannot create a
qualified temporary table, docs/snowflake-compatibility.md).

A load that is stopped between the two (its Lambda reached its timeout, or was ended) leaves its
work table in the control schema. The cleanup pass drops every work table created more than
``WORK_TABLE_MAX_AGE`` ago (``drop_abandoned_work_tables``): by then no load can be using it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from pgsnow.errors import ConfigError
from pgsnow.load.session import LoadSession, execute
from pgsnow.load.tables import Target
from pgsnow.manifest import Column
from pgsnow.observability import logger
from pgsnow.snowflake.table_sql import (
    WORK_TABLE_PREFIXES,
    build_create_work_table,
    build_drop_table,
    build_select_work_tables,
)

if TYPE_CHECKING:
    from snowflake.connector import SnowflakeConnection

    from pgsnow.config import Settings

# No load uses a work table longer than its function runs: at most 15 minutes, Lambda's longest
# Timeout (the loader's; tests/unit/test_template.py checks every function's against this). Four
# times that leaves room for clock differences and for a load run by hand.
WORK_TABLE_MAX_AGE = timedelta(hours=1)


def new_work_table(session: LoadSession, prefix: str) -> Target:
    """A name no other load uses: the prefix and 16 random hex digits, in the control schema."""
    if prefix not in WORK_TABLE_PREFIXES:
        raise ValueError(f"not a work table prefix: {prefix!r}")
    return (session.database, session.control_schema, f"{prefix}{uuid.uuid4().hex[:16].upper()}")


@contextmanager
def work_table(session: LoadSession, prefix: str, columns: Sequence[Column]) -> Iterator[Target]:
    """A new work table with ``columns`` for the block (create it before the block's transaction
    begins: DDL commits), dropped when the block ends, however it ends."""
    table = new_work_table(session, prefix)
    session.execute(build_create_work_table(table, columns))
    try:
        yield table
    finally:
        session.execute(build_drop_table(table))


def drop_abandoned_work_tables(
    *, settings: Settings, sf_conn: SnowflakeConnection, now: datetime | None = None
) -> list[str]:
    """Drop the control schema's work tables created more than ``WORK_TABLE_MAX_AGE`` before
    ``now``; their names. ``now`` lets tests play a later pass."""
    database = settings.snowflake.database
    if not database:
        raise ConfigError(["SNOWFLAKE_DATABASE is needed to drop abandoned work tables"])
    schema = settings.snowflake.control_schema
    created_before = (now or datetime.now(UTC)) - WORK_TABLE_MAX_AGE
    found = execute(sf_conn, *build_select_work_tables(database, schema, created_before=created_before))
    dropped = []
    for name, created in found:
        # IF EXISTS: another pass may have dropped it since the look-up.
        execute(sf_conn, build_drop_table((database, schema, str(name))))
        dropped.append(str(name))
        logger.warning(
            "dropped a work table a load left behind (the load was stopped before its own DROP)",
            extra={"table": f"{schema}.{name}", "created_at": str(created)},
        )
    return dropped
