"""The JSON document PostgreSQL builds for a VARIANT column, by the column's shape.

One definition for both sides that read PostgreSQL: the extractor stages this document's
text, and ``pgsnow verify`` (and the demo's cell-by-cell comparison) compares Snowflake's
VARIANT against the same document. docs/type-mapping.md describes each shape.
"""

from __future__ import annotations

from psycopg2 import sql

from pgsnow.typemap import TypeShape

# Names inside the multirange subquery: unusual, so that they cannot hide a table column of
# the same name that the source expression refers to.
_RANGE_ALIAS = "pgsnow_range"
_ORDINAL_ALIAS = "pgsnow_ordinal"


def _range_object(value: sql.Composable) -> sql.Composable:
    """A range as an object: bounds (JSON null where infinite), inclusivity, empty, infinite ends."""
    return sql.SQL(
        "jsonb_build_object('empty', isempty({0}), 'lower', lower({0}), 'upper', upper({0}), "
        "'lower_inc', lower_inc({0}), 'upper_inc', upper_inc({0}), "
        "'lower_inf', lower_inf({0}), 'upper_inf', upper_inf({0}))"
    ).format(value)


def json_document(shape: TypeShape, source: sql.Composable) -> sql.Composable:
    """A ``jsonb`` expression for the value of a JSON-kind column of this shape (NULL stays NULL)."""
    match shape:
        case TypeShape.RANGE:
            return sql.SQL("CASE WHEN {0} IS NULL THEN NULL ELSE {1} END").format(
                source, _range_object(source)
            )
        case TypeShape.MULTIRANGE:
            element = sql.Identifier(_RANGE_ALIAS, _RANGE_ALIAS)
            return sql.SQL(
                "CASE WHEN {source} IS NULL THEN NULL ELSE (SELECT coalesce(jsonb_agg({object} ORDER BY {ordinal}), "
                "'[]'::jsonb) FROM unnest({source}) WITH ORDINALITY AS {alias}({range}, {ordinal_name})) END"
            ).format(
                source=source,
                object=_range_object(element),
                ordinal=sql.Identifier(_RANGE_ALIAS, _ORDINAL_ALIAS),
                alias=sql.Identifier(_RANGE_ALIAS),
                range=sql.Identifier(_RANGE_ALIAS),
                ordinal_name=sql.Identifier(_ORDINAL_ALIAS),
            )
        case TypeShape.ARRAY | TypeShape.COMPOSITE | TypeShape.HSTORE:
            # Arrays nest; composites become objects by field name (nested composites as objects,
            # nested arrays as arrays, other field types as to_jsonb renders them); hstore goes
            # through its extension's json cast: an object of text values (NULL as null).
            return sql.SQL("to_jsonb({})").format(source)
        case _:
            return sql.SQL("{}::jsonb").format(source)
