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


_QUOTE, _COMMA = ord('"'), ord(",")


def csv_fields_at(record: bytes, positions: list[int]) -> list[str]:
    """The fields at ``positions`` of one record in PostgreSQL's COPY CSV, decoded.

    Reads the record's bytes only up to the last wanted field and copies only the wanted ones, so
    a record holding a value of hundreds of MB costs no more than its key (the extractor reads each
    staged file's first and last key this way). Quoted fields may hold commas, newlines and ``""``.
    """
    wanted = set(positions)
    found: dict[int, str] = {}
    last = max(positions)
    end = len(record)
    pos = 0
    for index in range(last + 1):
        if pos < end and record[pos] == _QUOTE:
            parts: list[bytes] = []
            start = pos + 1
            while True:
                quote = record.find(b'"', start)
                if quote < 0:
                    raise ValueError("a quoted CSV field has no closing quote")
                if index in wanted:
                    parts.append(record[start:quote])
                if record[quote + 1 : quote + 2] == b'"':  # an escaped quote inside the field
                    if index in wanted:
                        parts.append(b'"')
                    start = quote + 2
                    continue
                pos = quote + 1
                break
            value = b"".join(parts) if index in wanted else b""
        else:
            comma = record.find(b",", pos)
            stop = end if comma < 0 else comma
            value = record[pos:stop].rstrip(b"\r\n") if index in wanted else b""
            pos = stop
        if index in wanted:
            found[index] = value.decode("utf-8")
        if pos < end and record[pos] == _COMMA:
            pos += 1
        elif index < last:
            raise ValueError(f"the CSV record has {index + 1} fields, field {last + 1} was asked for")
    return [found[p] for p in positions]
