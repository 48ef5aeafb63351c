"""Reading a suppression file: a CSV with an email column, or one address per line."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..core.csv_header import find_email_column, sniff_delimiter
from ..core.errors import ContactsError

__all__ = ["parse_address_file"]


def parse_address_file(text: str, *, path: Path, default_reason: str | None) -> list[tuple[int, str, str | None]]:
    """``(line number, raw value, reason)`` for every entry of a CSV or plain address list."""
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")), None)
    if first is None:
        return []
    header_line = lines[first]
    delimiter = sniff_delimiter(header_line)
    header = [cell.strip().lower() for cell in next(csv.reader([header_line], delimiter=delimiter))]
    email_column = find_email_column(header)
    if email_column is None:
        if len(header) > 1:
            raise ContactsError(
                f"this looks like a CSV file but has no email column (columns: {', '.join(header)}).",
                path=str(path),
                line=first + 1,
                hint="Name the address column 'email', or give one address per line.",
            )
        entries = []
        for number, line in enumerate(lines, start=1):
            value = line.strip()
            if value and not value.startswith("#"):
                entries.append((number, value, default_reason))
        return entries
    reason_column = header.index("reason") if "reason" in header else None
    reader = csv.reader(io.StringIO("\n".join(lines[first:])), delimiter=delimiter)
    next(reader)
    entries = []
    for row in reader:
        if not row or (len(row) == 1 and not row[0].strip()) or row[0].lstrip().startswith("#"):
            continue
        number = first + reader.line_num
        value = row[email_column].strip() if email_column < len(row) else ""
        row_reason = default_reason
        if reason_column is not None and reason_column < len(row) and row[reason_column].strip():
            row_reason = row[reason_column].strip()
        entries.append((number, value, row_reason))
    return entries
