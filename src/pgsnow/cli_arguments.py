"""Argument types shared by the ``pgsnow`` subcommands."""

from __future__ import annotations

import argparse

from pgsnow.errors import PgSnowError
from pgsnow.identifiers import TableRef


def table_argument(text: str) -> TableRef:
    """``schema.table`` on the command line; a bad name is argparse's usage error, not a traceback."""
    try:
        return TableRef.parse(text)
    except PgSnowError as exc:
        raise argparse.ArgumentTypeError(exc.message) from exc


def table_list_argument(text: str) -> list[TableRef]:
    """``schema.a,schema.b`` on the command line (empty items ignored)."""
    return [table_argument(item) for item in text.split(",") if item.strip()]
