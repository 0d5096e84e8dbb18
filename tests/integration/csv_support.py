"""Reading staged CSV back in the integration suites (the extractor's and the change capture's)."""

from __future__ import annotations


def parse_csv_keeping_nulls(text: str) -> list[list[str | None]]:
    """RFC 4180 reader that returns None for an unquoted empty field and '' for ``""``.

    (Python 3.11's csv module cannot tell the two apart; the contract depends on it.)
    """
    records: list[list[str | None]] = []
    fields: list[str | None] = []
    position = 0
    while position < len(text):
        if text[position] == '"':
            value, position = [], position + 1
            while True:
                quote = text.index('"', position)
                value.append(text[position:quote])
                if text[quote + 1 : quote + 2] == '"':
                    value.append('"')
                    position = quote + 2
                    continue
                position = quote + 1
                break
            fields.append("".join(value))
        else:
            end = position
            while end < len(text) and text[end] not in ",\n":
                end += 1
            fields.append(text[position:end] if end > position else None)
            position = end
        if position >= len(text) or text[position] == "\n":
            records.append(fields)
            fields = []
        position += 1
    return records
