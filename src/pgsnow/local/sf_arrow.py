"""Result batches of the local Snowflake: fakesnow's Arrow conversion, with NULL timestamps kept NULL.

fakesnow 0.11.14 sends a TIMESTAMP_* column in Snowflake's struct form (``epoch``, ``fraction``
and, for TZ, ``timezone``) but builds the struct without the column's validity mask, so the
connector reads every NULL timestamp as 1970-01-01. Real Snowflake returns NULL. Rather than
have production SQL ask ``x IS NULL`` beside every timestamp it reads, the local server puts
the mask back here: ``server_module.to_sf`` (fakesnow's server module, loaded privately by
``pgsnow.local.sf_fakesnow``) is rebound to ``to_sf_keeping_nulls``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa

ArrowConversion = Callable[[pa.Table, Any], pa.Table]


def restore_null_timestamps(original: pa.Table, converted: pa.Table) -> pa.Table:
    """``converted`` with each timestamp struct column NULL where the ``original`` value was NULL."""
    columns: list[pa.Array | pa.ChunkedArray] = []
    for source, column in zip(original.columns, converted.columns, strict=True):
        if not (pa.types.is_timestamp(source.type) and source.null_count and pa.types.is_struct(column.type)):
            columns.append(column)
            continue
        struct = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        columns.append(
            pa.StructArray.from_arrays(
                struct.flatten(),
                fields=[struct.type.field(i) for i in range(struct.type.num_fields)],
                mask=source.combine_chunks().is_null(),
            )
        )
    return pa.Table.from_arrays(columns, schema=converted.schema)


def keeping_nulls(to_sf: ArrowConversion) -> ArrowConversion:
    """fakesnow's ``to_sf`` wrapped so that NULL timestamps stay NULL."""

    def to_sf_keeping_nulls(table: pa.Table, rowtype: Any) -> pa.Table:
        return restore_null_timestamps(table, to_sf(table, rowtype))

    return to_sf_keeping_nulls
