"""Reading one record of pgsnow's staged CSV (header or data row) back as text fields.

Kept apart from ``pgsnow.formats`` (the writers, which need pyarrow): the loader reads CSV
headers too, and its Lambda artifact ships no pyarrow.
"""

from __future__ import annotations

import csv

# Python's csv module refuses a field over 128 KiB by default (a process-wide limit). A staged
# record holds whole PostgreSQL values (documents, HTML, JSON of any size), so pgsnow reads its
# own records without that limit; memory is bounded by the one record being read.
_UNLIMITED_FIELD_SIZE = 2**31 - 1


def parse_csv_record(text: str) -> list[str]:
    """The fields of one CSV record (header or data row) in pgsnow's encoding, whatever their size."""
    if csv.field_size_limit() < _UNLIMITED_FIELD_SIZE:
        csv.field_size_limit(_UNLIMITED_FIELD_SIZE)
    return next(csv.reader([text]), [])
