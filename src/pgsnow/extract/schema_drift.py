"""A new run's columns against those the table's last staged run published (``columns.json``).

Snowflake's table was built from the published columns: a change it cannot take is refused
before anything is staged, and a NUMBER column keeps the scale it was created with.
"""

from __future__ import annotations

from collections.abc import Sequence

from pgsnow.checkpoint import PublishedColumns
from pgsnow.config import TableOptions, WriteMode
from pgsnow.errors import PermanentError
from pgsnow.identifiers import TableRef
from pgsnow.manifest import Column
from pgsnow.observability import logger
from pgsnow.schema_evolution import existing_from_published, plan_table_changes
from pgsnow.typemap import ValueKind


def check_schema_drift(
    published: PublishedColumns | None, table: TableRef, options: TableOptions, columns: Sequence[Column]
) -> None:
    """Before anything is staged: the run's columns against those of the table's last staged run.

    A change Snowflake's table cannot take (pgsnow.schema_evolution) is a PermanentError naming
    the column and both types; the run is then marked failed with nothing staged. Columns
    dropped, added (a rename is both) or changed are logged. A replace run loads into a new
    table, which takes any change, so it is only logged.
    """
    if published is None:
        return
    context = {"table": table.qualified, "previous_run_id": published.run_id}
    existing = [existing_from_published(c) for c in published.columns]
    if options.effective_write_mode is WriteMode.REPLACE:
        sent = {c.snowflake_name for c in columns}
        before = {c.name for c in existing}
        if sent != before:
            logger.info(
                "the source's columns changed; the replace run rebuilds the table with them",
                extra={**context, "added": sorted(sent - before), "dropped": sorted(before - sent)},
            )
        return
    try:
        changes = plan_table_changes(table.qualified, existing, columns)
    except PermanentError as exc:
        exc.message += "; nothing was staged"
        raise
    for name in changes.dropped:
        logger.warning(
            "a column of the last run is no longer in the source: it stays in Snowflake, "
            "nullable, and is no longer filled",
            extra={**context, "column": name},
        )
    for column in changes.added:
        logger.info("a new source column will be added", extra={**context, "column": column.snowflake_name})
    if changes.dropped and changes.added:
        logger.info(
            "a renamed column shows as a dropped column and an added one",
            extra={
                **context,
                "dropped": list(changes.dropped),
                "added": [c.snowflake_name for c in changes.added],
            },
        )
    for column in changes.widened:
        logger.info(
            "a source column's type widened",
            extra={**context, "column": column.snowflake_name, "type": column.snowflake_type},
        )
    for name in changes.kept_nullable:
        logger.info(
            "a source column became NOT NULL; its Snowflake column stays nullable",
            extra={**context, "column": name},
        )


def kept_numeric_scales(published: PublishedColumns | None, options: TableOptions) -> dict[str, int]:
    """Scales the Snowflake table's NUMBER columns already have (Snowflake cannot change a column's
    scale): from the table's last staged run, except for replace runs, which create a new table."""
    if options.effective_write_mode is WriteMode.REPLACE:
        return {}
    if published is None:
        return {}
    return {c.name: c.scale for c in published.columns if c.kind is ValueKind.DECIMAL and c.scale is not None}
