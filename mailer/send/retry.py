"""The retry file of ``mailer report --failed``: the failed rows as a contact file.

README's recipe is ``mailer report --campaign welcome --failed retry.csv && mailer
send retry.csv welcome.md.j2 --campaign welcome-retry --yes``: the second command
renders the same template, so each row needs every column the original row had. The
send log keeps the outcome (status, SMTP reply) but not the row, so the rows are read
again from the contact file that the campaign's runs name (``runs.contacts``), matched
by address, and written with their original columns first and the status columns
after them. A file that no longer holds a failed recipient has changed since the send:
that is an error that says so, and nothing is written.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..core.addresses import address_key
from ..core.errors import ContactsError, UsageError
from ..store.base import SendStore

__all__ = ["STATUS_COLUMNS", "absolute_contacts_name", "write_retry_csv"]


STATUS_COLUMNS = ("status", "smtp_code", "smtp_reply")
_DELIMITERS = (",", ";", "\t", "|")


@dataclass
class _Failed:
    recipient: str
    status: str
    smtp_code: str
    smtp_reply: str


def _failed_rows(log: SendStore, campaign: str) -> list[_Failed]:
    # The store's own CSV of the failed and deferred rows (its one query for them).
    buffer = io.StringIO()
    log.write_failed_csv(campaign, buffer)
    buffer.seek(0)
    return [_Failed(row["email"], row["status"], row["smtp_code"], row["smtp_reply"]) for row in csv.DictReader(buffer)]


def _contact_files(log: SendStore, campaign: str) -> tuple[list[Path], bool]:
    """The contact files the campaign's runs read, newest first; and whether one was stdin."""
    files: list[Path] = []
    from_stdin = False
    for run in reversed(log.list_runs(campaign)):
        name = run.contacts
        if not name:
            continue
        if name in ("-", "<stdin>"):
            from_stdin = True
            continue
        path = Path(name)
        if path not in files:
            files.append(path)
    return files, from_stdin


def _sniff(header_line: str) -> str:
    counts = {d: header_line.count(d) for d in _DELIMITERS}
    best = max(_DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] else ","


def _rows(path: Path) -> Iterator[list[str]]:
    """Every row of a contact file (the header first), read as `mailer send` reads it."""
    try:
        file = path.open(encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise ContactsError(
            "the contact file of this campaign's send is gone, so its rows cannot be written to the retry file.",
            path=str(path),
            hint="Put the file back where the send read it (the path above) and run the command again.",
        ) from None
    except OSError as exc:
        raise ContactsError(f"cannot read the contact file ({exc.strerror}).", path=str(path)) from None
    with file:
        try:
            lines = iter(file)
            header_line = ""
            for header_line in lines:
                if header_line.strip():
                    break

            def chained() -> Iterator[str]:
                yield header_line
                yield from lines

            yield from csv.reader(chained(), delimiter=_sniff(header_line))
        except (UnicodeDecodeError, csv.Error) as exc:
            raise ContactsError(
                f"cannot read the contact file again ({exc}); it changed since the send.", path=str(path)
            ) from None


def _key(cell: str) -> str | None:
    """The key of a cell that holds an address (the rule `mailer send` resumes by)."""
    return address_key(cell) if "@" in cell else None


def write_retry_csv(log: SendStore, campaign: str, file: TextIO) -> int:
    """Write ``campaign``'s failed and deferred recipients to ``file`` as a contact file.

    Columns: those of the contact file the send read, in its order, then ``status``,
    ``smtp_code`` and ``smtp_reply`` (prefixed ``mailer_`` where the file already has a
    column of that name). Returns the number of rows. Raises :class:`UsageError` or
    :class:`ContactsError` (and writes nothing) when the rows cannot be found again.
    """
    failed = _failed_rows(log, campaign)
    header: list[str] = []
    found: dict[str, dict[str, str]] = {}
    if failed:
        files, from_stdin = _contact_files(log, campaign)
        if not files:
            where = "were read from standard input" if from_stdin else "are not named in the send log"
            raise UsageError(
                f"the contacts of campaign {campaign!r} {where}, so the failed rows cannot be written with "
                "their columns.",
                hint="Send from a file (mailer send contacts.csv ...) to be able to retry from the report.",
            )
        wanted = {address_key(row.recipient) for row in failed}
        for path in files:
            rows = _rows(path)
            names = [name.strip() for name in next(rows, [])]
            header.extend(name for name in names if name not in header)
            for cells in rows:
                for cell in cells:
                    key = _key(cell) if cell else None
                    if key is not None and key in wanted and key not in found:
                        found[key] = dict(zip(names, cells))
                        break
            if len(found) == len(wanted):
                break
        missing = [row.recipient for row in failed if address_key(row.recipient) not in found]
        if missing:
            named = ", ".join(str(path) for path in files)
            example = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise ContactsError(
                f"{len(missing)} of the {len(failed)} failed and deferred recipients of campaign {campaign!r} "
                f"are no longer in the contact file the send read ({example}): it changed since the send, so "
                "their rows (the columns the template uses) cannot be written.",
                path=named,
                hint="Put back the file as it was at the send, then run the command again.",
            )
    status_columns = [name if name not in header else f"mailer_{name}" for name in STATUS_COLUMNS]
    writer = csv.writer(file, lineterminator="\n")
    writer.writerow(header + status_columns if header else ["email", *status_columns])
    for row in failed:
        values = found.get(address_key(row.recipient))
        original = [values.get(name, "") for name in header] if values is not None else [row.recipient]
        writer.writerow([*original, row.status, row.smtp_code, row.smtp_reply])
    return len(failed)


def absolute_contacts_name(source: str) -> str:
    """What a run records as its contact file: an absolute path (or ``<stdin>``), so that
    ``report --failed`` finds it again from any working directory."""
    return "<stdin>" if source == "-" else os.path.abspath(source)
