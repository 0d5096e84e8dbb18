"""pgvector and PostGIS types in the type contract (docs/type-mapping.md, "Extension types").

Kept apart from ``pgsnow.typemap`` (whose ``map_pg_type`` asks this module first) so the
built-in contract and these extension types change independently.
"""

from __future__ import annotations

import re

from pgsnow.typemap import TEXT_COLUMN_LENGTH, SnowflakeType, ValueKind

# Snowflake's VECTOR holds at most 4096 elements (docs: "Vector data types").
SNOWFLAKE_MAX_VECTOR_DIMENSION = 4096

_VECTOR = re.compile(r"^vector\((\d+)\)$")
# format_type() spells PostGIS typmods geometry(PointZ,4326) / geography(Point,4326).
_SPATIAL = re.compile(r"^(geometry|geography)(\(.*\))?$")


def map_extension_type(t: str) -> SnowflakeType | None:
    """pgvector and PostGIS types (``t`` is ``map_pg_type``'s normalised spelling); None for others.

    * ``vector(n)``, n <= 4096: ``VECTOR(FLOAT, n)`` (pgvector stores float4, Snowflake's VECTOR
      FLOAT is float4 too: exact).
    * ``vector`` without a dimension, or above Snowflake's 4096, and ``halfvec``: a VARIANT array
      (their text is a JSON array), never a truncated vector.
    * ``sparsevec``: its text (``{1:0.5,3:2}/5``) in a VARCHAR.
    * ``geometry`` / ``geography`` with any typmod: ``GEOMETRY`` / ``GEOGRAPHY``.
    Arrays of these stay with the generic array rule (VARIANT of their text forms).
    """
    if t.endswith("[]"):
        return None
    if m := _VECTOR.match(t):
        dimension = int(m.group(1))
        if dimension <= SNOWFLAKE_MAX_VECTOR_DIMENSION:
            return SnowflakeType(ValueKind.VECTOR, f"VECTOR(FLOAT, {dimension})")
        return SnowflakeType(ValueKind.JSON, "VARIANT")
    if t in {"vector", "halfvec"} or t.startswith("halfvec("):
        return SnowflakeType(ValueKind.JSON, "VARIANT")
    if t == "sparsevec" or t.startswith("sparsevec("):
        return SnowflakeType(ValueKind.TEXT, f"VARCHAR({TEXT_COLUMN_LENGTH})")
    if m := _SPATIAL.match(t):
        if m.group(1) == "geometry":
            return SnowflakeType(ValueKind.GEOMETRY, "GEOMETRY")
        return SnowflakeType(ValueKind.GEOGRAPHY, "GEOGRAPHY")
    return None
